"""How loud vLLM and the libraries under it are: at warnings by default, everything with ``--log-level debug``.

vLLM logs some sixty INFO lines while it starts, from three processes, to stdout, plus a dozen warnings
that this service's own choices cause (eager mode on a CPU, its pair scheduler, prompts given as token
ids, no tokenizer in the engine). A person running ``emu35-generate`` or ``emu35-serve --demo`` then
cannot find the progress and the summary among them. So, unless the log level is ``debug``:

- vLLM logs warnings and errors only, to stderr, in the service's own line format, less the warnings
  listed in :data:`EXPECTED_WARNINGS` (each with the reason it is expected here);
- its weight-loading bar (:func:`loading_bars`), torch's C++ notices and Python's FutureWarnings
  are off.

vLLM 0.32's engine processes log a line or two (its Triton probe) before vLLM configures their logging;
Python prints those whatever the level, so they are the one thing left.

vLLM's engine runs in child processes, so all of this is said through environment variables (and a
logging configuration file vLLM reads, ``VLLM_LOGGING_CONFIG_PATH``), set before vLLM is imported and
inherited by the children. A variable the user set is left as it is. This module imports nothing but the
standard library: vLLM imports it (the filter) while it configures its logging.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import tempfile

#: vLLM warnings this service causes on purpose or that say nothing a user can act on, and why.
EXPECTED_WARNINGS: tuple[tuple[str, str], ...] = (
    ("Enforce eager set", "the service runs eagerly on a CPU (graph mode elsewhere)"),
    ("Inductor compilation was disabled", "follows from eager mode"),
    ("Triton is not installed", "no Triton on a CPU"),
    ("Triton is installed, but doesn't include CPU backend", "no Triton on a CPU"),
    ("Model Runner V2 requires Triton", "no Triton on a CPU"),
    ("Reset SSM cache type", "the model has no SSM layers"),
    ("is not found in LD_PRELOAD", "an optional allocator for CPU speed; docs/vllm-interfaces.md"),
    ("Using custom scheduler class", "the Emu3.5 pair scheduler is this service's, on purpose"),
    ("Using configured V1 scheduler class", "the same, as vLLM 0.11 says it"),
    ("cudagraph dispatching keys are not initialized", "follows from eager mode (vLLM 0.11)"),
    ("Pin memory is not supported on CPU", "nothing to pin on a CPU (vLLM 0.11)"),
    ("The vLLM package was not found, so its version could not be inspected",
     "vLLM built from source without package metadata (the CPU build); the platform is still found"),
    ("Passing raw prompts to InputProcessor is deprecated", "prompts are token ids, built by the service"),
    ("Using None for EOS token id because tokenizer is not initialized",
     "the engine has no tokenizer on purpose; the service stops generations itself"),
    ("[shutdown] Process manager: force killing", "the engine's processes are stopped at exit"),
    ("[shutdown] force killing sub process", "the engine's processes are stopped at exit"),
)

#: Whether vLLM shows its loading bars: yes until :func:`quiet_engine_logs` says otherwise (a library
#: user of the engine sees vLLM as vLLM is).
_loading_bars = True

#: The service's own log line format (run.py and the batch command use it too).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ExpectedWarnings(logging.Filter):
    """Drops the warnings of :data:`EXPECTED_WARNINGS`; errors and every other record pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        text = str(record.msg)
        return not any(known in text for known, _ in EXPECTED_WARNINGS)


def vllm_logging_config() -> dict:
    """vLLM's logging, as :func:`logging.config.dictConfig` takes it: warnings up, expected ones out."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"expected": {"()": f"{__name__}.ExpectedWarnings"}},
        "formatters": {"service": {"format": LOG_FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "service", "filters": ["expected"], "level": "WARNING"}},
        "loggers": {"vllm": {"handlers": ["stderr"], "level": "WARNING", "propagate": False}},
    }


def quiet_engine_logs(log_level: str) -> None:
    """Set how loud vLLM and its libraries are for this process and the engine processes it starts;
    call before vLLM is imported. ``debug``: everything vLLM says, as vLLM says it."""
    global _loading_bars
    env = os.environ
    _loading_bars = log_level.lower() == "debug"
    if _loading_bars:
        env.setdefault("VLLM_LOGGING_LEVEL", "DEBUG")
        return
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its deprecation notes about vLLM's own calls
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    if "VLLM_LOGGING_CONFIG_PATH" not in env:
        env["VLLM_LOGGING_CONFIG_PATH"] = _write_config(vllm_logging_config())
    _silence_expected_in_this_process()


def loading_bars() -> bool:
    """Whether the engine should draw its weight-loading bars (vLLM's ``use_tqdm_on_load``)."""
    return _loading_bars


def _write_config(config: dict) -> str:
    """The config as a file for vLLM to read (in this process and its children); removed at exit."""
    fd, path = tempfile.mkstemp(prefix="emu35-vllm-logging-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)

    def remove() -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)

    atexit.register(remove)
    return path


def _silence_expected_in_this_process() -> None:
    """The same filter on the root logger's handlers: a vLLM module that logs before vLLM's own
    configuration (its Triton probe at import) reaches them."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("vllm").setLevel(logging.WARNING)  # until vLLM configures it (to the same level)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ExpectedWarnings) for f in handler.filters):
            handler.addFilter(ExpectedWarnings())
