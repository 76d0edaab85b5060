"""``--prompts FILE.jsonl``: one request per line, the fields of ``/v1/generate`` plus ``name`` and
``images`` as file paths.

Each line is validated by the HTTP API's own request model (same fields, same limits, unknown fields
refused), so a line means what the same JSON means to ``POST /v1/generate``. A line that fails is an
:class:`ItemError` naming the line's prompt and the field; the other lines go on. The streaming-only
fields (``stream``, ``preview_every_rows``, ``include_record``) are accepted and have no effect.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from service.batch.items import Item, ItemError, check_image_paths, check_name
from service.batch.job import BatchJob, InputError
from service.schema.common import decoding_choice, sampling_override
from service.schema.emu35 import GenerateRequest
from service.task import GenerationOptions


class BatchLine(GenerateRequest):
    """One JSONL line: a ``/v1/generate`` request whose images are paths, with a record name."""

    name: str | None = Field(None, description="record name (default: the line's index, 000, 001, …)")
    images: list[str] = Field(default_factory=list, description="reference image paths (at most 3)")


def _first_error(exc: ValidationError) -> tuple[str | None, str]:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or None
    return where, err["msg"]


def _options(line: BatchLine) -> GenerationOptions:
    return GenerationOptions(
        size=line.size_spec(), cfg_scale=line.guidance_scale, max_new_tokens=line.max_new_tokens,
        text=sampling_override(line.text_sampling), image=sampling_override(line.image_sampling),
        seed=line.seed, image_area=line.image_area, uncond_mode=line.uncond_mode,
        decoding=decoding_choice(line.decoding))


def parse_line(text: str, default_name: str, base: Path) -> Item | ItemError:
    """One line as an item (or why it cannot run). ``images`` are resolved against ``base``."""
    try:
        raw: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        return ItemError(default_name, None, f"not valid JSON: {exc}")
    name = raw.get("name", default_name) if isinstance(raw, dict) else default_name
    name = name if isinstance(name, str) else default_name
    if isinstance(raw, dict) and isinstance(raw.get("images"), list):
        paths, why = check_image_paths([str(p) for p in raw["images"]], base)
        if why is not None:
            return ItemError(name, "images", why)
    try:
        line = BatchLine.model_validate(raw)
    except ValidationError as exc:
        return ItemError(name, *_first_error(exc))
    if (bad := check_name(name)) is not None:
        return ItemError(name, "name", bad)
    paths, _ = check_image_paths(line.images, base)
    return Item(name, line.task, line.prompt, paths, _options(line))


def read_jsonl(path: str | Path, cwd: Path | None = None) -> BatchJob:
    """Every non-blank line of ``path``; relative image paths are taken from ``cwd`` (default: here)."""
    base = cwd or Path.cwd()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError("--prompts", f"cannot read {path}: {exc}") from exc
    texts = [t for t in lines if t.strip()]
    entries = [parse_line(t, f"{i:03d}", base) for i, t in enumerate(texts)]
    dupes = sorted(n for n, count in Counter(e.name for e in entries).items() if count > 1)
    if dupes:
        raise InputError("name", f"names must be unique (each is a record file); repeated: {', '.join(dupes)}")
    return BatchJob(entries)
