"""The API's request and response models (they are also the OpenAPI schema).

Requests forbid unknown fields: a typo such as ``guidence_scale`` is a 400 naming the field, not a
silently ignored setting. Numbers and booleans are strict (``"seed": "1"``, ``"stream": 0`` and
``"guidance_scale": "3"`` are 400s, as the document's types say); multipart forms, which carry only
text, are converted first (``service.server.deps``). Defaults are the task's (design.md §4) unless a field is given.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from service.limits import (
    MAX_GUIDANCE_SCALE,
    MAX_IMAGE_AREA,
    MAX_IMAGES_PER_REQUEST,
    MAX_PARTIAL_IMAGES,
    MAX_PREVIEWS_PER_IMAGE,
    MAX_PROMPT_CHARS,
    MAX_REFERENCE_IMAGES,
    MAX_SEED,
    MAX_TEMPERATURE,
    MIN_GUIDANCE_SCALE,
    MIN_IMAGE_AREA,
)
from service.prompts import ASPECT_RATIOS, Task
from service.types import UncondMode


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("prompt must not be empty")
    return v


#: A user prompt: non-blank text of bounded length (the document says minLength 1; a pattern saying "not
#: only spaces" would cost schema tools seconds over a 100,000-character limit).
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS, json_schema_extra={"minLength": 1}),
                   AfterValidator(_not_blank)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: A 16×16 px PNG (base64) for the documented examples: Swagger UI's "Try it out" sends them as they are.
EXAMPLE_PNG = ("iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAIAAACQkWg2AAAAGklEQVR42mPUiDrBQApgYiARjGoY1TB0NAAAI7gBavYfh54AAAAA"
               "SUVORK5CYII=")


def _examples(*examples: dict) -> ConfigDict:
    """A request model's documented examples (its JSON schema's ``examples``)."""
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class SamplingOverrides(_Strict):
    """Sampling of one kind of token; a missing field keeps the task's default."""

    top_k: int | None = Field(None, ge=1, strict=True, description="keep the k most likely tokens")
    top_p: float | None = Field(None, gt=0, le=1, strict=True, description="nucleus mass")
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, strict=True, description="0 = greedy")


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
    uncond_mode: UncondMode = Field(
        "lockstep", description="what the guidance (unconditional) branch sees: 'lockstep' every generated "
                                "token, as the release's vLLM path; 'reference' only the generated images, as "
                                "its transformers path. The same for T2I/X2I; interleaved answers differ")
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
    b64_json: str | None = Field(None, description="a PNG of the rows drawn so far, at the preview rows only")


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


class ServiceStatus(BaseModel):
    """``/health`` and ``/ready``: the service's state, and why it is not ready when that is known."""

    status: Literal["ok", "ready", "loading", "failed", "draining", "stopped", "dead"]
    error: str | None = Field(None, description="why the start failed or the engine died; only to a caller "
                                                "with the API key when one is set (it may name files)")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- OpenAI-compatible image API ------------------------------------------------------------------


#: OpenAI's ``quality`` values (``standard`` / ``hd``: DALL·E's); what each maps to is in openai_images.py.
OpenAIQuality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]
OpenAIOutputFormat = Literal["png", "jpeg", "webp"]


class OpenAIImageParams(BaseModel):
    """OpenAI's image request fields plus Emu3.5's own (``guidance_scale``, ``seed``, ``image_area``,
    ``max_new_tokens``, sampling) as extensions.

    Unlike the Emu3.5 routes, unknown fields are accepted (and logged): the official client adds fields
    over time, and a client that sends one must keep working. Known fields are checked strictly; a value
    Emu3.5 cannot honour is a 400 naming the field."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [
        {"prompt": "a lighthouse at dusk", "size": "1024x1024", "quality": "low", "seed": 1}]})

    prompt: Prompt
    model: str | None = Field(None, description="the served model name (or omitted)")
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST, strict=True,
                   description=f"images to make (1–{MAX_IMAGES_PER_REQUEST}), each its own guided generation, "
                               "run concurrently; seeds seed, seed+1, …")
    size: str | None = Field(None, description="'auto' or WIDTHxHEIGHT (multiples of 16, aspect 1:3 … 3:1); "
                                                "a size over the image area is scaled down to the nearest grid")
    quality: OpenAIQuality | None = Field(None, description="image area preset: low ¼, medium 9⁄16, high (and auto, "
                                                            "xhigh, max, hd) the whole image area; standard = medium")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="only b64_json")
    output_format: OpenAIOutputFormat | None = Field(None, description="png (default), jpeg or webp")
    output_compression: int | None = Field(None, ge=0, le=100, strict=True,
                                           description="jpeg/webp quality 0–100 (default 100); ignored for png")
    background: Literal["auto", "opaque", "transparent"] | None = Field(None, description="transparent is refused")
    style: Literal["vivid", "natural"] | None = Field(None, description="DALL·E 3 only: accepted, no effect")
    moderation: Literal["low", "auto"] | None = Field(None, description="accepted, no effect")
    user: str | None = Field(None, description="accepted, no effect")
    safety_identifier: str | None = Field(None, description="accepted, no effect")
    stream: bool | None = Field(None, strict=True,
                                description="answer as server-sent events (partial images, then completed)")
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES, strict=True,
                                       description="partial images per image while streaming, spread over its rows")
    guidance_scale: float | None = Field(None, ge=MIN_GUIDANCE_SCALE, le=MAX_GUIDANCE_SCALE, strict=True)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True)
    image_area: int | None = Field(None, ge=MIN_IMAGE_AREA, le=MAX_IMAGE_AREA, strict=True,
                                   description="pixels of the image (and of resized reference images); wins over "
                                               "quality")
    max_new_tokens: int | None = Field(None, ge=1, strict=True)
    text_sampling: SamplingOverrides | None = None
    image_sampling: SamplingOverrides | None = None

    def unknown_fields(self) -> list[str]:
        """Names of the fields sent that this service does not know (accepted, ignored, logged)."""
        return sorted(self.model_extra or ())


class OpenAIImageEditParams(OpenAIImageParams):
    input_fidelity: Literal["high", "low"] | None = Field(
        None, description="accepted: reference images are always encoded at the image area, Emu3.5's one fidelity")


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class OpenAIInputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class OpenAIOutputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int


class OpenAIUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: OpenAIInputTokensDetails
    output_tokens_details: OpenAIOutputTokensDetails


class OpenAIImagesResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    background: Literal["opaque"] = "opaque"
    output_format: OpenAIOutputFormat
    quality: str
    size: str
    usage: OpenAIUsage


class OpenAIImageEvent(BaseModel):
    """One server-sent event of a streamed OpenAI image request (``partial_image`` or ``completed``)."""

    type: str = Field(..., description="image_generation.partial_image, image_generation.completed, "
                                       "image_edit.partial_image or image_edit.completed")
    b64_json: str
    background: Literal["opaque"] = "opaque"
    created_at: int
    output_format: OpenAIOutputFormat
    quality: str
    size: str
    image_index: int = Field(..., description="which of the n images (an extension: OpenAI streams one)")
    partial_image_index: int | None = Field(None, description="0-based, partial images only")
    usage: OpenAIUsage | None = Field(None, description="completed events only")


class OpenAIStreamError(BaseModel):
    """A failure after an OpenAI stream started, in the shape the official client raises as an APIError."""

    type: Literal["error"] = "error"
    error: ErrorDetail


def openai_events(family: str) -> dict[str, type[BaseModel]]:
    """Every event of a streamed OpenAI request of ``family`` (image_generation, image_edit)."""
    return {f"{family}.partial_image": OpenAIImageEvent, f"{family}.completed": OpenAIImageEvent,
            "error": OpenAIStreamError}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "emu35-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
