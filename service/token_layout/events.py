"""What reading an answer produces: the segments of a parsed answer, the events of the stream parser, and
the error it raises on a stream that breaks the layout."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

Channel = Literal["text", "global_cot", "image_cot"]


class TokenLayoutError(ValueError):
    """A token stream that breaks the Emu3.5 layout.

    ``position`` is the index of the offending id in the stream fed to the parser, ``reason`` says what
    is wrong. ``events`` holds the events the failing :meth:`StreamParser.feed` call produced before the
    error (so a streaming caller can still forward them).
    """

    def __init__(self, position: int, reason: str):
        self.position = position
        self.reason = reason
        self.events: list[Event] = []
        super().__init__(f"malformed Emu3.5 token stream at position {position}: {reason}")

    def __reduce__(self):
        return (type(self), (self.position, self.reason))


def _values_equal(x, y) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return (
            isinstance(x, np.ndarray)
            and isinstance(y, np.ndarray)
            and x.shape == y.shape
            and bool(np.array_equal(x, y))
        )
    return x == y


class _ArrayEq:
    """``__eq__`` for frozen dataclasses holding numpy arrays (value equality, shapes included)."""

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(_values_equal(getattr(self, f.name), getattr(other, f.name))
                   for f in fields(self))  # type: ignore[arg-type]  # mixed into dataclasses only

    __hash__ = None  # type: ignore[assignment]  # arrays are not hashable


def _frozen_codes(codes, ndim: int = 2) -> np.ndarray:
    arr = np.asarray(codes)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"image codes must be integers, got dtype {arr.dtype}")
    arr = np.array(arr, dtype=np.int64, copy=True)
    if arr.ndim != ndim:
        raise ValueError(f"image codes must be a {ndim}-D array, got shape {arr.shape}")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class Segment:
    """Base class of the parsed parts of an answer."""


@dataclass(frozen=True)
class TextSegment(Segment):
    """Answer text (outside any chain-of-thought)."""

    text: str


@dataclass(frozen=True)
class GlobalCotSegment(Segment):
    """The global chain-of-thought, between BOG and EOG."""

    text: str


@dataclass(frozen=True)
class ImageCotSegment(Segment):
    """A per-image chain-of-thought, between BOC and EOC (it belongs to the image that follows)."""

    text: str


@dataclass(frozen=True, eq=False)
class ImageSegment(_ArrayEq, Segment):
    """A complete image: ``codes`` is an ``(H, W)`` int64 array of codebook indices (read-only)."""

    codes: np.ndarray

    def __post_init__(self):
        codes = _frozen_codes(self.codes)
        if codes.size == 0:
            raise ValueError("an image needs at least one row and one column")
        object.__setattr__(self, "codes", codes)

    @property
    def height(self) -> int:
        return int(self.codes.shape[0])

    @property
    def width(self) -> int:
        return int(self.codes.shape[1])


@dataclass(frozen=True, eq=False)
class IncompleteImageSegment(_ArrayEq, Segment):
    """A trailing image the stream stopped inside (max tokens reached, request aborted).

    ``height``/``width`` are None while the header had not yet given them. ``codes`` holds the complete
    rows, shape ``(rows_done, width)`` (``(0, 0)`` when the width is unknown). ``tokens_after_img`` counts
    the body tokens seen after IMG (0 when the stream stopped inside the header).
    """

    height: int | None
    width: int | None
    codes: np.ndarray
    tokens_after_img: int

    def __post_init__(self):
        object.__setattr__(self, "codes", _frozen_codes(self.codes))

    @property
    def rows_done(self) -> int:
        return int(self.codes.shape[0])


@dataclass(frozen=True)
class Event:
    """Base class of what :meth:`StreamParser.feed` / :meth:`StreamParser.finish` report."""


@dataclass(frozen=True)
class TextDelta(Event):
    """New text of a channel (never splits a UTF-8 character)."""

    channel: Channel
    text: str


@dataclass(frozen=True)
class ImageStarted(Event):
    """The header of image ``index`` (0-based within the answer) was read: pixels follow."""

    index: int
    height: int
    width: int


@dataclass(frozen=True, eq=False)
class ImageRows(_ArrayEq, Event):
    """Rows of image ``index`` completed: ``new_rows`` is ``(n, W)``; ``rows_done`` counts all so far."""

    index: int
    rows_done: int
    new_rows: np.ndarray


@dataclass(frozen=True, eq=False)
class ImageDone(_ArrayEq, Event):
    """Image ``index`` ended with EOI; ``codes`` is the whole ``(H, W)`` grid."""

    index: int
    codes: np.ndarray


@dataclass(frozen=True)
class SegmentDone(Event):
    """A segment closed (text closes when an image or chain-of-thought starts, at EOS or at finish)."""

    segment: Segment


@dataclass(frozen=True)
class End(Event):
    """The answer ended: ``"eos"`` (the model wrote EOS) or ``"finished"`` (:meth:`StreamParser.finish`
    was called without EOS: a stop at EOI, max tokens, abort)."""

    reason: Literal["eos", "finished"]
