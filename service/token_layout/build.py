"""Writing an image as ids: ``BOI, digits(H), '*', digits(W), IMG``, then ``H`` rows of ``W`` visual tokens
separated by EOL, the last one closed by EOI (vectorised with numpy; nothing is re-tokenised as text)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from service.tokenizer import Emu35Tokenizer


def _check_side(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"image {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"image {name} must be >= 1, got {value}")
    return int(value)


def image_header_ids(tok: "Emu35Tokenizer", height: int, width: int) -> list[int]:
    """``BOI, digits(height), '*', digits(width), IMG`` (sizes in tokens)."""
    height = _check_side("height", height)
    width = _check_side("width", width)
    ids = tok.ids
    return [ids.boi, *tok.encode_number(height), tok.star_id, *tok.encode_number(width), ids.img]


def image_ids(tok: "Emu35Tokenizer", codes: np.ndarray) -> list[int]:
    """The full id sequence of an image: header, rows separated by EOL (none after the last), EOI.

    ``codes`` is an ``(H, W)`` integer array of codebook indices. Exactly ``H*(W+1)`` ids follow IMG.
    """
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"image codes must be a 2-D (H, W) array, got shape {codes.shape}")
    if codes.dtype.kind not in "iu":
        raise ValueError(f"image codes must be integers, got dtype {codes.dtype}")
    h, w = codes.shape
    header = image_header_ids(tok, h, w)
    body = np.empty((h, w + 1), dtype=np.int64)
    body[:, :w] = tok.codes_to_ids(codes)  # validates the code range
    body[:, w] = tok.ids.eol
    body[-1, w] = tok.ids.eoi
    return header + body.ravel().tolist()
