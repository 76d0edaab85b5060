"""Which rows of an image get a decoded preview while it is drawn.

Emu3.5 writes an image row by row, so a preview decoded from the rows done so far is real progress.
Decoding costs a VQ forward pass, so previews are decoded only at the rows a schedule names, never more
often: every N rows (Emu3.5's ``preview_every_rows``, but never more than ``MAX_PREVIEWS_PER_IMAGE``
per image: each preview is a decode on the VQ worker every request shares) or k previews spread evenly
over the image (OpenAI's ``partial_images``). The image's last row never gets one: the finished image follows at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.limits import MAX_PREVIEWS_PER_IMAGE


@dataclass(frozen=True)
class PreviewSchedule:
    """A rule naming the preview rows of an image of ``total`` rows (exactly one field is set)."""

    every_rows: int | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if (self.every_rows is None) == (self.count is None):
            raise ValueError("a preview schedule needs exactly one of every_rows and count")
        if self.every_rows is not None and self.every_rows < 1:
            raise ValueError(f"every_rows must be >= 1, got {self.every_rows}")
        if self.count is not None and self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")

    @classmethod
    def every(cls, rows: int) -> "PreviewSchedule":
        return cls(every_rows=rows)

    @classmethod
    def spread(cls, count: int) -> "PreviewSchedule":
        return cls(count=count)

    def rows(self, total: int) -> tuple[int, ...]:
        """The rows (1-based counts of rows done, ascending, each < ``total``) that get a preview.

        ``spread(k)`` puts preview i at ``round(total·(i+1)/(k+1))``; an image with fewer than k+1 rows
        gets fewer previews (as OpenAI allows: the final image may come first)."""
        if self.every_rows is not None:  # never more than MAX_PREVIEWS_PER_IMAGE, whatever was asked
            step = max(self.every_rows, -(-total // MAX_PREVIEWS_PER_IMAGE))
            return tuple(range(step, total, step))
        k = self.count or 0
        picked = {round(total * (i + 1) / (k + 1)) for i in range(k)}
        return tuple(sorted(r for r in picked if 1 <= r < total))
