"""``emu35-serve``: settings → app → uvicorn, with a graceful drain on SIGTERM/SIGINT.

The first signal stops admission (``/ready`` answers 503, new generations 503) while in-flight
generations go on for up to ``--shutdown-grace-seconds``; then the server stops, aborting whatever is
left. A second signal stops at once. The process exits 0 after a graceful drain.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.lm_checkpoint import CheckpointError
from service.server.runtime import Runtime
from service.server.settings import Settings, load_settings

logger = logging.getLogger("service.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, runtime: Runtime, grace: float) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.grace = grace
        self._drain_since: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_since is None:
            logger.info("signal %s: draining (no new work; %d in flight; grace %.0f s)",
                        signal.Signals(sig).name, len(self.runtime.inflight), self.grace)
            self._drain_since = time.monotonic()
            self.runtime.begin_drain()
        else:  # a second signal: stop now
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT

    async def on_tick(self, counter: int) -> bool:
        if self._drain_since is not None and not self.should_exit:
            if not self.runtime.inflight or time.monotonic() - self._drain_since >= self.grace:
                self.should_exit = True  # the lifespan shutdown aborts what is left
        return await super().on_tick(counter)


def prepare_settings(settings: Settings) -> Settings:
    if settings.demo:
        from service.tiny.make import ensure_tiny

        started = time.monotonic()
        tiny = ensure_tiny()
        logger.info("demo: tiny checkpoints in %s (%.1f s)", tiny, time.monotonic() - started)
        settings = settings.with_demo_defaults(tiny)
    return settings


def check_model(settings: Settings) -> None:
    """Refuse, before anything starts, a W8A8 checkpoint that is inconsistent or cannot be served here."""
    from service.quant.serving import check_w8a8

    if settings.model is None:  # the settings refuse this; nothing to check
        return
    if check_w8a8(settings.model, settings.quantization) is not None and settings.engine_kind != "vllm":
        raise CheckpointError(f"{settings.model} is an msModelSlim W8A8 checkpoint: it needs the vllm engine "
                              f"(--engine {settings.engine} cannot serve it)")


def serve(settings: Settings) -> int:
    from service.server.app import create_app, describe

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = prepare_settings(settings)
    try:
        check_model(settings)
    except CheckpointError as exc:
        print(f"emu35-serve: --model: {exc}", file=sys.stderr)
        return 2
    logger.info("settings: %s", json.dumps(describe(settings)))
    runtime = Runtime(settings)
    app = create_app(settings, runtime)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5, access_log=settings.log_level == "debug")
    DrainingServer(config, runtime, settings.shutdown_grace_seconds).run()
    return 0 if runtime.error is None else 1


def serve_main(argv: list[str]) -> int:
    try:
        settings = load_settings(argv)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"emu35-serve: {where}: {err['msg']}", file=sys.stderr)
        return 2
    return serve(settings)
