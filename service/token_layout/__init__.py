"""The Emu3.5 token protocol (docs/design.md §3), at the level of token ids.

Writing an image::

    BOI, digits(H), '*', digits(W), IMG, row_0, EOL, row_1, EOL, …, row_{H-1}, EOI

``H``/``W`` are the grid size in tokens and each row holds ``W`` visual tokens; there is no EOL after the
last row, so exactly ``H*(W+1)`` tokens follow IMG, the last one being EOI. :func:`image_header_ids` and
:func:`image_ids` build these id lists (vectorised with numpy; nothing is ever re-tokenised as text).

Reading a generated answer: :class:`StreamParser` is an incremental parser fed with the ids as they are
generated; it emits :class:`Event` objects (text deltas, image progress, finished segments) for the
streaming HTTP layer. :func:`parse` is the one-shot form and is built on the stream parser, so there is a
single implementation of the grammar.

Grammar (what the parser accepts)
---------------------------------
* **Text mode** (the start state). Byte-level BPE ids are text of the current channel. ``BOS``, ``BSS``,
  ``ESS``, ``PAD``, ``EOF`` and ``TMS`` are structural and skipped wherever text is legal (so a whole
  prompt, ``BOS … BSS``, parses too). ``BOG … EOG`` holds the global chain-of-thought (channel
  ``global_cot``), ``BOC … EOC`` a per-image chain-of-thought (channel ``image_cot``). ``BOI`` starts an
  image, also inside a chain of thought (which it closes: the decoding rules open an image on any BOI).
  ``EOS`` ends the answer (closing an open chain of thought); any token after it is an error.
* **Every other non-visual id in text is literal text**: IMG, EOL or EOI outside an image, a stray
  EOG/EOC, a BOG/BOC inside a chain of thought, ``<|im_start|>``, an unused ``<|extra_N|>``. The text
  mask lets the sampler write these (as the release's does), and the release keeps them as text
  (``'Hello<|extra_5|> world'``), so the parser does too: whatever the text sampler may emit parses.
* **Image header**: non-empty decimal digits without a leading zero (so no zero size), ``'*'``, the same
  for the width, then ``IMG``. Nothing else is legal there (not even a skipped structural token). Each
  image's header is read on its own: design.md §5 has later images repeat the first header, which is the
  sampler's business, not the grammar's.
* **Image body**: only visual tokens, ``EOL`` and ``EOI``, at exactly the positions of §3.
* Errors (:class:`TokenLayoutError`, naming the position — index in the fed id stream — and the reason):
  a visual token outside an image body (the text mask forbids it), a header or body that breaks §3, a
  token after EOS, an id outside the vocabulary. The decoding rules force headers and bodies, so none
  of these can come from a sampler that follows them.

Segments
--------
* Text segments keep their text exactly (whitespace included); an *empty* text segment (e.g. between two
  adjacent images) is not emitted. Whitespace-only text between images is emitted as it is — a consumer
  that builds records may skip ``text.strip() == ""``.
* Chain-of-thought segments are emitted whenever their opening token was seen, even when empty: the
  delimiters are explicit model output.
* A row of an image counts as complete when its ``W``-th visual token arrived (its EOL/EOI terminator is
  checked when it arrives). A trailing image cut off by :meth:`StreamParser.finish` (max tokens, abort)
  becomes an :class:`IncompleteImageSegment` holding the complete rows — it is reported, never dropped.
  A chain-of-thought cut off the same way is closed with the text it has.
* Text deltas hold back the bytes of a UTF-8 character split across tokens until it is complete; at the
  end of a segment, left-over bytes of an incomplete character are decoded as U+FFFD.
* Within one ``feed`` call, consecutive text of a channel is merged into one :class:`TextDelta` and the
  rows an image completes into one :class:`ImageRows`; how the stream is chunked changes only that
  grouping, never the text, the rows or the other events.

Cost: a feed of a few Python ints (one decoding step) is handled token by token (~3 µs per image token,
~6 µs per text token); numpy arrays and longer feeds are vectorised (a 64×64 image parses in ~0.5 ms).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, fields
from enum import Enum
from typing import TYPE_CHECKING, Iterable, Literal, cast

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .tokenizer import Emu35Tokenizer

__all__ = [
    "TokenLayoutError",
    "image_header_ids",
    "image_ids",
    "Segment",
    "TextSegment",
    "GlobalCotSegment",
    "ImageCotSegment",
    "ImageSegment",
    "IncompleteImageSegment",
    "Event",
    "TextDelta",
    "ImageStarted",
    "ImageRows",
    "ImageDone",
    "SegmentDone",
    "End",
    "StreamParser",
    "parse",
]

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


# ---- building ---------------------------------------------------------------------------------------


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


# ---- segments and events ----------------------------------------------------------------------------


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


# ---- parsing ----------------------------------------------------------------------------------------


class _Mode(Enum):
    TEXT = "text"
    GLOBAL_COT = "global_cot"
    IMAGE_COT = "image_cot"
    HEADER = "header"
    BODY = "body"
    ENDED = "ended"


_TEXT_MODES = (_Mode.TEXT, _Mode.GLOBAL_COT, _Mode.IMAGE_COT)
_SEGMENT_OF_MODE = {_Mode.TEXT: TextSegment, _Mode.GLOBAL_COT: GlobalCotSegment, _Mode.IMAGE_COT: ImageCotSegment}


#: Feeds of at most this many Python ints take the per-token path; longer ones are vectorised.
_SCALAR_MAX = 16


def _as_id_array(ids: Iterable[int]) -> np.ndarray:
    arr = ids if isinstance(ids, np.ndarray) else np.asarray(list(ids))
    if arr.ndim != 1:
        raise ValueError(f"token ids must be a flat sequence, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        return np.full(arr.shape, -1, dtype=np.int64)  # beyond any vocabulary: reported as such
    return arr.astype(np.int64, copy=False)


class StreamParser:
    """Incremental parser of a generated Emu3.5 answer (see the module docstring for the grammar).

    Call :meth:`feed` with ids as they arrive and :meth:`finish` once the generation stopped without EOS;
    both return the events produced. After a :class:`TokenLayoutError` the parser is dead: further calls
    raise the same error.
    """

    def __init__(self, tok: "Emu35Tokenizer"):
        self._tok = tok
        ids = tok.ids
        self._ids = ids
        self._skip = frozenset({ids.bos, ids.bss, ids.ess, ids.pad, ids.eof, ids.tms})
        self._num_bpe = tok.num_bpe_tokens
        self._vocab_size = tok.vocab_size
        self._pos = 0
        self._mode = _Mode.TEXT
        self._error: TokenLayoutError | None = None
        self._finished = False
        self._next_image = 0
        # text state
        self._text_parts: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # image state
        self._img_index = -1
        self._hdr_h: list[int] = []
        self._hdr_w: list[int] | None = None
        self._h = self._w = 0
        self._k = 0  # tokens seen after IMG
        self._rows: list[np.ndarray] = []
        self._rows_done = 0
        self._partial: list[int] = []

    # ---- public -------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Number of ids consumed so far (the position the next fed id will have)."""
        return self._pos

    @property
    def ended(self) -> bool:
        """True once EOS was read or :meth:`finish` was called."""
        return self._mode is _Mode.ENDED or self._finished

    def feed(self, ids: Iterable[int]) -> list[Event]:
        """Consume more ids; return the events they complete."""
        if self._error is not None:
            raise self._error
        if self._finished:
            raise RuntimeError("StreamParser.feed() called after finish()")
        if not isinstance(ids, np.ndarray):
            ids = list(ids)
            if len(ids) <= _SCALAR_MAX and all(type(t) is int for t in ids):
                return self._guarded(self._run_scalar, ids)
        return self._guarded(self._run_vector, _as_id_array(ids))

    def finish(self) -> list[Event]:
        """The stream stopped: close what is open (an unfinished image becomes an
        :class:`IncompleteImageSegment`) and report :class:`End` ``"finished"``. Returns ``[]`` when the
        answer already ended with EOS."""
        if self._error is not None:
            raise self._error
        if self._finished:
            raise RuntimeError("StreamParser.finish() called twice")
        self._finished = True
        if self._mode is _Mode.ENDED:
            return []
        events: list[Event] = []
        if self._mode in _TEXT_MODES:
            self._close_text(events)
        elif self._mode is _Mode.HEADER:
            height = int("".join(map(str, self._hdr_h))) if self._hdr_w is not None else None
            seg = IncompleteImageSegment(height, None, np.empty((0, 0), dtype=np.int64), 0)
            events.append(SegmentDone(seg))
        else:  # BODY
            events.append(SegmentDone(IncompleteImageSegment(self._h, self._w, self._codes_so_far(), self._k)))
        self._mode = _Mode.ENDED
        events.append(End("finished"))
        return events

    # ---- internals ----------------------------------------------------------------------------
    def _fail(self, position: int, reason: str):
        raise TokenLayoutError(position, reason)

    def _describe(self, t: int) -> str:
        try:
            return f"id {t} {self._tok.decode([t])!r}"
        except Exception:  # noqa: BLE001  # pragma: no cover - decode of an in-vocabulary id does not fail
            return f"id {t}"

    def _guarded(self, run, ids) -> list[Event]:
        events: list[Event] = []
        try:
            run(ids, events)
        except TokenLayoutError as e:
            e.events = events
            self._error = e
            raise
        return events

    def _run_scalar(self, ids: list[int], events: list[Event]) -> None:
        """Per-token path for the few ids of one decoding step (numpy overhead would dominate)."""
        num_bpe, vocab = self._num_bpe, self._vocab_size
        for t in ids:
            pos = self._pos
            mode = self._mode
            if mode is _Mode.ENDED:
                self._fail(pos, "token after EOS")
            if not 0 <= t < vocab:
                self._fail(pos, f"token id {t} is outside the vocabulary (size {vocab})")
            if mode is _Mode.BODY:
                self._body_token(t, pos, events)
            elif mode is _Mode.HEADER:
                self._header_token(t, pos, events)
            elif t < num_bpe:
                self._text_bytes(self._tok.decode_bytes([t]), events)
            else:
                self._control_token(t, pos, events)
            self._pos = pos + 1

    def _run_vector(self, arr: np.ndarray, events: list[Event]) -> None:
        bad = np.flatnonzero((arr < 0) | (arr >= self._vocab_size))
        limit = int(bad[0]) if bad.size else len(arr)
        self._run(arr[:limit], events)
        if limit < len(arr):
            if self._mode is _Mode.ENDED:
                self._fail(self._pos, "token after EOS")
            self._fail(self._pos, f"token id {int(arr[limit])} is outside the vocabulary (size {self._vocab_size})")

    def _run(self, arr: np.ndarray, events: list[Event]) -> None:
        base = self._pos
        n = len(arr)
        i = 0
        controls: np.ndarray | None = None  # indices of non-BPE ids, computed on first need
        try:
            while i < n:
                mode = self._mode
                if mode is _Mode.BODY:
                    i = self._body(arr, i, base, events)
                elif mode is _Mode.HEADER:
                    self._header_token(int(arr[i]), base + i, events)
                    i += 1
                elif mode is _Mode.ENDED:
                    self._fail(base + i, "token after EOS")
                else:
                    if controls is None:
                        controls = np.flatnonzero(arr >= self._num_bpe)
                    k = int(np.searchsorted(controls, i))
                    j = int(controls[k]) if k < len(controls) else n
                    if j > i:  # a run of plain text tokens
                        self._text_bytes(self._tok.decode_bytes(arr[i:j].tolist()), events)
                        i = j
                    else:
                        self._control_token(int(arr[i]), base + i, events)
                        i += 1
        finally:
            self._pos = base + i

    # text
    def _emit_text(self, events: list[Event], text: str) -> None:
        if not text:
            return
        self._text_parts.append(text)
        channel = cast(Channel, self._mode.value)
        if events and isinstance(events[-1], TextDelta) and events[-1].channel == channel:
            events[-1] = TextDelta(channel, events[-1].text + text)
        else:
            events.append(TextDelta(channel, text))

    def _text_bytes(self, data: bytes, events: list[Event]) -> None:
        self._emit_text(events, self._decoder.decode(data))

    def _start_text(self, mode: _Mode) -> None:
        self._mode = mode
        self._text_parts = []
        self._decoder.reset()

    def _close_text(self, events: list[Event]) -> None:
        self._emit_text(events, self._decoder.decode(b"", final=True))
        text = "".join(self._text_parts)
        if text or self._mode is not _Mode.TEXT:
            events.append(SegmentDone(_SEGMENT_OF_MODE[self._mode](text)))
        self._text_parts = []

    def _control_token(self, t: int, pos: int, events: list[Event]) -> None:
        """A non-BPE id in text or a chain of thought. Only the structural tokens act; every other id
        the text sampler may write stays literal text, as it does in the release's decode."""
        ids = self._ids
        mode = self._mode
        if t in self._skip:
            return
        if self._tok.is_visual(t):  # the text mask forbids these: a visual token here is an engine bug
            self._fail(pos, f"visual token (code {t - ids.first_visual}) outside an image")
        if t == ids.eos:
            self._close_text(events)  # a chain of thought cut off by EOS keeps the text it has
            self._mode = _Mode.ENDED
            events.append(End("eos"))
        elif t == ids.boi:  # the decoding rules open an image on BOI whatever channel the text is in
            self._close_text(events)
            self._mode = _Mode.HEADER
            self._img_index = self._next_image
            self._next_image += 1
            self._hdr_h = []
            self._hdr_w = None
        elif mode is _Mode.TEXT and t in (ids.bog, ids.boc):
            self._close_text(events)
            self._start_text(_Mode.GLOBAL_COT if t == ids.bog else _Mode.IMAGE_COT)
        elif (mode, t) in ((_Mode.GLOBAL_COT, ids.eog), (_Mode.IMAGE_COT, ids.eoc)):
            self._close_text(events)
            self._start_text(_Mode.TEXT)
        else:  # IMG/EOL/EOI outside an image, unused controls, stray or nested CoT marks: literal text
            self._text_bytes(self._tok.decode_bytes([t]), events)

    # image header
    def _header_token(self, t: int, pos: int, events: list[Event]) -> None:
        tok = self._tok
        d = tok.digit_value(t)
        side = "height" if self._hdr_w is None else "width"
        if d is not None:
            digits = self._hdr_h if self._hdr_w is None else self._hdr_w
            if not digits and d == 0:
                self._fail(pos, f"image header: {side} starts with '0' (leading zero or zero size)")
            digits.append(d)
        elif t == tok.star_id:
            if self._hdr_w is not None:
                self._fail(pos, "image header: second '*'")
            if not self._hdr_h:
                self._fail(pos, "image header: no digits for the height before '*'")
            self._hdr_w = []
        elif t == self._ids.img:
            if self._hdr_w is None:
                self._fail(pos, "image header: no digits before IMG" if not self._hdr_h else "image header: missing '*'")
            if not self._hdr_w:
                self._fail(pos, "image header: no digits for the width before IMG")
            self._h = int("".join(map(str, self._hdr_h or ())))
            self._w = int("".join(map(str, self._hdr_w or ())))
            self._k = 0
            self._rows = []
            self._rows_done = 0
            self._partial = []
            self._mode = _Mode.BODY
            events.append(ImageStarted(self._img_index, self._h, self._w))
        elif t == self._ids.boi:
            self._fail(pos, "BOI inside an image header")
        else:
            self._fail(pos, f"image header: non-digit {self._describe(t)} (only digits, '*' and IMG are legal)")

    # image body (vectorised over the chunk)
    def _body(self, arr: np.ndarray, i: int, base: int, events: list[Event]) -> int:
        ids = self._ids
        h, w, k = self._h, self._w, self._k
        total = h * (w + 1)
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
        self._k = k + good
        if bad.size:
            self._body_error(int(seg[good]), base + i + good, k + good + 1, bool(exp_vis[good]), bool(exp_eol[good]))
        if self._k == total:
            self._image_done(events)
        return i + m

    def _body_token(self, t: int, pos: int, events: list[Event]) -> None:
        """One body token (the scalar twin of :meth:`_body`)."""
        ids = self._ids
        k = self._k + 1
        w = self._w
        total = self._h * (w + 1)
        if k == total:
            ok, exp_vis, exp_eol = t == ids.eoi, False, False
        elif k % (w + 1) == 0:
            ok, exp_vis, exp_eol = t == ids.eol, False, True
        else:
            ok, exp_vis, exp_eol = t >= ids.first_visual, True, False
        if not ok:
            self._body_error(t, pos, k, exp_vis, exp_eol)
        self._k = k
        if exp_vis:
            self._partial.append(t - ids.first_visual)
            if len(self._partial) == w:
                self._push_rows(np.array(self._partial, dtype=np.int64).reshape(1, w), events)
                self._partial = []
        if k == total:
            self._image_done(events)

    def _image_done(self, events: list[Event]) -> None:
        codes = self._codes_so_far()
        events.append(ImageDone(self._img_index, codes))
        events.append(SegmentDone(ImageSegment(codes)))
        self._start_text(_Mode.TEXT)

    def _push_rows(self, rows: np.ndarray, events: list[Event]) -> None:
        rows.setflags(write=False)
        self._rows.append(rows)
        self._rows_done += len(rows)
        last = events[-1] if events else None
        if isinstance(last, ImageRows) and last.index == self._img_index:  # one event per feed call
            rows = np.concatenate([last.new_rows, rows])
            rows.setflags(write=False)
            events.pop()
        events.append(ImageRows(self._img_index, self._rows_done, rows))

    def _add_codes(self, vis: np.ndarray, events: list[Event]) -> None:
        if vis.size == 0:
            return
        w = self._w
        allv = np.concatenate([np.array(self._partial, dtype=np.int64), vis]) if self._partial else vis
        nfull = len(allv) // w
        if nfull:
            self._push_rows(np.array(allv[: nfull * w].reshape(nfull, w), dtype=np.int64, copy=True), events)
        self._partial = allv[nfull * w :].tolist()

    def _codes_so_far(self) -> np.ndarray:
        if not self._rows:
            return np.empty((0, self._w), dtype=np.int64)
        return np.concatenate(self._rows) if len(self._rows) > 1 else self._rows[0]

    def _body_error(self, t: int, pos: int, kpos: int, exp_vis: bool, exp_eol: bool) -> None:
        ids = self._ids
        h, w = self._h, self._w
        row, col = divmod(kpos - 1, w + 1)
        size = f"{h}x{w} image"
        is_vis = self._tok.is_visual(t)
        if t == ids.boi:
            self._fail(pos, f"BOI inside an image (row {row} of the {size})")
        if exp_vis:
            if t == ids.eol:
                self._fail(pos, f"wrong row length: EOL after {col} of {w} visual tokens in row {row} of the {size}")
            if t == ids.eoi:
                self._fail(pos, f"EOI before the image is complete: row {row} of the {size} has {col} of {w} visual tokens")
            self._fail(pos, f"{self._describe(t)} inside an image body (only visual tokens, EOL and EOI are legal; visual token expected)")
        if exp_eol:
            if is_vis:
                self._fail(pos, f"wrong row length: row {row} of the {size} is longer than {w} (visual token where EOL is due)")
            if t == ids.eoi:
                self._fail(pos, f"EOI before the last row is complete: only {row + 1} of {h} rows of the {size}")
            self._fail(pos, f"expected EOL after row {row} of the {size}, got {self._describe(t)}")
        if is_vis:
            self._fail(pos, f"wrong row length: last row of the {size} is longer than {w} (visual token where EOI is due)")
        self._fail(pos, f"missing EOI after the last row of the {size}, got {self._describe(t)}")


def parse(tok: "Emu35Tokenizer", ids: Iterable[int]) -> list[Segment]:
    """Parse a whole answer into segments (a trailing cut-off image is an :class:`IncompleteImageSegment`).

    Built on :class:`StreamParser`; an answer that ended with EOS and one that simply stops are both
    accepted. Raises :class:`TokenLayoutError` on malformed input.
    """
    parser = StreamParser(tok)
    events = parser.feed(ids)
    if not parser.ended:
        events += parser.finish()
    return [e.segment for e in events if isinstance(e, SegmentDone)]
