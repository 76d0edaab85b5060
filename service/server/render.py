"""Finished generations and run events → the API's JSON bodies and SSE messages.

Nothing here encodes a generated image to PNG: the task layer made one PNG per image, and the record,
the SSE ``image`` event and the JSON answer all send those bytes. Only previews (partial images) and
other output formats (JPEG, WebP) are encoded here.
"""

from __future__ import annotations

from typing import Any

from PIL import Image
from pydantic import BaseModel

from service.server.errors import APIError
from service.server.image_io import b64, encode_image
from service.server.openai_images import OpenAIOutput
from service.server.protocol import (
    DoneData,
    ErrorDetail,
    GenerationResponse,
    ImageData,
    ImageProgressData,
    ImageStartData,
    OpenAIImage,
    OpenAIImageEvent,
    OpenAIImagesResponse,
    OpenAIInputTokensDetails,
    OpenAIOutputTokensDetails,
    OpenAIStreamError,
    OpenAIUsage,
    SegmentData,
    StreamErrorData,
    StreamImageData,
    TextDeltaData,
    Timings,
    UsageData,
)
from service.task import Finished, ImageProgress, ImageReady, ImageStart, Outcome, TextOut, Usage


def _segments(out: Outcome) -> list[SegmentData]:
    return [SegmentData(type=p.type, text=p.text, image_index=p.image_index) for p in out.parts]


def _usage(out: Outcome) -> UsageData:
    return UsageData(prompt_tokens=out.usage.prompt_tokens, completion_tokens=out.usage.completion_tokens,
                     visual_tokens=out.usage.visual_tokens)


def _timings(out: Outcome) -> Timings:
    return Timings(seconds=round(out.seconds, 4), time_to_first_token=out.time_to_first_token)


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
                                                         b64_json=preview))
    if isinstance(ev, ImageReady):
        return event("image", StreamImageData(index=ev.index, b64_json=b64(ev.png), width=ev.image.width,
                                              height=ev.image.height))
    raise TypeError(f"unknown event {ev!r}")  # pragma: no cover - the caller handles Finished


def _openai_usage(usages: list[Usage]) -> OpenAIUsage:
    """OpenAI's usage from the real token counts: the cond prompt's text and reference-image tokens in,
    the generated tokens out (visual tokens as image tokens, the header and row ends as text)."""
    prompt = sum(u.prompt_tokens for u in usages)
    prompt_images = sum(u.prompt_visual_tokens for u in usages)
    output = sum(u.completion_tokens for u in usages)
    output_images = sum(u.visual_tokens for u in usages)
    return OpenAIUsage(
        input_tokens=prompt, output_tokens=output, total_tokens=prompt + output,
        input_tokens_details=OpenAIInputTokensDetails(text_tokens=prompt - prompt_images, image_tokens=prompt_images),
        output_tokens_details=OpenAIOutputTokensDetails(text_tokens=output - output_images, image_tokens=output_images))


def _first_image(out: Outcome) -> tuple[Image.Image, bytes]:
    if not out.images:
        raise APIError(500, f"generation {out.request_id} ended without an image ({out.finish_reason})", "no_image")
    return out.images[0], out.pngs[0]


def _encoded(image: Image.Image, png: bytes | None, style: OpenAIOutput) -> bytes:
    """The image in the asked format (PNG: the task layer's bytes when there are some)."""
    if style.output_format == "png":
        return png if png is not None else encode_image(image, "png")
    return encode_image(image, style.output_format, style.compression)


def openai_images_body(outcomes: list[Outcome], style: OpenAIOutput, created: int) -> dict[str, Any]:
    """OpenAI's image answer: the first image of each generation, in the asked format (CPU work: call
    off the event loop)."""
    firsts = [_first_image(out) for out in outcomes]
    data = [OpenAIImage(b64_json=b64(_encoded(image, png, style))) for image, png in firsts]
    first = firsts[0][0]
    return OpenAIImagesResponse(created=created, data=data, output_format=style.output_format, quality=style.quality,
                                size=f"{first.width}x{first.height}",
                                usage=_openai_usage([o.usage for o in outcomes])).model_dump(mode="json")


#: Grey of the rows a partial image has not drawn yet (the VQ's zero point: "blank").
PARTIAL_FILL = (127, 127, 127)


class OpenAIStreamRenderer:
    """One streamed OpenAI request's events → SSE messages: ``<family>.partial_image`` for each preview
    (the rows drawn so far on a blank canvas of the final size) and ``<family>.completed`` with the
    image and its usage when a generation finishes. ``image_index`` says which of the n images an
    event belongs to; ``partial_image_index`` counts each image's partials from 0. Everything else the
    runner reports (row progress without a preview, image start) is not sent."""

    def __init__(self, style: OpenAIOutput) -> None:
        self.style = style
        self.sizes: dict[int, tuple[int, int]] = {}
        self.partials: dict[int, int] = {}

    def encodes(self, ev: Any) -> bool:
        """Whether :meth:`message` encodes an image for ``ev`` (CPU work worth a thread)."""
        return isinstance(ev, Finished) or (isinstance(ev, ImageProgress) and ev.preview is not None)

    def message(self, image_index: int, ev: Any, created_at: int) -> dict[str, str] | None:
        """The SSE message of one run event of generation ``image_index``, or None (CPU work: call off
        the event loop)."""
        if isinstance(ev, ImageStart):
            self.sizes[image_index] = (ev.width, ev.height)
            return None
        if isinstance(ev, ImageProgress) and ev.preview is not None and self.style.partial_images:
            number = self.partials.get(image_index, 0)
            self.partials[image_index] = number + 1
            canvas = self._canvas(image_index, ev.preview)
            return self._event("partial_image", image_index, canvas, None, created_at, partial_image_index=number)
        if isinstance(ev, Finished):
            image, png = _first_image(ev.outcome)
            return self._event("completed", image_index, image, png, created_at,
                               usage=_openai_usage([ev.outcome.usage]))
        return None

    def _canvas(self, image_index: int, preview: Image.Image) -> Image.Image:
        width, height = self.sizes.get(image_index, preview.size)
        canvas = Image.new("RGB", (width, height), PARTIAL_FILL)
        canvas.paste(preview, (0, 0))
        return canvas

    def _event(self, kind: Any, image_index: int, image: Image.Image, png: bytes | None, created_at: int,
               **extra: Any) -> dict[str, str]:
        event = OpenAIImageEvent(type=self.style.event_type(kind), b64_json=b64(_encoded(image, png, self.style)),
                                 created_at=created_at, output_format=self.style.output_format,
                                 quality=self.style.quality, size=f"{image.width}x{image.height}",
                                 image_index=image_index, **extra)
        return {"event": event.type, "data": event.model_dump_json(exclude_none=True)}


def openai_error_event(message: str, code: str) -> dict[str, str]:
    """A failure after the stream started, in the shape the official client raises as an APIError."""
    error = ErrorDetail(message=message, type="server_error", param=None, code=code)
    return {"event": "error", "data": OpenAIStreamError(error=error).model_dump_json()}
