"""The stream parser: feeds ids to the state that reads them (text, header, rows, ended) and hands over
to the next state at each boundary. The grammar is in the package docstring; each state is its own
module (:mod:`.text`, :mod:`.header`, :mod:`.body`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, TypeVar

import numpy as np

from service.token_layout.body import BodyReader
from service.token_layout.events import End, Event, Segment, SegmentDone, TokenLayoutError
from service.token_layout.header import HeaderReader
from service.token_layout.reading import Reading, fail
from service.token_layout.text import Ended, State, TextReader

if TYPE_CHECKING:  # pragma: no cover
    from service.tokenizer import Emu35Tokenizer

Ids = TypeVar("Ids")

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
    """Incremental parser of a generated Emu3.5 answer (see the package docstring for the grammar).

    Call :meth:`feed` with ids as they arrive and :meth:`finish` once the generation stopped without EOS;
    both return the events produced. After a :class:`TokenLayoutError` the parser is dead: further calls
    raise the same error.
    """

    def __init__(self, tok: Emu35Tokenizer):
        self._reading = Reading(tok)
        self._num_bpe = tok.num_bpe_tokens
        self._vocab_size = tok.vocab_size
        self._pos = 0
        self._state: State = TextReader(self._reading)
        self._error: TokenLayoutError | None = None
        self._finished = False

    @property
    def position(self) -> int:
        """Number of ids consumed so far (the position the next fed id will have)."""
        return self._pos

    @property
    def ended(self) -> bool:
        """True once EOS was read or :meth:`finish` was called."""
        return isinstance(self._state, Ended) or self._finished

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
        state = self._state
        if isinstance(state, Ended):
            return []
        events: list[Event] = []
        if isinstance(state, TextReader):
            state.close(events)  # a chain of thought cut off here is closed with the text it has
        else:
            events.append(SegmentDone(state.incomplete()))
        self._state = Ended()
        events.append(End("finished"))
        return events

    # ---- internals ----------------------------------------------------------------------------
    def _guarded(self, run: Callable[[Ids, list[Event]], None], ids: Ids) -> list[Event]:
        events: list[Event] = []
        try:
            run(ids, events)
        except TokenLayoutError as e:
            e.events = events
            self._error = e
            raise
        return events

    def _after_body(self, state: BodyReader) -> State:
        return TextReader(self._reading) if state.done else state

    def _run_scalar(self, ids: list[int], events: list[Event]) -> None:
        """Per-token path for the few ids of one decoding step (numpy overhead would dominate)."""
        num_bpe, vocab = self._num_bpe, self._vocab_size
        for t in ids:
            pos = self._pos
            state = self._state
            if isinstance(state, Ended):
                fail(pos, "token after EOS")
            if not 0 <= t < vocab:
                fail(pos, f"token id {t} is outside the vocabulary (size {vocab})")
            if isinstance(state, BodyReader):
                state.token(t, pos, events)
                self._state = self._after_body(state)
            elif isinstance(state, HeaderReader):
                self._state = state.token(t, pos, events)
            elif t < num_bpe:
                state.text_ids([t], events)
            else:
                self._state = state.control(t, pos, events)
            self._pos = pos + 1

    def _run_vector(self, arr: np.ndarray, events: list[Event]) -> None:
        bad = np.flatnonzero((arr < 0) | (arr >= self._vocab_size))
        limit = int(bad[0]) if bad.size else len(arr)
        self._run(arr[:limit], events)
        if limit < len(arr):
            if isinstance(self._state, Ended):
                fail(self._pos, "token after EOS")
            fail(self._pos, f"token id {int(arr[limit])} is outside the vocabulary (size {self._vocab_size})")

    def _run(self, arr: np.ndarray, events: list[Event]) -> None:
        base = self._pos
        n = len(arr)
        i = 0
        controls: np.ndarray | None = None  # indices of non-BPE ids, computed on first need
        try:
            while i < n:
                state = self._state
                if isinstance(state, BodyReader):
                    i = state.run(arr, i, base, events)
                    self._state = self._after_body(state)
                elif isinstance(state, HeaderReader):
                    self._state = state.token(int(arr[i]), base + i, events)
                    i += 1
                elif isinstance(state, Ended):
                    fail(base + i, "token after EOS")
                else:
                    if controls is None:
                        controls = np.flatnonzero(arr >= self._num_bpe)
                    k = int(np.searchsorted(controls, i))
                    j = int(controls[k]) if k < len(controls) else n
                    if j > i:  # a run of plain text tokens
                        state.text_ids(arr[i:j].tolist(), events)
                        i = j
                    else:
                        self._state = state.control(int(arr[i]), base + i, events)
                        i += 1
        finally:
            self._pos = base + i


def parse(tok: Emu35Tokenizer, ids: Iterable[int]) -> list[Segment]:
    """Parse a whole answer into segments (a trailing cut-off image is an :class:`IncompleteImageSegment`).

    Built on :class:`StreamParser`; an answer that ended with EOS and one that simply stops are both
    accepted. Raises :class:`TokenLayoutError` on malformed input.
    """
    parser = StreamParser(tok)
    events = parser.feed(ids)
    if not parser.ended:
        events += parser.finish()
    return [e.segment for e in events if isinstance(e, SegmentDone)]
