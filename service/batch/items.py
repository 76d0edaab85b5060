"""One prompt of a batch, and the error that names it.

Reading an input file yields an :class:`Item` per prompt, or an :class:`ItemError` for a prompt that
cannot run (a missing image, an unknown task): a batch goes on without it and reports it by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.limits import MAX_REFERENCE_IMAGES
from service.prompts import Task
from service.task import GenerationOptions


@dataclass(frozen=True)
class ItemError:
    """Why one prompt cannot run: its name, the input field at fault (None: the prompt as a whole)."""

    name: str
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f" ({self.field})" if self.field else ""
        return f"prompt {self.name}{where}: {self.reason}"


@dataclass(frozen=True)
class Item:
    """One prompt, ready to plan: the reference images are still paths (read when its turn comes)."""

    name: str
    task: Task
    question: str
    image_paths: tuple[Path, ...] = ()
    options: GenerationOptions = GenerationOptions()
    images_field: str = "images"  # what the input calls the reference paths (for messages)


def check_name(name: str) -> str | None:
    """Why ``name`` cannot name a record file (None: it can). Names come from users' dict keys."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return f"{name!r} cannot be a file name (empty, '.', '..' or a path separator)"
    return None


def check_image_paths(paths: list[str], base: Path) -> tuple[tuple[Path, ...], str | None]:
    """The reference paths resolved against ``base``, or why they cannot be used (count, missing file).

    Only existence is checked here; an unreadable image fails when it is opened, as the same prompt."""
    if len(paths) > MAX_REFERENCE_IMAGES:
        return (), f"at most {MAX_REFERENCE_IMAGES} reference images are supported, got {len(paths)}"
    resolved = tuple(p if p.is_absolute() else base / p for p in map(Path, paths))
    for given, path in zip(paths, resolved):
        if not path.is_file():
            return (), f"reference image {given!r} not found (looked for {path})"
    return resolved, None
