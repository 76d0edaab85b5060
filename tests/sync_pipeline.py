"""A synchronous generation for tests and tools: plan → reference engine → parse → VQ → record.

The service runs generations asynchronously (``service.task.runner``); this drives the same planner,
parser and answer builder with the synchronous reference engine, so tests can check the pieces end to end
without an event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from service.record import build_story, encode_png, story_pb2
from service.task import AnswerBuilder, GenerationOptions, resolve
from service.task.planner import build_request
from service.token_layout import ImageSegment, IncompleteImageSegment, Segment, parse
from service.types import GenerationRequest


@dataclass
class GenerationResult:
    request: GenerationRequest
    ids: list[int]
    segments: list[Segment]
    images: list[Image.Image]
    story: story_pb2.Story
    incomplete: bool


def generate(engine, vq, tok, task, question: str, reference_images: Sequence[Image.Image] = (),
             options: GenerationOptions = GenerationOptions(), request_id: str = "gen") -> GenerationResult:
    """Run one generation end to end."""
    plan = resolve(task, options)
    grids = vq.encode(list(reference_images), area=plan.image_area) if reference_images else []
    req = build_request(tok, plan, question, grids, request_id)
    ids = engine.generate_ids(req)
    segments = parse(tok, ids)
    answer = AnswerBuilder()
    for image in vq.decode([s.codes for s in segments if isinstance(s, ImageSegment)]):
        answer.add_image(image, encode_png(image))
    for segment in segments:
        answer.add_segment(segment)
    story = build_story(question, list(reference_images), answer.record_items, story_id=request_id)
    incomplete = any(isinstance(s, IncompleteImageSegment) for s in segments)
    return GenerationResult(req, ids, segments, answer.images, story, incomplete)
