"""The anti-diagonal schedule of an H×W grid and the way back to Emu3.5's token layout (§4, §10).

Step ``s`` (0 … H+W−2) draws every cell ``(r, s−r)``, rows increasing. Row ``r`` is complete once step
``r + W − 1`` has drawn its last cell, so finished rows can be streamed as Emu3.5 would have written them.
"""

from __future__ import annotations


def num_steps(height: int, width: int) -> int:
    """Decoding steps of an H×W grid: ``H + W − 1``."""
    return height + width - 1


def diagonal_rows(step: int, height: int, width: int) -> range:
    """Rows of the cells on diagonal ``step`` (the column of row ``r`` is ``step − r``)."""
    return range(max(0, step - width + 1), min(step, height - 1) + 1)


def diagonal_cells(step: int, height: int, width: int) -> list[tuple[int, int]]:
    return [(r, step - r) for r in diagonal_rows(step, height, width)]


def rows_completed_by(step: int, height: int, width: int) -> range:
    """Rows whose last cell is drawn at ``step`` (at most one: row ``step − W + 1``)."""
    r = step - width + 1
    return range(r, r + 1) if 0 <= r < height else range(0)


def header_ids(height: int, width: int, boi: int, img: int, digit_id, star: int) -> list[int]:
    """``BOI digits(H) '*' digits(W) IMG`` (``digit_id(ch)`` maps '0'…'9' to its token id)."""
    return [boi, *(digit_id(ch) for ch in str(height)), star, *(digit_id(ch) for ch in str(width)), img]


def native_row(row_ids: list[int], row: int, height: int, eol: int, eoi: int) -> list[int]:
    """One finished row as Emu3.5 writes it: its ids then EOL, or EOI after the last row."""
    return [*row_ids, eoi if row == height - 1 else eol]
