"""The image body state (the rows): only visual tokens, ``EOL`` and ``EOI``, at exactly their positions.

After ``IMG`` come ``H*(W+1)`` ids: each row's ``W`` visual tokens, an ``EOL`` after every row but the last,
and ``EOI`` after the last. A row counts as complete when its ``W``-th visual token arrives (its terminator
is checked when it comes). A chunk of ids is checked in one vectorised step; a single id (one decoding
step) by :meth:`BodyReader.token`, its scalar twin.
"""

from __future__ import annotations

import numpy as np

from service.token_layout.events import Event, ImageDone, ImageRows, ImageSegment, IncompleteImageSegment, SegmentDone
from service.token_layout.reading import Reading, fail


class BodyReader:
    """The rows of image ``index`` (``height × width`` visual tokens); :attr:`done` once EOI came."""

    def __init__(self, reading: Reading, index: int, height: int, width: int) -> None:
        self.reading = reading
        self.index = index
        self.height, self.width = height, width
        self._total = height * (width + 1)  # ids after IMG, EOI included
        self._seen = 0  # ids seen after IMG
        self._rows: list[np.ndarray] = []
        self._rows_done = 0
        self._partial: list[int] = []  # codes of the row under way

    @property
    def done(self) -> bool:
        return self._seen == self._total

    def run(self, arr: np.ndarray, i: int, base: int, events: list[Event]) -> int:
        """Read ``arr[i:]`` up to the end of the image (``base``: the stream position of ``arr[0]``); the
        index of the first id not read."""
        ids = self.reading.ids
        w, k, total = self.width, self._seen, self._total
        m = min(len(arr) - i, total - k)
        seg = arr[i : i + m]
        kk = np.arange(k + 1, k + m + 1, dtype=np.int64)  # 1-based position after IMG
        exp_eoi = kk == total
        exp_eol = (kk % (w + 1) == 0) & ~exp_eoi
        exp_vis = ~(exp_eoi | exp_eol)
        is_vis = seg >= ids.first_visual  # ids were checked to lie inside the vocabulary
        ok = np.where(exp_vis, is_vis, np.where(exp_eol, seg == ids.eol, seg == ids.eoi))
        bad = np.flatnonzero(~ok)
        good = int(bad[0]) if bad.size else m
        self._add_codes(seg[:good][exp_vis[:good]] - ids.first_visual, events)
        self._seen = k + good
        if bad.size:
            self._error(int(seg[good]), base + i + good, k + good + 1, bool(exp_vis[good]), bool(exp_eol[good]))
        if self.done:
            self._finish(events)
        return i + m

    def token(self, t: int, pos: int, events: list[Event]) -> None:
        """One body id (the scalar twin of :meth:`run`)."""
        ids = self.reading.ids
        k = self._seen + 1
        w = self.width
        if k == self._total:
            ok, exp_vis, exp_eol = t == ids.eoi, False, False
        elif k % (w + 1) == 0:
            ok, exp_vis, exp_eol = t == ids.eol, False, True
        else:
            ok, exp_vis, exp_eol = t >= ids.first_visual, True, False
        if not ok:
            self._error(t, pos, k, exp_vis, exp_eol)
        self._seen = k
        if exp_vis:
            self._partial.append(t - ids.first_visual)
            if len(self._partial) == w:
                self._push_rows(np.array(self._partial, dtype=np.int64).reshape(1, w), events)
                self._partial = []
        if self.done:
            self._finish(events)

    def incomplete(self) -> IncompleteImageSegment:
        """The image as it stands when the stream stops inside its body: the complete rows."""
        return IncompleteImageSegment(self.height, self.width, self._codes_so_far(), self._seen)

    def _finish(self, events: list[Event]) -> None:
        codes = self._codes_so_far()
        events.append(ImageDone(self.index, codes))
        events.append(SegmentDone(ImageSegment(codes)))

    def _push_rows(self, rows: np.ndarray, events: list[Event]) -> None:
        rows.setflags(write=False)
        self._rows.append(rows)
        self._rows_done += len(rows)
        last = events[-1] if events else None
        if isinstance(last, ImageRows) and last.index == self.index:  # one event per feed call
            rows = np.concatenate([last.new_rows, rows])
            rows.setflags(write=False)
            events.pop()
        events.append(ImageRows(self.index, self._rows_done, rows))

    def _add_codes(self, vis: np.ndarray, events: list[Event]) -> None:
        if vis.size == 0:
            return
        w = self.width
        allv = np.concatenate([np.array(self._partial, dtype=np.int64), vis]) if self._partial else vis
        nfull = len(allv) // w
        if nfull:
            self._push_rows(np.array(allv[: nfull * w].reshape(nfull, w), dtype=np.int64, copy=True), events)
        self._partial = allv[nfull * w :].tolist()

    def _codes_so_far(self) -> np.ndarray:
        if not self._rows:
            return np.empty((0, self.width), dtype=np.int64)
        return np.concatenate(self._rows) if len(self._rows) > 1 else self._rows[0]

    def _error(self, t: int, pos: int, kpos: int, exp_vis: bool, exp_eol: bool) -> None:
        """Raise the error of id ``t`` at body position ``kpos`` (1-based), naming what was due."""
        r = self.reading
        ids = r.ids
        h, w = self.height, self.width
        row, col = divmod(kpos - 1, w + 1)
        size = f"{h}x{w} image"
        is_vis = r.tok.is_visual(t)
        if t == ids.boi:
            fail(pos, f"BOI inside an image (row {row} of the {size})")
        if exp_vis:
            if t == ids.eol:
                fail(pos, f"wrong row length: EOL after {col} of {w} visual tokens in row {row} of the {size}")
            if t == ids.eoi:
                fail(pos, f"EOI before the image is complete: row {row} of the {size} has {col} of {w} visual tokens")
            fail(pos, f"{r.describe(t)} inside an image body (only visual tokens, EOL and EOI are legal; visual token expected)")
        if exp_eol:
            if is_vis:
                fail(pos, f"wrong row length: row {row} of the {size} is longer than {w} (visual token where EOL is due)")
            if t == ids.eoi:
                fail(pos, f"EOI before the last row is complete: only {row + 1} of {h} rows of the {size}")
            fail(pos, f"expected EOL after row {row} of the {size}, got {r.describe(t)}")
        if is_vis:
            fail(pos, f"wrong row length: last row of the {size} is longer than {w} (visual token where EOI is due)")
        fail(pos, f"missing EOI after the last row of the {size}, got {r.describe(t)}")
