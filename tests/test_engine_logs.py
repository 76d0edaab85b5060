"""How loud vLLM is (issue 29's quiet command line), without starting it: the environment the engine
processes inherit, the warnings the service causes on purpose filtered out and every other one kept,
and ``--log-level debug`` showing everything. The command's own line count is in test_batch_cli.py."""

from __future__ import annotations

import json
import logging
import logging.config
import os
import warnings

import pytest

from service.engine import vllm_logs
from service.engine.vllm_logs import EXPECTED_WARNINGS, ExpectedWarnings, quiet_engine_logs, vllm_logging_config

VARIABLES = ("VLLM_LOGGING_LEVEL", "VLLM_LOGGING_CONFIG_PATH", "TORCH_CPP_LOG_LEVEL", "PYTHONWARNINGS",
             "TRANSFORMERS_VERBOSITY")


@pytest.fixture
def clean_env(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(vllm_logs, "_loading_bars", True)
    root, vllm = logging.getLogger(), logging.getLogger("vllm")
    handlers, vllm_state = list(root.handlers), (list(vllm.handlers), vllm.level, vllm.propagate)
    with warnings.catch_warnings():  # quiet_engine_logs ignores FutureWarnings in this process
        yield
    root.handlers[:] = handlers
    for h in handlers:
        h.filters[:] = [f for f in h.filters if not isinstance(f, ExpectedWarnings)]
    vllm.handlers[:], vllm.level, vllm.propagate = vllm_state


def record(level: int, msg: str, name: str = "vllm.config") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_by_default_vllm_logs_warnings_to_stderr_less_the_expected_ones(clean_env):
    quiet_engine_logs("info")
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING" and os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"
    assert vllm_logs.loading_bars() is False
    with open(os.environ["VLLM_LOGGING_CONFIG_PATH"]) as f:
        config = json.load(f)
    assert config == vllm_logging_config()
    handler = config["handlers"]["stderr"]
    assert handler["level"] == "WARNING" and handler["stream"] == "ext://sys.stderr"
    assert config["loggers"]["vllm"] == {"handlers": ["stderr"], "level": "WARNING", "propagate": False}
    logging.config.dictConfig(config)  # what vLLM does with it: the filter class must import
    vllm_handler = logging.getLogger("vllm").handlers[0]
    assert any(isinstance(f, ExpectedWarnings) for f in vllm_handler.filters)


def test_debug_shows_everything_and_nothing_is_filtered(clean_env):
    quiet_engine_logs("debug")
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG" and "VLLM_LOGGING_CONFIG_PATH" not in os.environ
    assert "TORCH_CPP_LOG_LEVEL" not in os.environ and vllm_logs.loading_bars() is True


def test_a_variable_the_user_set_is_kept(clean_env, monkeypatch):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    monkeypatch.setenv("VLLM_LOGGING_CONFIG_PATH", "/etc/mine.json")
    quiet_engine_logs("info")
    assert os.environ["VLLM_LOGGING_LEVEL"] == "INFO" and os.environ["VLLM_LOGGING_CONFIG_PATH"] == "/etc/mine.json"


@pytest.mark.parametrize("known, why", EXPECTED_WARNINGS)
def test_each_expected_warning_is_dropped_and_has_a_reason(known, why):
    assert why and not ExpectedWarnings().filter(record(logging.WARNING, f"... {known} ..."))


def test_other_warnings_errors_and_expected_text_at_other_levels_pass():
    f = ExpectedWarnings()
    assert f.filter(record(logging.WARNING, "KV cache is too small for max_model_len"))
    assert f.filter(record(logging.ERROR, "Using custom scheduler class failed"))  # an error is never dropped
    assert f.filter(record(logging.INFO, "anything"))
