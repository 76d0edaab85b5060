"""Record builder (docs/design.md §7 mapping) and the visualiser."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from service.record import (
    RecordGlobalCot,
    RecordImage,
    RecordImageCot,
    RecordText,
    StoryBuilder,
    build_story,
    encode_png,
    story_pb2,
)
from service.record.visualise import video_frames, vis_main, write_story


def img(w: int, h: int, color=(255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (w, h), color)


def decode(meta: story_pb2.ImageMeta) -> Image.Image:
    assert meta.image.format == story_pb2.PNG
    out = Image.open(io.BytesIO(meta.image.image_data))
    out.load()
    return out


def shape(story: story_pb2.Story):
    """[(clip_id, [asr per segment], [(image_id, cot) ...])] for compact asserts."""
    return [
        (c.clip_id, [s.asr for s in c.segments], [(m.image_id, m.chain_of_thought) for s in c.segments for m in s.images])
        for c in story.clips
    ]


# ----------------------------------------------------------------------------- builder


def test_interleaved_order():
    items = [
        RecordText("first"),
        RecordImage(img(32, 16)),
        RecordText("second"),
        RecordImage(img(16, 32)),
        RecordImage(img(16, 16)),
    ]
    s = build_story("q", [], items, story_id="sid-1")
    assert s.story_id == "sid-1"
    assert s.question == "q"
    assert s.summary == ""
    assert shape(s) == [
        ("clip_0000", ["first"], [("image_0000", "")]),
        ("clip_0001", ["second"], [("image_0001", ""), ("image_0002", "")]),
    ]
    sizes = [(m.image.width, m.image.height) for c in s.clips for m in c.segments[0].images]
    assert sizes == [(32, 16), (16, 32), (16, 16)]
    assert [decode(m).size for c in s.clips for m in c.segments[0].images] == sizes


def test_image_cot_attaches_to_following_image_and_global_cot_to_summary():
    items = [
        RecordGlobalCot("plan the story"),
        RecordText("t0"),
        RecordImageCot("cot for image 0"),
        RecordImage(img(8, 8)),
        RecordImage(img(8, 8)),
        RecordText("t1"),
        RecordImageCot("cot for image 2"),
        RecordImage(img(8, 8)),
    ]
    s = build_story("q", [], items, story_id="x")
    assert s.summary == "plan the story"
    assert shape(s) == [
        ("clip_0000", ["t0"], [("image_0000", "cot for image 0"), ("image_0001", "")]),
        ("clip_0001", ["t1"], [("image_0002", "cot for image 2")]),
    ]


def test_cot_before_text_still_goes_to_next_image():
    s = build_story("q", [], [RecordImageCot("c"), RecordText("t"), RecordImage(img(8, 8))], "x")
    assert shape(s) == [("clip_0000", ["t"], [("image_0000", "c")])]


def test_t2i_image_only_answer_gets_empty_asr_clip():
    s = build_story("a red square", [], [RecordImage(img(64, 48))], story_id="t2i")
    assert shape(s) == [("clip_0000", [""], [("image_0000", "")])]
    assert decode(s.clips[0].segments[0].images[0]).size == (64, 48)


def test_image_first_then_text():
    s = build_story("q", [], [RecordImage(img(8, 8)), RecordText("after"), RecordImage(img(8, 8))], "x")
    assert shape(s) == [
        ("clip_0000", [""], [("image_0000", "")]),
        ("clip_0001", ["after"], [("image_0001", "")]),
    ]


def test_text_only_and_verbatim_text():
    s = build_story("q", [], [RecordText("  spaced \n"), RecordText("")], "x")
    assert shape(s) == [("clip_0000", ["  spaced \n"], []), ("clip_0001", [""], [])]


def test_reference_images_png_round_trip():
    a = img(40, 24, (10, 20, 30))
    b = Image.new("L", (17, 9), 200)
    s = build_story("edit this", [a, b], [RecordImage(img(8, 8))], story_id="x2i")
    assert [m.image_id for m in s.reference_images] == ["reference_0000", "reference_0001"]
    ra, rb = (decode(m) for m in s.reference_images)
    assert (s.reference_images[0].image.width, s.reference_images[0].image.height) == (40, 24)
    assert (s.reference_images[1].image.width, s.reference_images[1].image.height) == (17, 9)
    assert ra.size == (40, 24) and ra.convert("RGB").getpixel((5, 5)) == (10, 20, 30)
    assert rb.size == (17, 9) and rb.getpixel((3, 3)) == 200
    # Reference images do not consume generated-image ids.
    assert s.clips[0].segments[0].images[0].image_id == "image_0000"


def test_encode_png_lossless_and_modes():
    rgb = Image.frombytes("RGB", (3, 2), bytes(range(18)))
    assert encode_png(rgb)[:8] == b"\x89PNG\r\n\x1a\n"
    back = Image.open(io.BytesIO(encode_png(rgb)))
    assert back.tobytes() == rgb.tobytes()
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert Image.open(io.BytesIO(encode_png(cmyk))).mode == "RGB"


def test_incremental_builder_matches_build_story_and_pending_cot():
    items = [RecordGlobalCot("g"), RecordText("t"), RecordImageCot("c"), RecordImage(img(8, 8))]
    b = StoryBuilder(question="q", reference_images=[img(4, 4)], story_id="s")
    b.add_global_cot("g")
    clip = b.add_text("t")
    assert clip.clip_id == "clip_0000"
    b.add_image_cot("c")
    assert b.pending_image_cot == "c"
    meta = b.add_image(img(8, 8))
    assert meta.chain_of_thought == "c" and b.pending_image_cot == ""
    assert b.num_images == 1
    assert b.story == build_story("q", [img(4, 4)], items, "s")
    # A CoT with no image after it is kept on the builder, not in the record.
    b.add_image_cot("dangling")
    assert b.pending_image_cot == "dangling"
    assert "dangling" not in str(b.story)


def test_bad_item_rejected():
    with pytest.raises(TypeError):
        build_story("q", [], ["not an item"], "x")  # type: ignore[list-item]


def test_serialize_parse_round_trip():
    items = [RecordGlobalCot("g"), RecordText("héllo 世界"), RecordImageCot("c"), RecordImage(img(8, 8))]
    s = build_story("q", [img(4, 4)], items, "s")
    data = s.SerializeToString()
    back = story_pb2.Story.FromString(data)
    assert back == s
    assert back.clips[0].segments[0].asr == "héllo 世界"
    assert back.SerializeToString() == data


# ----------------------------------------------------------------------------- visualiser


def sample_story() -> story_pb2.Story:
    items = [
        RecordGlobalCot("global plan"),
        RecordText("Once upon a time"),
        RecordImageCot("draw a castle"),
        RecordImage(img(48, 32, (0, 0, 255))),
        RecordImage(img(32, 32, (0, 255, 0))),
        RecordText("The end."),
        RecordImage(img(16, 24)),
    ]
    return build_story("Tell a story", [img(20, 10, (9, 9, 9))], items, "story-1")


#: The release's visualiser on sample_story(): one reference, so the segment counter starts at 1.
EXPECTED_FILES = {
    "000_question.txt",
    "000_global_cot.txt",
    "000_reference_image.png",
    "001_text.txt",
    "001_00_image.png",
    "001_00_image_cot.txt",
    "001_01_image.png",
    "002_text.txt",
    "002_00_image.png",
}


def files_in(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def test_visualiser_writes_the_release_layout(tmp_path):
    story = sample_story()
    pb = tmp_path / "rec.pb"
    pb.write_bytes(story.SerializeToString())
    out = tmp_path / "out"
    assert vis_main([str(pb), "--out", str(out)]) == 0
    assert files_in(out) == EXPECTED_FILES
    assert (out / "000_question.txt").read_text(encoding="utf-8") == "Tell a story\n"
    assert (out / "000_global_cot.txt").read_text(encoding="utf-8") == "global plan\n"
    assert (out / "001_text.txt").read_text(encoding="utf-8") == "Once upon a time\n"
    assert (out / "002_text.txt").read_text(encoding="utf-8") == "The end.\n"
    assert (out / "001_00_image_cot.txt").read_text(encoding="utf-8") == "draw a castle\n"
    # PNG payloads are written byte for byte.
    assert (out / "001_00_image.png").read_bytes() == story.clips[0].segments[0].images[0].image.image_data
    assert Image.open(out / "001_01_image.png").size == (32, 32)
    assert Image.open(out / "002_00_image.png").size == (16, 24)
    assert Image.open(out / "000_reference_image.png").size == (20, 10)


def test_visualiser_counts_from_the_number_of_references_and_writes_empty_text(tmp_path):
    """Three references: files 000..002_reference_image.png and the first segment is 003; a T2I
    answer's image-only clip still gets its (empty) text file, blank CoTs get none."""
    items = [RecordImage(img(8, 8)), RecordText("after"), RecordImageCot("  "), RecordImage(img(8, 8))]
    story = build_story("q", [img(4, 4)] * 3, items, "x")
    write_story(story, tmp_path)
    assert files_in(tmp_path) == {
        "000_question.txt", "000_reference_image.png", "001_reference_image.png", "002_reference_image.png",
        "003_text.txt", "003_00_image.png", "004_text.txt", "004_00_image.png",
    }
    assert (tmp_path / "003_text.txt").read_text(encoding="utf-8") == "\n"


def test_visualiser_t2i_record(tmp_path):
    story = build_story("a cat", [], [RecordImage(img(8, 8))], "t2i")
    story.summary = " \n"  # blank: no global CoT file
    write_story(story, tmp_path)
    assert files_in(tmp_path) == {"000_question.txt", "001_text.txt", "001_00_image.png"}


def test_visualiser_numbers_every_segment_and_reencodes_non_png(tmp_path):
    buf = io.BytesIO()
    img(8, 6).save(buf, format="JPEG")
    jpeg = story_pb2.ImageMeta(image=story_pb2.Image(width=8, height=6, format=story_pb2.JPEG, image_data=buf.getvalue()))
    story = story_pb2.Story(
        question="q",
        clips=[story_pb2.Clip(segments=[story_pb2.Segment(asr="a", images=[jpeg]), story_pb2.Segment(asr="b", images=[jpeg])])],
    )
    write_story(story, tmp_path)
    assert files_in(tmp_path) == {"000_question.txt", "001_text.txt", "001_00_image.png", "002_text.txt",
                                  "002_00_image.png"}
    assert (tmp_path / "002_text.txt").read_text(encoding="utf-8") == "b\n"
    with Image.open(tmp_path / "001_00_image.png") as im:
        assert im.format == "PNG" and im.size == (8, 6)


def test_visualiser_directory_scan(tmp_path):
    src = tmp_path / "records"
    (src / "a").mkdir(parents=True)
    (src / "b" / "deep").mkdir(parents=True)
    data = sample_story().SerializeToString()
    (src / "top.pb").write_bytes(data)
    (src / "a" / "same.proto").write_bytes(data)
    (src / "b" / "deep" / "same.bin").write_bytes(data)
    (src / "b" / "ignored.txt").write_text("not a record")
    out = tmp_path / "out"
    assert vis_main([str(src), "--out", str(out)]) == 0
    for sub in ("top", "a/same", "b/deep/same"):
        assert files_in(out / sub) == EXPECTED_FILES, sub
    assert {p.name for p in out.iterdir()} == {"top", "a", "b"}


def test_visualiser_errors(tmp_path):
    assert vis_main([str(tmp_path / "missing.pb"), "--out", str(tmp_path / "o")]) == 1
    (tmp_path / "empty").mkdir()
    assert vis_main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    bad = tmp_path / "bad" / "x.pb"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xff\xff")
    assert vis_main([str(bad.parent), "--out", str(tmp_path / "o")]) == 1


def test_visualiser_video_follows_the_release_sequence(tmp_path):
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    story = sample_story()
    story.clips[0].segments[0].asr = "A long line of text " * 20 + "中文"  # wraps; non-latin must not crash
    frames = video_frames(story)
    # question, reference, text, 2 images, text, 1 image; all at the reference's size
    assert len(frames) == 7 and {f.size for f in frames} == {(20, 10)}
    pb = tmp_path / "rec.pb"
    pb.write_bytes(story.SerializeToString())
    out = tmp_path / "out"
    assert vis_main([str(pb), "--out", str(out), "--video"]) == 0
    assert files_in(out) == EXPECTED_FILES | {"video.mp4"}
    gen = imageio_ffmpeg.read_frames(str(out / "video.mp4"))
    meta = next(gen)
    assert meta["fps"] == pytest.approx(1.0)
    assert len(list(gen)) == 7
    no_images = story_pb2.Story(question="q", clips=[story_pb2.Clip(segments=[story_pb2.Segment(asr="t")])])
    assert {f.size for f in video_frames(no_images)} == {(512, 512)}


def test_several_global_cots_keep_the_last():
    """The release keeps the last global chain of thought in ``summary``; nothing is joined."""
    items = [RecordGlobalCot("first plan"), RecordText("t"), RecordGlobalCot("second plan"), RecordImage(img(8, 8))]
    s = build_story("q", [], items, story_id="x")
    assert s.summary == "second plan"
    b = StoryBuilder(question="q", reference_images=[], story_id="x")
    b.add_global_cot("a")
    b.add_global_cot("b")
    assert b.story.summary == "b"
