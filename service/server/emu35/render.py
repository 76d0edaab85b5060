"""Finished generations and run events → the API's JSON bodies and SSE messages.

Nothing here encodes a generated image to PNG: the task layer made one PNG per image, and the record,
the SSE ``image`` event and the JSON answer all send those bytes. Only previews (partial images) and
other output formats (JPEG, WebP) are encoded here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from service.schema.common import DecodingData
from service.schema.emu35 import (
    DoneData,
    GenerationResponse,
    ImageData,
    ImageProgressData,
    ImageStartData,
    SegmentData,
    StreamErrorData,
    StreamImageData,
    TextDeltaData,
    Timings,
    UsageData,
)
from service.server.core.image_io import b64, encode_image
from service.task import ImageProgress, ImageReady, ImageStart, Outcome, TextOut


def _segments(out: Outcome) -> list[SegmentData]:
    return [SegmentData(type=p.type, text=p.text, image_index=p.image_index) for p in out.parts]


def _usage(out: Outcome) -> UsageData:
    return UsageData(prompt_tokens=out.usage.prompt_tokens, completion_tokens=out.usage.completion_tokens,
                     visual_tokens=out.usage.visual_tokens)


def _timings(out: Outcome) -> Timings:
    d = out.decoding
    return Timings(seconds=round(out.seconds, 4), time_to_first_token=out.time_to_first_token,
                   decode_steps=out.decode_steps, tokens_per_pass=out.tokens_per_pass,
                   decoding=None if d is None else DecodingData(mode=d.mode, draft_len=d.draft_len, window=d.window))


def generation_body(out: Outcome, model: str, created: int) -> dict[str, Any]:
    """The JSON answer of an Emu3.5 endpoint (base64 is CPU work: call off the event loop)."""
    images = [ImageData(b64_json=b64(png), width=im.width, height=im.height) for im, png in zip(out.images, out.pngs)]
    return GenerationResponse(
        id=out.request_id, created=created, model=model, task=out.task, images=images, text=out.text,
        segments=_segments(out), record=b64(out.record), usage=_usage(out), finish_reason=out.finish_reason,
        timings=_timings(out),
    ).model_dump(mode="json", exclude_none=True)


def event(name: str, data: BaseModel) -> dict[str, str]:
    """One SSE message; ``data`` is the model the API document names for the event (protocol.py)."""
    return {"event": name, "data": data.model_dump_json(exclude_none=True)}


def done_event(out: Outcome, record_url: str | None, include_record: bool) -> dict[str, str]:
    """The ``done`` event: the answer without its images, and where the record is (its URL when records
    are stored; the record itself only when the client asked for it)."""
    return event("done", DoneData(
        id=out.request_id, task=out.task, text=out.text, segments=_segments(out), usage=_usage(out),
        finish_reason=out.finish_reason, timings=_timings(out), record_id=out.request_id, record_url=record_url,
        record=b64(out.record) if include_record else None))


def error_event(message: str, code: str) -> dict[str, str]:
    """A failure after an Emu3.5 stream started."""
    return event("error", StreamErrorData(message=message, code=code))


def sse_message(ev: Any) -> dict[str, str]:
    """One run event (all but ``Finished``) as an SSE message. Previews are PNG-encoded here (CPU work:
    call off the event loop); finished images reuse the task layer's PNG."""
    if isinstance(ev, TextOut):
        return event(ev.channel, TextDeltaData(delta=ev.delta))
    if isinstance(ev, ImageStart):
        return event("image_start", ImageStartData(index=ev.index, width=ev.width, height=ev.height))
    if isinstance(ev, ImageProgress):
        preview = None if ev.preview is None else b64(encode_image(ev.preview, "png"))
        return event("image_progress", ImageProgressData(index=ev.index, rows=ev.rows, total_rows=ev.total_rows,
                                                         b64_json=preview, diagonals=ev.diagonals,
                                                         total_diagonals=ev.total_diagonals))
    if isinstance(ev, ImageReady):
        return event("image", StreamImageData(index=ev.index, b64_json=b64(ev.png), width=ev.image.width,
                                              height=ev.image.height))
    raise TypeError(f"unknown event {ev!r}")  # pragma: no cover - the caller handles Finished
