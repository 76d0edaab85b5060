"""Where an image's tokens are drawn under each decoding schedule, and what each costs in passes.

An image body (after ``BOI H*W IMG``) is ``H`` rows of ``W`` visual tokens, each row closed by EOL, the
last by EOI: ``H·(W+1)`` tokens at body offsets ``0 … H(W+1)−1``; offset ``−1`` is the IMG that opens it.
A *lane* is a run of offsets drawn left to right, one window per pass:

* ``ar``: no lanes, the body is decoded token by token like text (``H·(W+1)`` passes);
* ``jacobi``: one lane over the whole body up to (not including) EOI, row ends inside it forced;
* ``zipar``: one lane per row (its ``W`` visual tokens); lane ``r`` opens once lane ``r−1`` has ``window``
  tokens, its first input being the row end above (known in advance: the rules force it);
* ``zipar`` with ``draft_len`` > 1: the row lanes, each drafted and verified like the Jacobi lane.

EOI and the row ends are never drawn by a lane schedule (the rules fix them); they are fed to the
model as inputs when the next row (or the text after the image) needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from service.types import DEFAULT_DRAFT_LEN, DEFAULT_WINDOW, Decoding

__all__ = ["DEFAULT_DRAFT_LEN", "DEFAULT_WINDOW", "Lane", "Schedule"]


@dataclass(frozen=True)
class Schedule:
    """A request's decoding, with the engine's defaults filled in."""

    mode: str
    draft_len: int
    window: int

    @classmethod
    def of(cls, decoding: Decoding) -> "Schedule":
        full = decoding.resolved()
        return cls(full.mode, full.draft_len or 1, full.window or DEFAULT_WINDOW)


def body_len(height: int, width: int) -> int:
    return height * (width + 1)


def is_row_end(offset: int, width: int) -> bool:
    return offset % (width + 1) == width


@dataclass
class Lane:
    """Offsets ``start … end−1`` of one image body, drawn left to right. ``next``: the first offset not
    accepted yet; the token at ``next − 1`` (IMG or a row end for a new lane) is its next input.
    ``drafts`` are guesses for ``next, next+1, …`` with the distribution each was drawn from."""

    index: int
    start: int
    end: int
    next: int
    drafts: list[int] = field(default_factory=list)
    proposals: list = field(default_factory=list)  # per draft: (probs, ids) rows it was drawn from
    retired: bool = False  # done, and its last token fed

    @property
    def done(self) -> bool:
        return self.next >= self.end

    @property
    def accepted(self) -> int:
        return self.next - self.start


def lanes_for(schedule: Schedule, height: int, width: int) -> list[Lane]:
    """The lanes of an image under ``schedule`` (none for ``ar``)."""
    if schedule.mode == "jacobi":
        return [Lane(0, 0, body_len(height, width) - 1, 0)]
    if schedule.mode == "zipar":
        return [Lane(r, r * (width + 1), r * (width + 1) + width, r * (width + 1)) for r in range(height)]
    return []


def may_open(lanes: list[Lane], index: int, window: int) -> bool:
    """ZipAR's rule: lane ``index`` opens once the lane above has ``window`` tokens (or is done)."""
    if index == 0:
        return True
    above = lanes[index - 1]
    return above.done or above.accepted >= window


def zipar_passes(height: int, width: int, window: int) -> int:
    """Passes that draw a ``height × width`` body under ZipAR with one token per row per pass: row ``r``
    draws its first token at pass ``r·min(window, W)`` and its last ``W − 1`` passes later."""
    return (height - 1) * min(window, width) + width


def ar_passes(height: int, width: int) -> int:
    """Passes that draw a body token by token (row ends and EOI included)."""
    return body_len(height, width)
