"""The emu3p5.story schema: .proto <-> generated module drift, the docs/design.md §7 table, and
wire compatibility checked against hand-encoded bytes."""

from __future__ import annotations

import struct

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.unknown_fields import UnknownFieldSet

from service.record import story_pb2

# ----------------------------------------------------------------------------- drift


def test_module_matches_fresh_protoc_compile():
    pytest.importorskip("grpc_tools")
    from scripts import gen_proto as gen

    fresh_set = descriptor_pb2.FileDescriptorSet.FromString(gen.compile_descriptor_set())
    assert len(fresh_set.file) == 1
    committed = descriptor_pb2.FileDescriptorProto()
    story_pb2.DESCRIPTOR.CopyToProto(committed)
    fresh = gen.normalise(fresh_set.file[0])
    committed = gen.normalise(committed)
    assert fresh.name == committed.name == "emu3p5/story.proto"
    assert fresh == committed, "story.proto and service/record/story_pb2.py drifted: run python scripts/gen_proto.py"


def test_drift_is_detected(tmp_path, monkeypatch):
    """A one-number change in the .proto must make the comparison above fail."""
    pytest.importorskip("grpc_tools")
    from scripts import gen_proto as gen

    text = (gen.PROTO_ROOT / gen.PROTO_REL).read_text(encoding="utf-8")
    assert text.count("string question = 12;") == 1
    (tmp_path / "emu3p5").mkdir()
    (tmp_path / gen.PROTO_REL).write_text(text.replace("string question = 12;", "string question = 18;"))
    monkeypatch.setattr(gen, "PROTO_ROOT", tmp_path)
    fresh = descriptor_pb2.FileDescriptorSet.FromString(gen.compile_descriptor_set()).file[0]
    committed = descriptor_pb2.FileDescriptorProto()
    story_pb2.DESCRIPTOR.CopyToProto(committed)
    assert gen.normalise(fresh) != gen.normalise(committed)


def test_postprocess_is_what_is_committed():
    """The committed module is exactly gen's output modulo protoc's version header line."""
    pytest.importorskip("grpc_tools")
    from pathlib import Path

    from scripts import gen_proto as gen

    def body(src: str) -> list[str]:
        return [ln for ln in src.splitlines() if not ln.startswith("# Protobuf Python Version:")]

    committed = Path(story_pb2.__file__).read_text(encoding="utf-8")
    assert body(gen.generate_source()) == body(committed)
    assert "_runtime_version" not in committed
    assert "'service.record.story_pb2'" in committed
    assert story_pb2.Story.__module__ == "service.record.story_pb2"


def test_module_has_no_top_level_emu3p5_dependency():
    import pickle

    msg = story_pb2.Story(question="q", clips=[story_pb2.Clip(clip_id="clip_0000")])
    assert pickle.loads(pickle.dumps(msg)) == msg


# ----------------------------------------------------------------------------- design.md §7 table

S, I32, SI32, D, B, BY, E, M = (
    FD.TYPE_STRING,
    FD.TYPE_INT32,
    FD.TYPE_SINT32,
    FD.TYPE_DOUBLE,
    FD.TYPE_BOOL,
    FD.TYPE_BYTES,
    FD.TYPE_ENUM,
    FD.TYPE_MESSAGE,
)
REP = "repeated"
MAP = "map"

# message -> {field: (number, type, referenced type or None, cardinality)}
# Clip.timestamp has no type in the design table (docs/design.md §7); the release's records carry a TimeStamp there.
TABLE = {
    "TimeStamp": {"start": (1, D, None, ""), "end": (2, D, None, "")},
    "Image": {
        "width": (1, I32, None, ""),
        "height": (2, I32, None, ""),
        "format": (3, E, "emu3p5.story.ImageFormat", ""),
        "image_data": (4, BY, None, ""),
        "image_path": (5, S, None, ""),
    },
    "ImageMeta": {
        "image_id": (1, S, None, ""),
        "timestamp": (2, M, "emu3p5.story.TimeStamp", ""),
        "caption": (3, S, None, ""),
        "detail_caption": (4, S, None, ""),
        "features": (5, M, (S, BY), MAP),
        "scores": (6, M, (S, D), MAP),
        "chain_of_thought": (7, S, None, ""),
        "cot_translate": (8, S, None, ""),
        "image": (11, M, "emu3p5.story.Image", ""),
        "is_keyframe_status": (12, SI32, None, ""),
    },
    "Segment": {
        "timestamp": (1, M, "emu3p5.story.TimeStamp", ""),
        "asr": (2, S, None, ""),
        "caption": (3, S, None, ""),
        "asr_translate": (4, S, None, ""),
        "images": (101, M, "emu3p5.story.ImageMeta", REP),
    },
    "Clip": {
        "clip_id": (1, S, None, ""),
        "timestamp": (2, M, "emu3p5.story.TimeStamp", ""),
        "story": (11, S, None, ""),
        "caption": (21, S, None, ""),
        "segments": (101, M, "emu3p5.story.Segment", REP),
    },
    "Story": {
        "story_id": (1, S, None, ""),
        "clips": (2, M, "emu3p5.story.Clip", REP),
        "deprecated": (3, B, None, ""),
        "deprecate_reason": (4, S, None, ""),
        "summary": (11, S, None, ""),
        "question": (12, S, None, ""),
        "refined_summary": (13, S, None, ""),
        "question_translate": (14, S, None, ""),
        "summary_translate": (15, S, None, ""),
        "refined_summary_translate": (16, S, None, ""),
        "reference_images": (17, M, "emu3p5.story.ImageMeta", REP),
    },
}


def _is_repeated(field) -> bool:
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FD.LABEL_REPEATED


def test_file_level():
    fd = story_pb2.DESCRIPTOR
    assert fd.package == "emu3p5.story"
    assert fd.name == "emu3p5/story.proto"
    proto = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(proto)
    assert proto.syntax == "proto3"
    assert list(proto.dependency) == []
    assert sorted(fd.message_types_by_name) == sorted(TABLE)
    assert sorted(fd.enum_types_by_name) == ["ImageFormat"]


def test_enum_image_format():
    enum = story_pb2.DESCRIPTOR.enum_types_by_name["ImageFormat"]
    assert {v.name: v.number for v in enum.values} == {"UNKNOWN": 0, "JPEG": 1, "PNG": 2, "WEBP": 3, "BMP": 4}
    assert (story_pb2.UNKNOWN, story_pb2.JPEG, story_pb2.PNG, story_pb2.WEBP, story_pb2.BMP) == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("message", sorted(TABLE))
def test_fields_match_design_table(message):
    desc = story_pb2.DESCRIPTOR.message_types_by_name[message]
    want = TABLE[message]
    assert sorted(desc.fields_by_name) == sorted(want), message
    for name, (number, ftype, ref, card) in want.items():
        f = desc.fields_by_name[name]
        where = f"{message}.{name}"
        assert f.number == number, where
        assert f.type == ftype, where
        assert _is_repeated(f) == (card in (REP, MAP)), where
        if card == MAP:
            entry = f.message_type
            assert entry.GetOptions().map_entry, where
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            assert (key.number, value.number) == (1, 2), where
            assert (key.type, value.type) == ref, where
        elif ftype == M:
            assert f.message_type.full_name == ref, where
            assert not f.message_type.GetOptions().map_entry, where
        elif ftype == E:
            assert f.enum_type.full_name == ref, where
        else:
            assert ref is None


# ----------------------------------------------------------------------------- wire

VARINT, I64, LEN = 0, 1, 2


def varint(n: int) -> bytes:
    assert n >= 0
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def ld(field: int, payload: bytes | str) -> bytes:
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return tag(field, LEN) + varint(len(payload)) + payload


def vint(field: int, n: int) -> bytes:
    return tag(field, VARINT) + varint(n if n >= 0 else n + (1 << 64))


def zigzag32(n: int) -> int:
    return ((n << 1) ^ (n >> 31)) & 0xFFFFFFFF


def f64(field: int, x: float) -> bytes:
    return tag(field, I64) + struct.pack("<d", x)


def test_unknown_field_check_works():
    msg = story_pb2.Story.FromString(ld(99, "x"))
    assert len(UnknownFieldSet(msg)) == 1


def test_encoder_sanity():
    assert varint(300) == b"\xac\x02"
    assert tag(101, LEN) == b"\xaa\x06"  # field 101 needs a two-byte tag
    assert [zigzag32(v) for v in (0, -1, 1, -2, 2, -3)] == [0, 1, 2, 3, 4, 5]


def test_hand_encoded_story_parses():
    image = vint(1, 64) + vint(2, 48) + vint(3, 2) + ld(4, b"\x89PNG\x00\xff") + ld(5, "a/b.png")
    meta = (
        ld(1, "image_0007")
        + ld(2, f64(1, 1.5) + f64(2, 2.25))
        + ld(3, "cap")
        + ld(4, "detail")
        + ld(5, ld(1, "clip") + ld(2, b"\x00\x01\xfe"))
        + ld(6, ld(1, "aes") + f64(2, 6.5))
        + ld(7, "think first")
        + ld(8, "cot-zh")
        + ld(11, image)
        + vint(12, zigzag32(-3))
    )
    segment = ld(1, f64(1, 0.5)) + ld(2, "hello") + ld(3, "seg-cap") + ld(4, "asr-zh") + ld(101, meta)
    clip = ld(1, "clip_0000") + ld(2, f64(2, 9.0)) + ld(11, "story text") + ld(21, "clip-cap") + ld(101, segment)
    ref = ld(1, "reference_0000") + ld(11, vint(1, 16) + vint(2, 32) + vint(3, 1))
    wire = (
        ld(1, "sid")
        + ld(2, clip)
        + vint(3, 1)
        + ld(4, "why")
        + ld(11, "global cot")
        + ld(12, "What happens next?")
        + ld(13, "refined")
        + ld(14, "q-zh")
        + ld(15, "s-zh")
        + ld(16, "r-zh")
        + ld(17, ref)
    )
    s = story_pb2.Story.FromString(wire)
    assert s.story_id == "sid"
    assert s.question == "What happens next?"
    assert s.summary == "global cot"
    assert (s.deprecated, s.deprecate_reason) == (True, "why")
    assert (s.refined_summary, s.question_translate, s.summary_translate, s.refined_summary_translate) == (
        "refined",
        "q-zh",
        "s-zh",
        "r-zh",
    )
    assert len(s.reference_images) == 1
    r = s.reference_images[0]
    assert (r.image_id, r.image.width, r.image.height, r.image.format) == ("reference_0000", 16, 32, story_pb2.JPEG)

    (c,) = s.clips
    assert (c.clip_id, c.timestamp.end, c.story, c.caption) == ("clip_0000", 9.0, "story text", "clip-cap")
    (seg,) = c.segments
    assert (seg.timestamp.start, seg.asr, seg.caption, seg.asr_translate) == (0.5, "hello", "seg-cap", "asr-zh")
    (m,) = seg.images
    assert m.image_id == "image_0007"
    assert (m.timestamp.start, m.timestamp.end) == (1.5, 2.25)
    assert (m.caption, m.detail_caption) == ("cap", "detail")
    assert dict(m.features) == {"clip": b"\x00\x01\xfe"}
    assert dict(m.scores) == {"aes": 6.5}
    assert (m.chain_of_thought, m.cot_translate) == ("think first", "cot-zh")
    assert m.is_keyframe_status == -3
    assert (m.image.width, m.image.height, m.image.format) == (64, 48, story_pb2.PNG)
    assert m.image.image_data == b"\x89PNG\x00\xff"
    assert m.image.image_path == "a/b.png"
    # Nothing was left unrecognised (a wrong number would land in the unknown fields).
    for msg in (s, c, c.timestamp, seg, m, m.timestamp, m.image, r, r.image):
        assert len(UnknownFieldSet(msg)) == 0, type(msg).__name__


@pytest.mark.parametrize("value", [0, 1, -1, 2, -3, 2**31 - 1, -(2**31)])
def test_is_keyframe_status_is_zigzag(value):
    wire = vint(12, zigzag32(value))
    assert story_pb2.ImageMeta.FromString(wire).is_keyframe_status == value
    assert story_pb2.ImageMeta(is_keyframe_status=value).SerializeToString() == (wire if value else b"")


def test_serializer_emits_the_same_bytes():
    """Without maps, protobuf writes fields in number order: byte-identical to the hand encoding."""
    s = story_pb2.Story(
        story_id="x",
        question="q",
        clips=[story_pb2.Clip(clip_id="clip_0000", segments=[story_pb2.Segment(asr="a", images=[story_pb2.ImageMeta(image=story_pb2.Image(width=3, format=story_pb2.PNG))])])],
        reference_images=[story_pb2.ImageMeta(image_id="r")],
    )
    meta = ld(11, vint(1, 3) + vint(3, 2))
    want = (
        ld(1, "x")
        + ld(2, ld(1, "clip_0000") + ld(101, ld(2, "a") + ld(101, meta)))
        + ld(12, "q")
        + ld(17, ld(1, "r"))
    )
    assert s.SerializeToString() == want
