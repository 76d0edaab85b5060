"""The image spans of an answer: what the unconditional branch sees in the ``reference`` uncond mode.

In the release's transformers path (design.md §5.2) the unconditional sequence is the uncond prompt
followed by every generated BOI…EOI span and nothing else: generated text never reaches it. Both
engines build that sequence from the cond row's tokens with :class:`ImageSpans`; the vLLM engine also
reads the header it parses, to know how long the uncond request of each image must run.

Pure Python over token ids (no torch, no vLLM), so the engine front end, the pair scheduler (in vLLM's
engine core) and the tests share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, Sequence

#: A row's position in the answer's layout: writing text, an image header (after BOI), or an image
#: body (after IMG). ``service.engine.policy.rules`` uses the same numbers for its tensor state.
TEXT, HEADER, PIXELS = 0, 1, 2
#: Length of a sampled (unconstrained) header: two digits, '*', two digits, IMG.
FREE_HEADER_LEN = 6


class ModeTokens(Protocol):
    """The ids that move a row between modes (``VocabTables``, :class:`ModeIds` and :class:`SpanTokens`)."""

    @property
    def boi(self) -> int: ...

    @property
    def img(self) -> int: ...

    @property
    def eoi(self) -> int: ...


class ModeIds(NamedTuple):
    """Just the mode switches (what the pair scheduler carries in a reference cond's spec)."""

    boi: int
    img: int
    eoi: int


def next_mode(mode: int, token: int, ids: ModeTokens) -> int:
    """A row's mode after ``token``. Image mode is entered only through BOI → header → IMG: an IMG (or
    EOL, EOI) sampled in text mode leaves the row in text mode, as in the release."""
    if mode == TEXT:
        return HEADER if token == ids.boi else TEXT
    if mode == HEADER:
        return PIXELS if token == ids.img else HEADER
    return TEXT if token == ids.eoi else PIXELS


def in_image_span(before: int, after: int) -> bool:
    """Whether the token that moved a row from ``before`` to ``after`` belongs to an image span: BOI
    (text → header), the header, IMG, the body and EOI (pixels → text)."""
    return before != TEXT or after != TEXT


@dataclass(frozen=True)
class SpanTokens:
    """The ids :class:`ImageSpans` needs: the mode switches and the header's digits and ``*``."""

    boi: int
    img: int
    eoi: int
    star: int
    digits: tuple[int, ...]  # id of '0'..'9'

    @classmethod
    def from_tokenizer(cls, tok) -> "SpanTokens":
        ids = tok.ids
        return cls(ids.boi, ids.img, ids.eoi, tok.star_id, tuple(tok.digit_ids))


@dataclass
class ImageSpans:
    """Follows a cond row token by token and keeps its image spans (BOI…EOI, header included).

    ``tokens`` is what the reference-form uncond branch has seen after the uncond prompt; ``mode`` is
    the row's mode after the last token fed."""

    ids: SpanTokens
    tokens: list[int] = field(default_factory=list)
    mode: int = TEXT
    _header: list[int] = field(default_factory=list)

    def feed(self, token: int) -> tuple[int, int] | None:
        """Take the cond row's next token; return the image's ``(rows, cols)`` when it closes a header."""
        before, self.mode = self.mode, next_mode(self.mode, token, self.ids)
        if in_image_span(before, self.mode):
            self.tokens.append(token)
        if before == HEADER and self.mode == HEADER:
            self._header.append(token)
        if before == TEXT and self.mode == HEADER:
            self._header = []
        if before == HEADER and self.mode == PIXELS:
            return header_grid(self._header, self.ids)
        return None

    def feed_all(self, tokens: Sequence[int]) -> list[tuple[int, int]]:
        """Feed several tokens; return the grids of the headers they closed, in order."""
        grids = []
        for t in tokens:
            grid = self.feed(t)
            if grid is not None:
                grids.append(grid)
        return grids


def header_grid(header: Sequence[int], ids: SpanTokens) -> tuple[int, int]:
    """``(rows, cols)`` written by a header's tokens (``H`` digits, ``*``, ``W`` digits; the rules allow
    nothing else there). A malformed header gives ``(0, 0)``."""
    value = {t: d for d, t in enumerate(ids.digits)}
    if ids.star not in header:
        return (0, 0)
    cut = list(header).index(ids.star)
    sides = []
    for part in (header[:cut], header[cut + 1:]):
        if not part or any(t not in value for t in part):
            return (0, 0)
        sides.append(int("".join(str(value[t]) for t in part)))
    return sides[0], sides[1]


def image_body_tokens(grid: tuple[int, int]) -> int:
    """Tokens after IMG up to and including EOI: ``rows`` rows of ``cols`` visual tokens and an EOL
    each, the last EOL replaced by EOI."""
    rows, cols = grid
    return rows * (cols + 1)
