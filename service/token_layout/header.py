"""The image header state: ``digits(H) '*' digits(W) IMG`` after a BOI.

Non-empty decimal digits without a leading zero (so no zero size), ``'*'``, the same for the width, then
``IMG``; nothing else is legal here, not even a skipped structural token.
"""

from __future__ import annotations

import numpy as np

from service.token_layout.body import BodyReader
from service.token_layout.events import Event, ImageStarted, IncompleteImageSegment
from service.token_layout.reading import Reading, fail


class HeaderReader:
    """The header of image ``index``: the height's digits, then (after ``'*'``) the width's."""

    def __init__(self, reading: Reading, index: int) -> None:
        self.reading = reading
        self.index = index
        self._height: list[int] = []
        self._width: list[int] | None = None  # None until '*'

    def token(self, t: int, pos: int, events: list[Event]) -> HeaderReader | BodyReader:
        """One header id; the body reader once IMG closes a well-formed header."""
        r = self.reading
        d = r.tok.digit_value(t)
        if d is not None:
            self._digit(d, pos)
        elif t == r.tok.star_id:
            if self._width is not None:
                fail(pos, "image header: second '*'")
            if not self._height:
                fail(pos, "image header: no digits for the height before '*'")
            self._width = []
        elif t == r.ids.img:
            if self._width is None:
                fail(pos, "image header: no digits before IMG" if not self._height else "image header: missing '*'")
            if not self._width:
                fail(pos, "image header: no digits for the width before IMG")
            h, w = _number(self._height), _number(self._width)
            events.append(ImageStarted(self.index, h, w))
            return BodyReader(r, self.index, h, w)
        elif t == r.ids.boi:
            fail(pos, "BOI inside an image header")
        else:
            fail(pos, f"image header: non-digit {r.describe(t)} (only digits, '*' and IMG are legal)")
        return self

    def incomplete(self) -> IncompleteImageSegment:
        """The image as it stands when the stream stops inside its header (the height once '*' came)."""
        height = _number(self._height) if self._width is not None else None
        return IncompleteImageSegment(height, None, np.empty((0, 0), dtype=np.int64), 0)

    def _digit(self, d: int, pos: int) -> None:
        digits = self._height if self._width is None else self._width
        if not digits and d == 0:
            side = "height" if self._width is None else "width"
            fail(pos, f"image header: {side} starts with '0' (leading zero or zero size)")
        digits.append(d)


def _number(digits: list[int]) -> int:
    return int("".join(map(str, digits)))
