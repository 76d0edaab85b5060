"""The release's config files (``configs/example_config_*.py``), read unchanged.

A config is a Python module whose top does ``from src.utils.logging_utils import setup_logger`` and
calls ``setup_logger(save_path)`` (which, in the release, redirects ``print`` to a log file). It is
executed here with a stand-in ``src.utils.logging_utils`` placed in ``sys.modules`` only while the file
runs, so neither the release nor an edit is needed, and the caller's ``print`` is left alone.

Fields read (anything else, such as the prompt templates, is the service's own business):
``task_type``, ``use_image``, ``prompts``, ``classifier_free_guidance``, ``max_new_tokens``,
``image_area``, ``seed``, ``save_path``, ``unconditional_type``, ``target_height``/``target_width``,
``sampling_params`` (``text_*`` / ``image_*`` top-k, top-p, temperature) and
``model_path``/``vq_path``/``tokenizer_path``. A value the service cannot honour is an
:class:`InputError` naming the field, raised before any prompt runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from service.batch.items import Item, ItemError, check_image_paths, check_name
from service.batch.job import BatchJob, InputError, ModelPaths
from service.prompts import ASPECT_RATIOS, ASPECT_TABLE_AREA, Task
from service.task import GenerationOptions, PlanError, SamplingOverride, resolve

#: The modules a release config imports from the release, stood in for while it runs.
_STUB_MODULES = ("src", "src.utils", "src.utils.logging_utils")
#: The release's one unconditional prompt kind (its configs all use it).
SUPPORTED_UNCONDITIONAL_TYPES = ("no_text",)


def _setup_logger(*_args: Any, **_kwargs: Any) -> None:
    """The stand-in for the release's ``setup_logger``: the command logs on its own."""


@contextlib.contextmanager
def _release_stubs() -> Iterator[None]:
    """``src.utils.logging_utils.setup_logger`` importable while a config runs; sys.modules restored after."""
    saved = {name: sys.modules[name] for name in _STUB_MODULES if name in sys.modules}
    for name in _STUB_MODULES:
        module = types.ModuleType(name)
        module.__path__ = []  # a package, so the submodule import resolves
        sys.modules[name] = module
    vars(sys.modules["src.utils.logging_utils"])["setup_logger"] = _setup_logger
    try:
        yield
    finally:
        for name in _STUB_MODULES:
            if name in saved:
                sys.modules[name] = saved[name]
            else:
                sys.modules.pop(name, None)


def load_config_module(path: Path) -> types.ModuleType:
    """Execute the config file; any exception it raises is an :class:`InputError` naming the file."""
    if not path.is_file():
        raise InputError("--cfg", f"{path} is not a file")
    spec = importlib.util.spec_from_file_location(f"emu35_release_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise InputError("--cfg", f"{path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    with _release_stubs():
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:  # noqa: BLE001 - a config's own error, shown to its author
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise InputError("--cfg", f"{path} raised on import: {type(exc).__name__}: {exc}") from exc
    return module


def _task(cfg: types.ModuleType) -> Task:
    value = getattr(cfg, "task_type", None)
    try:
        return Task(value)
    except ValueError:
        raise InputError("task_type", f"unknown task {value!r}; one of {', '.join(t.value for t in Task)}") from None


def _size(cfg: types.ModuleType) -> str | None:
    """The release's ``target_height``/``target_width`` (a grid of its aspect table) as a size spec."""
    if not hasattr(cfg, "target_height") and not hasattr(cfg, "target_width"):
        return None
    h, w = getattr(cfg, "target_height", None), getattr(cfg, "target_width", None)
    if h is None and w is None:
        return "auto"  # the release's aspect_ratio = "auto": the model chooses
    for ratio, grid in ASPECT_RATIOS.items():
        if grid == (h, w):
            return ratio
    known = ", ".join(f"{a}×{b}" for a, b in ASPECT_RATIOS.values())
    raise InputError("target_height/target_width", f"{h}×{w} is not a grid of the release's aspect table at "
                     f"{ASPECT_TABLE_AREA} px ({known}); use one of those, or None for 'auto'")


def _sampling(params: Mapping[str, Any], kind: str) -> SamplingOverride:
    return SamplingOverride(top_k=params.get(f"{kind}_top_k"), top_p=params.get(f"{kind}_top_p"),
                            temperature=params.get(f"{kind}_temperature"))


def _options(cfg: types.ModuleType, task: Task) -> GenerationOptions:
    """The settings every prompt shares, checked once against the task's defaults."""
    utype = getattr(cfg, "unconditional_type", "no_text")
    if utype not in SUPPORTED_UNCONDITIONAL_TYPES:
        raise InputError("unconditional_type", f"{utype!r} is not supported; use {SUPPORTED_UNCONDITIONAL_TYPES}")
    params = getattr(cfg, "sampling_params", {}) or {}
    if not isinstance(params, Mapping):
        raise InputError("sampling_params", f"must be a dict, got {type(params).__name__}")
    options = GenerationOptions(
        size=_size(cfg), cfg_scale=getattr(cfg, "classifier_free_guidance", None),
        max_new_tokens=getattr(cfg, "max_new_tokens", None), text=_sampling(params, "text"),
        image=_sampling(params, "image"), image_area=getattr(cfg, "image_area", None))
    for field, value, kind in (("classifier_free_guidance", options.cfg_scale, (int, float)),
                               ("max_new_tokens", options.max_new_tokens, int),
                               ("image_area", options.image_area, int)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or value <= 0):
            raise InputError(field, f"must be a positive number, got {value!r}")
    try:
        resolve(task, options)  # sampling settings the engine cannot use fail here, before any prompt
    except (PlanError, ValueError, TypeError) as exc:
        raise InputError("sampling_params", str(exc)) from None
    return options


def _entries(prompts: Any) -> list[tuple[str, Any]]:
    """(name, item) pairs named as the release names them: the keys of a dict, else 000, 001, …"""
    if isinstance(prompts, Mapping):
        return [(str(k), v) for k, v in prompts.items()]
    if isinstance(prompts, (list, tuple)):
        return [(f"{i:03d}", p) for i, p in enumerate(prompts)]
    raise InputError("prompts", f"must be a list or a dict, got {type(prompts).__name__}")


def _item(name: str, raw: Any, task: Task, use_image: bool, options: GenerationOptions, base: Path,
          seed: int | None) -> Item | ItemError:
    if (bad := check_name(name)) is not None:
        return ItemError(name, "prompts", bad)
    refs: list[str | Path] = []
    question: Any
    if isinstance(raw, str):
        question = raw
        if use_image:
            return ItemError(name, "reference_image", "use_image is True but the item is a plain string")
    elif isinstance(raw, Mapping):
        question = raw.get("prompt")
        if not isinstance(question, str):
            return ItemError(name, "prompt", "missing, or not a string")
        ref = raw.get("reference_image")
        refs = [] if ref is None else [ref] if isinstance(ref, (str, Path)) else list(ref)
        if not all(isinstance(r, (str, Path)) for r in refs):
            return ItemError(name, "reference_image", "must be a path or a list of paths")
    else:
        return ItemError(name, "prompts", f"an item must be a string or a dict, got {type(raw).__name__}")
    paths, why = check_image_paths([str(r) for r in refs], base)
    if why is not None:
        return ItemError(name, "reference_image", why)
    return Item(name, task, question, paths, options if seed is None else replace(options, seed=seed),
                images_field="reference_image")


def read_release_config(path: str | Path, cwd: Path | None = None) -> BatchJob:
    """A release config file as a batch. Relative paths (references, ``save_path``) are taken from
    ``cwd`` (default: the current folder), as the release, which is run from its repository root.

    Each prompt's seed is the config's ``seed`` plus its position in the whole list, so a prompt draws
    the same answer whichever worker runs it and whether or not the run was resumed."""
    base = cwd or Path.cwd()
    cfg = load_config_module(Path(path))
    task = _task(cfg)
    options = _options(cfg, task)
    seed = getattr(cfg, "seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InputError("seed", f"must be a non-negative integer, got {seed!r}")
    if not hasattr(cfg, "prompts"):
        raise InputError("prompts", "the config defines no prompts")
    use_image = bool(getattr(cfg, "use_image", False))
    entries = [_item(name, raw, task, use_image, options, base, None if seed is None else seed + i)
               for i, (name, raw) in enumerate(_entries(cfg.prompts))]
    save_path = getattr(cfg, "save_path", None)
    paths = ModelPaths(*(None if (v := getattr(cfg, k, None)) is None else str(v)
                         for k in ("model_path", "vq_path", "tokenizer_path")))
    return BatchJob(entries, None if save_path is None else base / str(save_path), paths, release_config=True)
