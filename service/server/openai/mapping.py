"""How OpenAI's image fields map onto Emu3.5 generations: the one place that decides it.

* ``quality`` is an image-area preset, a fraction of the service's image area (``--image-area``, else
  the task's 1024²): ``low`` ¼ (512² at 1024²), ``medium`` and DALL·E's ``standard`` 9⁄16 (768²),
  ``high`` / ``auto`` / ``xhigh`` / ``max`` / ``hd`` the whole area. Fewer pixels are fewer tokens, so
  lower quality is proportionally faster. ``image_area`` (an extension) wins over it.
* ``size``: ``auto`` (or none) is the 4:3 grid at that area for generations and the last reference
  image's grid for edits. ``WIDTHxHEIGHT`` needs sides that are multiples of 16 and an aspect between
  1:3 and 3:1 (else 400, as OpenAI answers). Within the area it is drawn exactly; over it, it is scaled
  down to the nearest grid of the same aspect inside the area (at 1024²: ``1536x1024`` → 1248x832, the
  release's own 3:2 grid). The answer's ``size`` says what was drawn.
* ``output_format`` png (the task layer's PNG, reused), jpeg or webp with ``output_compression`` as the
  encoder's quality (default 100, as OpenAI's).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Mapping

from service.limits import MAX_SIZE_ASPECT
from service.prompts import Task, is_pixel_size, parse_size
from service.server.core.errors import bad_request

#: quality asked → (quality reported, fraction of the image area).
QUALITY_PRESETS: Mapping[str, tuple[str, float]] = MappingProxyType({
    "low": ("low", 1 / 4),
    "medium": ("medium", 9 / 16),
    "standard": ("medium", 9 / 16),
    "high": ("high", 1.0),
    "auto": ("high", 1.0),
    "hd": ("high", 1.0),
    "xhigh": ("xhigh", 1.0),
    "max": ("max", 1.0),
})

#: Encoder quality for jpeg/webp when ``output_compression`` is not given (OpenAI's default).
DEFAULT_COMPRESSION = 100


@dataclass(frozen=True)
class OpenAIOutput:
    """How a request's images are presented: format, encoder quality, the quality reported, and the
    event-name family of a stream (``image_generation`` or ``image_edit``)."""

    output_format: Literal["png", "jpeg", "webp"]
    compression: int
    quality: str
    events: Literal["image_generation", "image_edit"]
    partial_images: int

    def event_type(self, kind: Literal["partial_image", "completed"]) -> str:
        return f"{self.events}.{kind}"


def quality_preset(quality: str | None) -> tuple[str, float]:
    """(reported quality, area fraction) of an OpenAI ``quality`` (None: ``auto``)."""
    return QUALITY_PRESETS[quality or "auto"]


def size_spec(size: str | None, task: Task) -> str | None:
    """An OpenAI ``size`` as the planner's size specification (None: the task's default); the planner
    checks the multiples of 16 and fits the grid to the area. Raises a 400 naming ``size``."""
    if size is None or size.strip() == "auto":
        return "match_reference" if task is Task.X2I else None
    if not is_pixel_size(size):
        raise bad_request(f"size must be 'auto' or WIDTHxHEIGHT in pixels, got {size!r}", "invalid_value", "size")
    width, height = parse_size(size)
    if min(width, height) < 1:
        raise bad_request(f"size {size!r} has a zero side", "invalid_value", "size")
    if max(width, height) > MAX_SIZE_ASPECT * min(width, height):
        raise bad_request(f"size {size!r}: the aspect ratio must lie between 1:{MAX_SIZE_ASPECT} and "
                          f"{MAX_SIZE_ASPECT}:1", "invalid_value", "size")
    return size
