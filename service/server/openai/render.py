"""Finished generations and run events → OpenAI's image answers and stream events.

Only previews (partial images) and other output formats (JPEG, WebP) are encoded here; a finished PNG is
the task layer's.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from service.schema.common import ErrorDetail
from service.server.core.errors import APIError
from service.server.core.image_io import b64, encode_image
from service.server.openai.mapping import OpenAIOutput
from service.server.openai.protocol import (
    OpenAIImage,
    OpenAIImageEvent,
    OpenAIImagesResponse,
    OpenAIInputTokensDetails,
    OpenAIOutputTokensDetails,
    OpenAIStreamError,
    OpenAIUsage,
)
from service.task import Finished, ImageProgress, ImageStart, Outcome, Usage


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
