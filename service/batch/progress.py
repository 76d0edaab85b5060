"""How a batch reports as it goes: a progress bar on a terminal, one log line per prompt elsewhere.

The bar (tqdm) shows images/s and the ETA; in a log (a pod, a redirected run) a bar's carriage returns
are noise, so each finished prompt is one line with the same numbers. ``--quiet`` keeps only failures.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Protocol

from tqdm import tqdm

logger = logging.getLogger("service.batch")


class Progress(Protocol):
    def done(self, name: str, status: str, detail: str = "") -> None: ...

    def close(self) -> None: ...


class BarProgress:
    """A tqdm bar over the prompts this run generates (skipped ones are not counted in its rate)."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, unit="img", desc="generate", dynamic_ncols=True)

    def done(self, name: str, status: str, detail: str = "") -> None:
        if status == "failed":
            self.bar.write(f"failed: prompt {name}: {detail}", file=sys.stderr)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class LogProgress:
    """``[3/16] 002 ok (0.85 img/s, ETA 15 s)`` per prompt; with ``quiet`` only failures."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total = total
        self.quiet = quiet
        self.count = 0
        self.started = time.monotonic()

    def done(self, name: str, status: str, detail: str = "") -> None:
        self.count += 1
        if status == "failed":
            logger.error("[%d/%d] prompt %s failed: %s", self.count, self.total, name, detail)
            return
        if self.quiet:
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.count / elapsed
        eta = (self.total - self.count) / rate if rate > 0 else float("inf")
        logger.info("[%d/%d] %s %s%s (%.2f img/s, ETA %.0f s)", self.count, self.total, name, status,
                    f" {detail}" if detail else "", rate, eta)

    def close(self) -> None:
        pass


def make_progress(total: int, quiet: bool, tty: bool | None = None) -> Progress:
    """A bar on a terminal (unless ``quiet``), log lines elsewhere."""
    tty = sys.stderr.isatty() if tty is None else tty
    if tty and not quiet:
        return BarProgress(total)
    return LogProgress(total, quiet)
