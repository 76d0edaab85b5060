"""What every state of the stream parser reads with: the tokenizer, its special ids, the count of images
begun so far, and how an error names a token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from service.token_layout.events import TokenLayoutError

if TYPE_CHECKING:  # pragma: no cover
    from service.tokenizer import Emu35Tokenizer, SpecialIds


@dataclass
class Reading:
    """The parser's shared context: one per :class:`~service.token_layout.parser.StreamParser`."""

    tok: Emu35Tokenizer
    images_begun: int = 0
    ids: SpecialIds = field(init=False)
    #: structural ids skipped wherever text is legal (so a whole prompt, ``BOS … BSS``, parses too)
    skip: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        ids = self.ids = self.tok.ids
        self.skip = frozenset({ids.bos, ids.bss, ids.ess, ids.pad, ids.eof, ids.tms})

    def next_image(self) -> int:
        """The index of the image a BOI begins (0-based within the answer)."""
        index = self.images_begun
        self.images_begun += 1
        return index

    def describe(self, t: int) -> str:
        try:
            return f"id {t} {self.tok.decode([t])!r}"
        except Exception:  # noqa: BLE001  # pragma: no cover - decode of an in-vocabulary id does not fail
            return f"id {t}"


def fail(position: int, reason: str) -> NoReturn:
    raise TokenLayoutError(position, reason)
