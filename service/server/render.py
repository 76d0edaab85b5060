"""Finished generations and run events → the API's JSON bodies and SSE messages.

Nothing here encodes a generated image to PNG: the task layer made one PNG per image, and the record,
the SSE ``image`` event and the JSON answer all send those bytes. Only previews (partial images) and
other output formats (JPEG, WebP) are encoded here.
"""

from __future__ import annotations

import json
from typing import Any

from service.server.errors import APIError
from service.server.image_io import b64, encode_image
from service.server.protocol import (
    GenerationResponse,
    ImageData,
    OpenAIImage,
    OpenAIImageParams,
    OpenAIImagesResponse,
    OpenAIInputTokensDetails,
    OpenAIUsage,
    SegmentData,
    Timings,
    UsageData,
)
from service.task import ImageProgress, ImageReady, ImageStart, Outcome, TextOut

#: Fields of the JSON answer that the SSE ``done`` event repeats (images went out as ``image`` events).
DONE_FIELDS = ("id", "task", "text", "segments", "usage", "finish_reason", "timings")


def generation_body(out: Outcome, model: str, created: int) -> dict[str, Any]:
    """The JSON answer of an Emu3.5 endpoint (base64 is CPU work: call off the event loop)."""
    images = [ImageData(b64_json=b64(png), width=im.width, height=im.height) for im, png in zip(out.images, out.pngs)]
    return GenerationResponse(
        id=out.request_id, created=created, model=model, task=out.task, images=images, text=out.text,
        segments=[SegmentData(type=p.type, text=p.text, image_index=p.image_index) for p in out.parts],
        record=b64(out.record),
        usage=UsageData(prompt_tokens=out.usage.prompt_tokens, completion_tokens=out.usage.completion_tokens,
                        visual_tokens=out.usage.visual_tokens),
        finish_reason=out.finish_reason,
        timings=Timings(seconds=round(out.seconds, 4), time_to_first_token=out.time_to_first_token),
    ).model_dump(mode="json", exclude_none=True)


def done_event(out: Outcome, record_url: str | None, include_record: bool) -> dict[str, Any]:
    """The ``done`` event: the answer without its images, and where the record is (its URL when records
    are stored; the record itself only when the client asked for it)."""
    data: dict[str, Any] = {
        "id": out.request_id, "task": out.task.value, "text": out.text,
        "segments": [SegmentData(type=p.type, text=p.text, image_index=p.image_index).model_dump(exclude_none=True)
                     for p in out.parts],
        "usage": UsageData(prompt_tokens=out.usage.prompt_tokens, completion_tokens=out.usage.completion_tokens,
                           visual_tokens=out.usage.visual_tokens).model_dump(),
        "finish_reason": out.finish_reason,
        "timings": Timings(seconds=round(out.seconds, 4), time_to_first_token=out.time_to_first_token).model_dump(),
        "record_id": out.request_id,
    }
    if record_url is not None:
        data["record_url"] = record_url
    if include_record:
        data["record"] = b64(out.record)
    return data


def sse_message(ev: Any) -> dict[str, str]:
    """One run event (all but ``Finished``) as an SSE message. Previews are PNG-encoded here (CPU work:
    call off the event loop); finished images reuse the task layer's PNG."""
    name: str
    data: dict[str, Any]
    if isinstance(ev, TextOut):
        name, data = ev.channel, {"delta": ev.delta}
    elif isinstance(ev, ImageStart):
        name, data = "image_start", {"index": ev.index, "width": ev.width, "height": ev.height}
    elif isinstance(ev, ImageProgress):
        name, data = "image_progress", {"index": ev.index, "rows": ev.rows, "total_rows": ev.total_rows}
        if ev.preview is not None:
            data["b64_json"] = b64(encode_image(ev.preview, "png"))
    elif isinstance(ev, ImageReady):
        name = "image"
        data = {"index": ev.index, "b64_json": b64(ev.png), "width": ev.image.width, "height": ev.image.height}
    else:  # pragma: no cover - every event type is handled by the caller or above
        raise TypeError(f"unknown event {ev!r}")
    return {"event": name, "data": json.dumps(data)}


def openai_images_body(outcomes: list[Outcome], p: OpenAIImageParams, created: int) -> dict[str, Any]:
    """OpenAI's image answer: the first image of each generation, in the asked format."""
    fmt = p.output_format or "png"
    data = []
    for out in outcomes:
        if not out.images:
            raise APIError(500, f"generation {out.request_id} ended without an image ({out.finish_reason})",
                           "no_image")
        encoded = out.pngs[0] if fmt == "png" else encode_image(out.images[0], fmt, p.output_compression)
        data.append(OpenAIImage(b64_json=b64(encoded)))
    first = outcomes[0].images[0]
    prompt = sum(o.usage.prompt_tokens for o in outcomes)
    prompt_images = sum(o.usage.prompt_visual_tokens for o in outcomes)
    output = sum(o.usage.completion_tokens for o in outcomes)
    usage = OpenAIUsage(input_tokens=prompt, output_tokens=output, total_tokens=prompt + output,
                        input_tokens_details=OpenAIInputTokensDetails(text_tokens=prompt - prompt_images,
                                                                      image_tokens=prompt_images))
    return OpenAIImagesResponse(created=created, data=data, output_format=fmt, size=f"{first.width}x{first.height}",
                                usage=usage).model_dump(mode="json")
