"""The reference-image resize rule (design.md §4), as pure integer/float arithmetic.

This module deliberately imports nothing heavy (no torch, no numpy, no PIL) so that light layers,
such as the prompt builder that must know a reference image's grid before any VQ runs, can import it.

The rule, as the Emu3.5 release applies it to every reference image before VQ encoding:

1. keep the aspect ratio ``a = width / height`` and aim for ``area`` pixels:
   ``h0 = int(sqrt(area / a))`` and ``w0 = int(h0 * a)`` (both truncated);
2. round each side to the *nearest* multiple of 16 (halves round up): ``(x + 8) // 16 * 16``;
3. resize with bicubic filtering.

The release has no lower bound, so a very small image or a very extreme aspect ratio could round a
side to 0; we clamp each side to at least one multiple (16), which is the smallest grid the VQ can
encode. For every input where the release yields a non-zero side the result is identical.
"""

from __future__ import annotations

__all__ = ["DOWNSAMPLE", "reference_image_size", "round_to_multiple", "grid_size"]

#: Spatial downsampling of the IBQ tokenizer: one visual token per 16×16 pixels.
DOWNSAMPLE = 16


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def round_to_multiple(x: int, multiple: int = DOWNSAMPLE) -> int:
    """Round ``x`` to the nearest multiple of ``multiple`` (halves up), at least ``multiple``."""
    _check_positive_int("multiple", multiple)
    return max(multiple, ((int(x) + multiple // 2) // multiple) * multiple)


def reference_image_size(
    width: int, height: int, area: int | None, multiple: int = DOWNSAMPLE
) -> tuple[int, int]:
    """Size ``(w, h)`` a reference image of ``width × height`` pixels is resized to before encoding.

    ``area`` is the target pixel count (e.g. ``1024 * 1024`` for t2i/x2i, ``518_400`` for howto and
    story). ``area=None`` keeps the image's own size, only rounding each side to the nearest
    multiple of ``multiple`` (the image is then resized only if a side was not already a multiple).

    Both returned sides are multiples of ``multiple`` and at least ``multiple``; the grid in tokens
    is ``(h // multiple, w // multiple)``.

    >>> reference_image_size(1024, 1024, 1024 * 1024)
    (1024, 1024)
    >>> reference_image_size(1920, 1080, 518_400)
    (960, 544)
    """
    _check_positive_int("width", width)
    _check_positive_int("height", height)
    _check_positive_int("multiple", multiple)
    if area is None:
        return round_to_multiple(width, multiple), round_to_multiple(height, multiple)
    _check_positive_int("area", area)
    # Same float operations, in the same order, as the release, so the sizes agree bit for bit.
    aspect = width / height
    new_h = int((area / aspect) ** 0.5)
    new_w = int(new_h * aspect)
    return round_to_multiple(new_w, multiple), round_to_multiple(new_h, multiple)


def grid_size(
    width: int, height: int, area: int | None, multiple: int = DOWNSAMPLE
) -> tuple[int, int]:
    """Token grid ``(rows, cols)`` of a reference image after :func:`reference_image_size`."""
    w, h = reference_image_size(width, height, area, multiple)
    return h // multiple, w // multiple
