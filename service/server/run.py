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
from types import FrameType
from typing import Callable

import uvicorn
from pydantic import ValidationError

from service.server.core.auth import ApiKeysError
from service.server.core.connections import guarded_h11
from service.server.core.runtime import Runtime
from service.settings import Settings, load_settings
from service.task import LOG_FORMAT, CheckpointError, check_model, quiet_engine_logs

logger = logging.getLogger("service.server")


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on the first signal: the runtime decides when the drain is complete."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime, grace: float) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.grace = grace

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.runtime.drain_deadline is None:
            logger.info("signal %s: draining", signal.Signals(sig).name)
            self.runtime.begin_drain(self.grace)
        else:  # a second signal: stop now
            self.should_exit = True
            self.force_exit = sig == signal.SIGINT

    async def on_tick(self, counter: int) -> bool:
        if not self.should_exit and self.runtime.should_exit():
            self.should_exit = True  # the lifespan shutdown aborts what is left
        return await super().on_tick(counter)


def serve(settings: Settings) -> int:
    """Run the service with ``settings`` (the demo's tiny checkpoints already filled in by the CLI)."""
    from service.server.app import create_app, describe

    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    quiet_engine_logs(settings.log_level)  # vLLM at warnings unless --log-level debug
    # httpx logs every request's whole URL at INFO: for a webhook that is its token (docs/security.md)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        check_model(settings)
    except CheckpointError as exc:
        print(f"emu35-serve: {getattr(exc, 'flag', '--model')}: {exc}", file=sys.stderr)
        return 2
    logger.info("settings: %s", json.dumps(describe(settings)))
    try:
        runtime = Runtime(settings)
    except ApiKeysError as exc:
        print(f"emu35-serve: --api-keys-file: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, runtime)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=5, access_log=settings.log_level == "debug",
                            http=guarded_h11(settings.max_connections, settings.header_timeout, settings.body_timeout),
                            timeout_keep_alive=settings.keep_alive_timeout)
    DrainingServer(config, runtime, settings.shutdown_grace_seconds).run()
    return 0 if runtime.error is None else 1


def serve_main(argv: list[str], prepare: Callable[[Settings], Settings] | None = None) -> int:
    """``emu35-serve ARGS``; ``prepare`` may complete the settings first (the CLI's ``--demo``)."""
    try:
        settings = load_settings(argv)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"emu35-serve: {where}: {err['msg']}", file=sys.stderr)
        return 2
    if prepare is not None:
        settings = prepare(settings)
    return serve(settings)
