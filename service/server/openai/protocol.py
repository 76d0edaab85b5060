"""OpenAI's image API: request and response models (they are also the OpenAPI schema).

Unlike the Emu3.5 routes, unknown fields are accepted (and logged): the official client adds fields over
time, and a client that sends one must keep working.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.limits import (
    MAX_GUIDANCE_SCALE,
    MAX_IMAGE_AREA,
    MAX_IMAGES_PER_REQUEST,
    MAX_PARTIAL_IMAGES,
    MAX_SEED,
    MIN_GUIDANCE_SCALE,
    MIN_IMAGE_AREA,
)
from service.schema.common import (
    DECODING_FIELD_DESCRIPTION,
    WEBHOOK_FIELD_DESCRIPTION,
    DecodingParams,
    ErrorDetail,
    Prompt,
    SamplingOverrides,
)

#: OpenAI's ``quality`` values (``standard`` / ``hd``: DALL·E's); what each maps to is in openai_images.py.
OpenAIQuality = Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"]
OpenAIOutputFormat = Literal["png", "jpeg", "webp"]


class OpenAIImageParams(BaseModel):
    """OpenAI's image request fields plus Emu3.5's own (``guidance_scale``, ``seed``, ``image_area``,
    ``max_new_tokens``, sampling, ``decoding``) as extensions.

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
    decoding: DecodingParams | None = Field(None, description=DECODING_FIELD_DESCRIPTION)
    webhook: str | None = Field(None, max_length=2048, description=WEBHOOK_FIELD_DESCRIPTION)

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


