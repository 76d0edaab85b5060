"""``python -m service generate`` / ``emu35-generate``: a release config or a JSONL file through one engine.

The command's own flags are read here; every other flag is ``emu35-serve``'s (model, engine, ``--demo``,
``--max-concurrent`` …) and goes to the service's settings, so both commands configure the engine the
same way. Checkpoint flags win over the config's ``model_path`` / ``vq_path`` / ``tokenizer_path``.

Exit status: 0 when every prompt of this worker's share was generated or skipped, 1 when any failed, 2
when the input or a flag is wrong (nothing ran), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from pydantic import ValidationError

from service.batch.items import Item, ItemError
from service.batch.job import BatchJob, InputError
from service.batch.jsonl import read_jsonl
from service.batch.progress import make_progress
from service.batch.release_config import read_release_config
from service.batch.run import BatchSummary, plan_batch, run_batch, started_runner
from service.batch.shard import JOB_INDEX_ENV, check_shard, default_worker_id, shard
from service.settings import ENV_PREFIX, Settings, load_settings
from service.task import LOG_FORMAT, CheckpointError, check_model, quiet_engine_logs

PROG = "emu35-generate"
logger = logging.getLogger("service.batch")

#: A config's checkpoint paths and the settings they fill when neither a flag nor EMU35_* sets them.
_CONFIG_PATHS = (("model", "model_path"), ("vq_model", "vq_path"), ("tokenizer", "tokenizer_path"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Generate every prompt of a release config (--cfg) or a JSONL file (--prompts) "
        "through one engine, concurrently; write {save_path}/proto/{name}.pb records, skipping names already "
        "written. Every flag of emu35-serve (--model, --vq-model, --demo, --max-concurrent, …) is accepted too.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cfg", type=Path, help="a config file in the release's format (configs/example_config_*.py)")
    src.add_argument("--prompts", type=Path, help="JSONL: one /v1/generate request per line, plus name and "
                     "images as paths")
    p.add_argument("--out", type=Path, help="record folder (default: the config's {save_path}/proto)")
    p.add_argument("--summary", type=Path, help="JSON summary (default: beside the record folder)")
    p.add_argument("--num-workers", type=int, default=1, help="split the prompts between this many workers")
    p.add_argument("--worker-id", type=int, default=None,
                   help=f"this worker's share, 0-based (default: ${JOB_INDEX_ENV}, else 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-prompt lines, failures only")
    return p


def _given(flag: str, argv: Sequence[str]) -> bool:
    """The serve flag ``--flag`` (or its EMU35_ variable) is set, so it wins over the config."""
    env = ENV_PREFIX + flag.replace("-", "_").upper()
    return any(a == f"--{flag}" or a.startswith(f"--{flag}=") for a in argv) or bool(os.environ.get(env))


def settings_argv(job: BatchJob, rest: list[str]) -> list[str]:
    """The serve flags, with the config's checkpoint paths added where no flag sets them (and not in
    ``--demo``, which brings its own). A config path that is not a folder is refused naming its field;
    the release's placeholder ``tokenizer_path`` is ignored (the tokenizer defaults to ``--model``)."""
    out = list(rest)
    if "--demo" in rest or os.environ.get(ENV_PREFIX + "DEMO", "").lower() in ("1", "true", "yes"):
        return out
    for setting, field in _CONFIG_PATHS:
        flag = setting.replace("_", "-")
        value = getattr(job.paths, setting)
        if value is None or _given(flag, rest):
            continue
        if not Path(value).is_dir():
            if setting == "tokenizer":
                logger.warning("config %s %r is not a folder; using the tokenizer of --model", field, value)
                continue
            raise InputError(field, f"{value!r} is not a folder; download the checkpoint and point {field} "
                             f"or --{flag} at it")
        out += [f"--{flag}", value]
    return out


def service_entries(job: BatchJob, entries: list[Item | ItemError], settings: Settings) -> list[Item | ItemError]:
    """Each prompt as this service runs it: on the served model variant and, for a release config, with
    its run-wide settings fitted to the engine: ``--image-area`` (or ``--demo``'s small images) wins over
    the config's ``image_area``, and a ``max_new_tokens`` the context cannot hold becomes what each
    prompt's context leaves (the release's value is a cap; the demo's context is 4,096 tokens)."""
    area_yields = job.release_config and ("image_area" in settings.model_fields_set or settings.demo)
    context = settings.max_model_len if job.release_config else None

    def adapt(e: Item | ItemError) -> Item | ItemError:
        if isinstance(e, ItemError):
            return e
        max_new = e.options.max_new_tokens
        if context is not None and max_new is not None and max_new >= context:
            max_new = None
        options = replace(e.options, variant=settings.variant, max_new_tokens=max_new,
                          image_area=None if area_yields else e.options.image_area)
        return replace(e, options=options)

    adapted = [adapt(e) for e in entries]
    if context is not None and any(isinstance(a, Item) and isinstance(e, Item) and a.options.max_new_tokens
                                   != e.options.max_new_tokens for a, e in zip(adapted, entries)):
        logger.warning("max_new_tokens is over the context (%d tokens): each prompt may take what its "
                       "context leaves", context)
    return adapted


def _summary_path(args: argparse.Namespace, out_dir: Path, worker_id: int) -> Path:
    if args.summary is not None:
        return args.summary
    suffix = "" if args.num_workers == 1 else f".{worker_id}-of-{args.num_workers}"
    return out_dir.parent / f"summary{suffix}.json"


def loaded_line(settings: Settings, seconds: float) -> str:
    """The one line that says what was loaded: the checkpoint, the engine and where it runs."""
    model = "the demo's tiny model" if settings.demo else str(settings.model)
    return (f"loaded {model} on the {settings.engine_kind} engine ({settings.resolved_device}; VQ on "
            f"{settings.resolved_vq_device}) in {seconds:.0f} s")


async def _generate(settings: Settings, todo: list[Item], out_dir: Path, summary: BatchSummary,
                    quiet: bool, plan: str) -> BatchSummary:
    """Start the engine and the VQ worker, run the batch, stop them."""
    main = asyncio.current_task()
    if main is not None:  # a pod's SIGTERM: abort what runs (nothing half-written), keep what is done
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    started = time.monotonic()
    async with started_runner(settings, settings.image_area) as runner:
        logger.info("%s; %s", loaded_line(settings, time.monotonic() - started), plan)
        progress = make_progress(len(todo), quiet)  # from here: the rate counts generation, not loading
        try:
            return await run_batch(runner, todo, out_dir, summary, settings.max_concurrent, progress)
        finally:
            progress.close()


#: Loggers whose start-up lines the loaded line stands for (the demo build, the engine's ready and self-check).
_STARTUP_LOGGERS = ("service.server", "service.engine", "service.tiny")


def quiet_logs(log_level: str) -> None:
    """``--log-level`` for this command: the service's lines at that level; vLLM at warnings and the
    start-up lines of the layers below folded into one (:func:`loaded_line`) unless it is ``debug``."""
    logging.getLogger().setLevel(log_level.upper())
    quiet_engine_logs(log_level)
    if log_level != "debug":
        for name in _STARTUP_LOGGERS:
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def _error(where: str, message: str) -> int:
    print(f"{PROG}: {where}: {message}", file=sys.stderr)
    return 2


def generate_main(argv: list[str], prepare: Callable[[Settings], Settings] | None = None) -> int:
    """``emu35-generate ARGS``; ``prepare`` completes the settings (the CLI's ``--demo``)."""
    args, rest = _parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        worker_id = default_worker_id() if args.worker_id is None else args.worker_id
        job = read_release_config(args.cfg) if args.cfg is not None else read_jsonl(args.prompts)
        serve_argv = settings_argv(job, rest)
        check_shard(args.num_workers, worker_id)
    except InputError as exc:
        return _error(exc.field, exc.reason)
    except ValueError as exc:
        return _error("sharding", str(exc))
    out_dir = args.out or (job.save_path / "proto" if job.save_path is not None else None)
    if out_dir is None:
        return _error("--out", "required with --prompts (a JSONL file names no save_path)")
    try:
        settings = load_settings(serve_argv)
    except ValidationError as exc:
        err = exc.errors()[0]
        return _error(".".join(str(p) for p in err["loc"]) or "settings", err["msg"])
    quiet_logs(settings.log_level)
    if prepare is not None:
        settings = prepare(settings)
    entries = service_entries(job, shard(job.entries, args.num_workers, worker_id), settings)
    todo, summary = plan_batch(entries, out_dir)
    plan = (f"worker {worker_id} of {args.num_workers}: {len(entries)} prompts, {summary.count('skipped')} already "
            f"written, {summary.count('failed')} refused, {len(todo)} to generate into {out_dir}")
    if not todo:  # nothing to load: the plan is the line
        logger.info("%s", plan)
    for bad in summary.failed:
        logger.error("prompt %s failed (%s): %s", bad.name, bad.field, bad.reason)
    status = 0
    if todo:
        try:
            check_model(settings)
        except CheckpointError as exc:
            return _error(getattr(exc, "flag", "--model"), str(exc))
        try:
            asyncio.run(_generate(settings, todo, out_dir, summary, args.quiet, plan))
        except (KeyboardInterrupt, asyncio.CancelledError):
            status = 130
            summary.mark_not_run(todo, "interrupted before it finished")
        except Exception as exc:  # noqa: BLE001 - the engine or the VQ worker failed to start or died
            logger.exception("the engine failed")
            summary.mark_not_run(todo, f"the engine failed: {type(exc).__name__}: {exc}")
    path = _summary_path(args, out_dir, worker_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(summary.to_json() + "\n", encoding="utf-8")
    print(f"{PROG}: generated {summary.count('ok')}, skipped {summary.count('skipped')}, failed "
          f"{summary.count('failed')}; summary {path}", file=sys.stderr)
    return status or (1 if summary.failed else 0)
