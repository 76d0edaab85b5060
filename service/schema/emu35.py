"""The Emu3.5 routes' request and response models (they are also the OpenAPI schema); a batch JSONL line is a
``GenerateRequest`` too.

Requests forbid unknown fields: a typo such as ``guidence_scale`` is a 400 naming the field, not a
silently ignored setting. Numbers and booleans are strict (``"seed": "1"``, ``"stream": 0`` and
``"guidance_scale": "3"`` are 400s, as the document's types say); multipart forms, which carry only
text, are converted first (``service.server.core.deps``). Defaults are the task's (design.md §4) unless a field is given.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from service.limits import (
    MAX_GUIDANCE_SCALE,
    MAX_IMAGE_AREA,
    MAX_PREVIEWS_PER_IMAGE,
    MAX_REFERENCE_IMAGES,
    MAX_SEED,
    MIN_GUIDANCE_SCALE,
    MIN_IMAGE_AREA,
)
from service.prompts import ASPECT_RATIOS, Task
from service.schema.common import (
    DECODING_FIELD_DESCRIPTION,
    EXAMPLE_PNG,
    WEBHOOK_FIELD_DESCRIPTION,
    DecodingData,
    DecodingParams,
    Prompt,
    SamplingOverrides,
    _examples,
    _Strict,
)
from service.types import UncondMode


class GenerationParams(_Strict):
    """Fields every Emu3.5 generation endpoint takes."""

    prompt: Prompt = Field(..., description="the user's question / instruction")
    size: str | None = Field(
        None, description="'WIDTHxHEIGHT' in pixels (multiples of 16), 'auto' (the model chooses), "
                          "'match_reference' (the last reference image's grid) or an aspect ratio")
    aspect_ratio: str | None = Field(
        None, description=f"one of {', '.join(ASPECT_RATIOS)}, 'default' or 'auto'; scaled to the image area")
    guidance_scale: float | None = Field(None, ge=MIN_GUIDANCE_SCALE, le=MAX_GUIDANCE_SCALE, strict=True,
                                          description="classifier-free guidance scale")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True)
    max_new_tokens: int | None = Field(None, ge=1, strict=True, description="cap on generated tokens")
    text_sampling: SamplingOverrides | None = None
    image_sampling: SamplingOverrides | None = None
    image_area: int | None = Field(None, ge=MIN_IMAGE_AREA, le=MAX_IMAGE_AREA, strict=True,
                                   description="pixels of generated and reference images (aspect sizes scale)")
    webhook: str | None = Field(None, max_length=2048, description=WEBHOOK_FIELD_DESCRIPTION)
    uncond_mode: UncondMode = Field(
        "lockstep", description="what the guidance (unconditional) branch sees: 'lockstep' every generated "
                                "token, as the release's vLLM path; 'reference' only the generated images, as "
                                "its transformers path. The same for T2I/X2I; interleaved answers differ")
    decoding: DecodingParams | None = Field(None, description=DECODING_FIELD_DESCRIPTION)
    stream: bool = Field(False, strict=True, description="answer as server-sent events")
    preview_every_rows: int | None = Field(
        None, ge=1, strict=True, description="when streaming, attach a decoded preview every N rows of an image "
                                              f"(at most {MAX_PREVIEWS_PER_IMAGE} per image)")
    include_record: bool = Field(
        False, strict=True, description="when streaming, put the whole record (base64) in the done event; by "
                                        "default it names the record (record_id, and record_url when records are "
                                        "stored)")

    @field_validator("aspect_ratio")
    @classmethod
    def _known_ratio(cls, v: str | None) -> str | None:
        if v is not None and v not in ASPECT_RATIOS and v not in ("default", "auto"):
            raise ValueError(f"unknown aspect ratio {v!r}; use one of {', '.join(ASPECT_RATIOS)}, default, auto")
        return v

    @model_validator(mode="after")
    def _one_size(self) -> "GenerationParams":
        if self.size is not None and self.aspect_ratio is not None:
            raise ValueError("give either size or aspect_ratio, not both")
        return self

    def size_spec(self) -> str | None:
        """The size as the prompt layer's size specification (None: the task's default)."""
        if self.aspect_ratio is not None:
            return self.aspect_ratio
        return self.size


class ImageInputs(_Strict):
    images: list[str] = Field(default_factory=list, max_length=MAX_REFERENCE_IMAGES,
                              description="reference images: base64 or data URLs (PNG, JPEG, WebP, BMP, GIF)")


class T2IRequest(GenerationParams):
    """Text to image."""

    model_config = _examples({"prompt": "a red fox in the snow, watercolour", "aspect_ratio": "1:1", "seed": 42})


class X2IRequest(GenerationParams, ImageInputs):
    """Any to image: edit or compose from 1 to MAX_REFERENCE_IMAGES reference images."""

    model_config = _examples({"prompt": "make it night", "images": [f"data:image/png;base64,{EXAMPLE_PNG}"], "seed": 7})

    images: list[str] = Field(..., min_length=1, max_length=MAX_REFERENCE_IMAGES,
                              description=f"1–{MAX_REFERENCE_IMAGES} reference images: base64 or data URLs")


class InterleavedRequest(GenerationParams, ImageInputs):
    """Visual guidance / narrative: interleaved text and images, optionally from reference images."""

    model_config = _examples({"prompt": "a little robot explores an old city", "seed": 3})


class GenerateRequest(InterleavedRequest):
    """Any task, named explicitly (``explore``, ``vla``, or any of the others)."""

    model_config = _examples({"task": "explore", "prompt": "the old house by the river", "seed": 5})

    task: Task


# ---- responses ------------------------------------------------------------------------------------


class ImageData(BaseModel):
    b64_json: str = Field(..., description="PNG, base64")
    width: int
    height: int


class SegmentData(BaseModel):
    type: Literal["text", "image", "global_cot", "image_cot"]
    text: str | None = None
    image_index: int | None = None


class UsageData(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    visual_tokens: int


class Timings(BaseModel):
    seconds: float
    time_to_first_token: float | None = Field(None, description="absent when nothing was generated")
    decode_steps: int = Field(0, description="forward passes whose logits chose this answer's tokens (the prefill "
                                             "counted when it chose the first): one per token on the "
                                             "autoregressive engines, H+W−1 per H×W image on FlashAR")
    tokens_per_pass: float | None = Field(
        None, description="completion tokens per decode step: 1 for one token per pass, more under jacobi, zipar and "
                          "FlashAR (absent when nothing was generated)")
    decoding: DecodingData | None = Field(
        None, description="the schedule the images were drawn with, the engine's defaults filled in (absent on an "
                          "engine that offers none to choose)")


class GenerationResponse(BaseModel):
    id: str
    object: Literal["emu35.generation"] = "emu35.generation"
    created: int
    model: str
    task: Task
    images: list[ImageData]
    text: str
    segments: list[SegmentData]
    record: str = Field(..., description="the emu3p5.story.Story record (.pb), base64")
    usage: UsageData
    finish_reason: Literal["stop", "length", "abort"]
    timings: Timings


# ---- server-sent events of the Emu3.5 endpoints: the ``data`` of each event, by event name ------------


class TextDeltaData(BaseModel):
    """``text``, ``global_cot``, ``image_cot``: text as it is generated."""

    delta: str


class ImageStartData(BaseModel):
    index: int
    width: int
    height: int


class ImageProgressData(BaseModel):
    index: int
    rows: int
    total_rows: int
    b64_json: str | None = Field(None, description="a PNG of the rows drawn so far, at the preview rows only "
                                                   "(FlashAR: of the diagonals drawn so far, the rest grey)")
    diagonals: int | None = Field(None, description="FlashAR only: anti-diagonals drawn (an H×W image has H+W−1)")
    total_diagonals: int | None = None


class StreamImageData(ImageData):
    """``image``: a finished image."""

    index: int


class DoneData(BaseModel):
    """``done``: the answer without its images, naming its record."""

    id: str
    task: Task
    text: str
    segments: list[SegmentData]
    usage: UsageData
    finish_reason: Literal["stop", "length", "abort"]
    timings: Timings
    record_id: str
    record_url: str | None = Field(None, description="where the record is, when records are stored")
    record: str | None = Field(None, description="the record (base64), with include_record: true")


class StreamErrorData(BaseModel):
    """``error``: the generation failed after the stream started (``shutting_down``,
    ``engine_unavailable`` or ``generation_failed``)."""

    message: str
    code: str


#: Every event of an Emu3.5 stream and the model of its data.
GENERATION_EVENTS: dict[str, type[BaseModel]] = {
    "text": TextDeltaData, "global_cot": TextDeltaData, "image_cot": TextDeltaData, "image_start": ImageStartData,
    "image_progress": ImageProgressData, "image": StreamImageData, "done": DoneData, "error": StreamErrorData,
}


