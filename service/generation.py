"""The task layer's pipeline: request → prompts → engine → parsed segments → decoded images → record.

This synchronous form drives the reference engine for tools, the demo and tests; the HTTP layer reuses
its pieces (``plan_request``, ``record_items``) around the asynchronous engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from service.engine.request import GenerationRequest, SamplingSettings
from service.prompts import ModelVariant, Task, build_prompts, defaults_for, parse_size_spec, resolve_target_grid
from service.record import RecordGlobalCot, RecordImage, RecordImageCot, RecordItem, RecordText, build_story, story_pb2
from service.token_layout import (
    GlobalCotSegment,
    ImageCotSegment,
    ImageSegment,
    IncompleteImageSegment,
    Segment,
    TextSegment,
    parse,
)
from service.tokenizer import Emu35Tokenizer


class TokenEngine(Protocol):
    def generate_ids(self, req: GenerationRequest) -> list[int]: ...


class ImageCodec(Protocol):
    def encode(self, images: Sequence[Image.Image], area: int | None) -> list[np.ndarray]: ...

    def decode(self, grids: Sequence[np.ndarray]) -> list[Image.Image]: ...


@dataclass(frozen=True)
class GenerationOptions:
    """Per-request overrides; None takes the (task, model variant) default of DESIGN §4."""

    size: str | None = None
    cfg_scale: float | None = None
    max_new_tokens: int | None = None
    text: SamplingSettings | None = None
    image: SamplingSettings | None = None
    seed: int | None = None
    image_area: int | None = None  # pixels; reference images are resized to it, sizes scale with it
    variant: ModelVariant = ModelVariant.EMU35


def plan_request(tok: Emu35Tokenizer, task: Task | str, question: str, reference_grids: Sequence[np.ndarray],
                 options: GenerationOptions, request_id: str, max_model_len: int | None = None) -> GenerationRequest:
    """Everything the engine needs for one generation, with the task's defaults filled in.

    With ``max_model_len`` a default ``max_new_tokens`` is cut to what the context leaves after the
    prompt (the release's 32,768 for interleaved tasks would otherwise never fit); an explicit one is
    left for the engine to accept or refuse.
    """
    task = Task(task)
    d = defaults_for(task, options.variant)
    prompts = build_prompts(tok, task, question, reference_grids)
    max_new = options.max_new_tokens or d.max_new_tokens
    if max_model_len is not None and options.max_new_tokens is None:
        room = max_model_len - max(len(prompts.cond), len(prompts.uncond))
        if room < 1:
            raise ValueError(f"the prompt ({len(prompts.cond)} tokens) leaves no room in the model's context "
                             f"of {max_model_len} tokens")
        max_new = min(max_new, room)
    area = options.image_area or d.image_area
    if options.size:
        spec = parse_size_spec(options.size, area)
    elif options.image_area:
        spec = parse_size_spec(d.default_size_with_images if reference_grids else d.default_size, area)
    else:
        spec = d.size_spec(bool(reference_grids))
    target = resolve_target_grid(spec, [g.shape for g in reference_grids])
    stop = (tok.ids.eoi,) if d.stop == "eoi" else (tok.ids.eos,)
    return GenerationRequest(
        request_id=request_id,
        cond_prompt=prompts.cond,
        uncond_prompt=prompts.uncond,
        cfg_scale=d.cfg_scale if options.cfg_scale is None else options.cfg_scale,
        text_sampling=options.text or d.text,
        image_sampling=options.image or d.image,
        max_new_tokens=max_new,
        stop_token_ids=stop,
        target_grid=target,
        seed=options.seed,
    )


def record_items(segments: Sequence[Segment], images: Sequence[Image.Image]) -> list[RecordItem]:
    """Parsed segments → record items, pairing the i-th complete image with ``images[i]``. Whitespace-only
    text and a trailing incomplete image are left out of the record."""
    items: list[RecordItem] = []
    pictures = iter(images)
    for seg in segments:
        if isinstance(seg, TextSegment) and seg.text.strip():
            items.append(RecordText(seg.text))
        elif isinstance(seg, GlobalCotSegment):
            items.append(RecordGlobalCot(seg.text))
        elif isinstance(seg, ImageCotSegment):
            items.append(RecordImageCot(seg.text))
        elif isinstance(seg, ImageSegment):
            items.append(RecordImage(next(pictures)))
    return items


@dataclass
class GenerationResult:
    request: GenerationRequest
    ids: list[int]
    segments: list[Segment]
    images: list[Image.Image]
    story: story_pb2.Story
    incomplete: bool = field(default=False)


def generate(engine: TokenEngine, vq: ImageCodec, tok: Emu35Tokenizer, task: Task | str, question: str,
             reference_images: Sequence[Image.Image] = (), options: GenerationOptions = GenerationOptions(),
             request_id: str = "gen") -> GenerationResult:
    """Run one generation end to end."""
    area = options.image_area or defaults_for(task, options.variant).image_area
    grids = vq.encode(list(reference_images), area=area) if reference_images else []
    req = plan_request(tok, task, question, grids, options, request_id)
    ids = engine.generate_ids(req)
    segments = parse(tok, ids)
    images = vq.decode([s.codes for s in segments if isinstance(s, ImageSegment)])
    story = build_story(question, list(reference_images), record_items(segments, images), story_id=request_id)
    incomplete = any(isinstance(s, IncompleteImageSegment) for s in segments)
    return GenerationResult(req, ids, segments, images, story, incomplete)
