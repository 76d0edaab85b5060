"""The core pipeline end to end on the tiny checkpoints: prompts → reference engine → parse → VQ → record → vis."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.engine.reference import ReferenceEngine
from service.record import RecordImage, RecordText, story_pb2
from service.record.visualise import vis_main
from service.task import AnswerBuilder, GenerationOptions, plan_request
from service.token_layout import ImageSegment, IncompleteImageSegment, TextSegment, parse
from service.types import SamplingSettings
from service.vq import VisionTokenizer
from tests.sync_pipeline import generate

GREEDY = SamplingSettings(1, 1.0, 1.0)


@pytest.fixture(scope="module")
def parts(tiny_dir, tiny_tokenizer):
    return (ReferenceEngine(tiny_dir / "model", tiny_tokenizer), VisionTokenizer.from_pretrained(tiny_dir / "vq"),
            tiny_tokenizer)


def test_plan_request_fills_task_defaults(tiny_tokenizer):
    tok = tiny_tokenizer
    req = plan_request(tok, "t2i", "a cat", [], GenerationOptions(), "r1")
    assert req.target_grid == (55, 73) and req.cfg_scale == 2.0 and req.stop_token_ids == (tok.ids.eoi, tok.ids.eos)
    req = plan_request(tok, "story", "a cat", [], GenerationOptions(size="1:1"), "r2")
    assert req.target_grid == (45, 45) and req.stop_token_ids == (tok.ids.eos,) and req.max_new_tokens == 32768
    grid = np.zeros((12, 20), dtype=np.int64)
    req = plan_request(tok, "x2i", "make it red", [grid], GenerationOptions(), "r3")
    assert req.target_grid == (12, 20)
    assert req.uncond_prompt.count(tok.ids.boi) == 1  # the uncond prompt keeps the reference image


def test_narrative_record_survives_vis(parts, tmp_path):
    engine, vq, tok = parts
    result = generate(engine, vq, tok, "story", "a robot in the city",
                      options=GenerationOptions(seed=1, max_new_tokens=300, text=GREEDY, image=GREEDY))
    story = story_pb2.Story.FromString(result.story.SerializeToString())
    assert story.question == "a robot in the city"
    texts = [s.text for s in result.segments if isinstance(s, TextSegment)]
    assert [c.segments[0].asr for c in story.clips] == texts
    assert story.summary and sum(len(c.segments[0].images) for c in story.clips) == len(result.images) >= 1
    record = tmp_path / "story.pb"
    record.write_bytes(story.SerializeToString())
    assert vis_main([str(record), "--out", str(tmp_path / "vis")]) == 0
    names = sorted(p.name for p in (tmp_path / "vis").iterdir())
    assert names == ["000_global_cot.txt", "000_question.txt", "001_00_image.png", "001_00_image_cot.txt",
                     "001_text.txt", "002_text.txt"]
    png = Image.open(tmp_path / "vis" / "001_00_image.png")
    h, w = result.segments[[type(s) for s in result.segments].index(ImageSegment)].codes.shape
    assert png.size == (w * 16, h * 16)


def test_x2i_matches_the_reference_grid(parts):
    engine, vq, tok = parts
    ref = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8))
    area = 128 * 128  # keeps the reference (and so the output) grid small: 6 x 10 tokens
    result = generate(engine, vq, tok, "x2i", "make it blue", [ref],
                      options=GenerationOptions(seed=0, text=GREEDY, image=GREEDY, image_area=area))
    ref_grid = vq.encode([ref], area=area)[0].shape
    assert ref_grid == (6, 10)
    (image,) = [s for s in result.segments if isinstance(s, ImageSegment)]
    assert image.codes.shape == ref_grid
    (meta,) = result.story.reference_images
    assert (meta.image.width, meta.image.height) == (160, 96)
    assert meta.image.format == story_pb2.PNG


def test_answer_and_record_skip_blank_text_and_pair_images():
    img = Image.new("RGB", (16, 16))
    answer = AnswerBuilder()
    answer.add_image(img, b"png")
    for seg in [TextSegment("  "), TextSegment("hi"), ImageSegment(np.zeros((1, 1), dtype=np.int64))]:
        answer.add_segment(seg)
    items = answer.record_items
    assert len(items) == 2 and items[0] == RecordText("hi")
    assert isinstance(items[1], RecordImage) and items[1].image is img and items[1].png == b"png"
    assert [(p.type, p.text, p.image_index) for p in answer.parts] == [("text", "hi", None), ("image", None, 0)]


def test_x2i_without_reference_images_lets_the_model_write_the_header(parts):
    """As the release: no size is set, so the header is sampled (two digits per side, design.md §5.1)."""
    engine, _vq, tok = parts
    req = plan_request(tok, "x2i", "a red house", [], GenerationOptions(text=GREEDY, image=GREEDY,
                                                                        max_new_tokens=160), "x2i-free")
    assert req.target_grid is None
    ids = engine.generate_ids(req)
    start = ids.index(tok.ids.boi)
    header = ids[start + 1:ids.index(tok.ids.img, start)]
    assert len(header) == 5 and header[2] == tok.star_id
    h = 10 * tok.digit_value(header[0]) + tok.digit_value(header[1])
    w = 10 * tok.digit_value(header[3]) + tok.digit_value(header[4])
    assert 10 <= h <= 99 and 10 <= w <= 99
    (image,) = [s for s in parse(tok, ids) if isinstance(s, (ImageSegment, IncompleteImageSegment))]
    assert (image.height, image.width) == (h, w)
