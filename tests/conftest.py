"""Shared fixtures: the real tokenizer files (test data beside the repository) and the tiny checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.tokenizer import Emu35Tokenizer
from tests.quant_env import HAVE_MSMODELSLIM, NO_MSMODELSLIM

REAL_TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "emu35-tokenizer"
HAVE_REAL_TOKENIZER = (REAL_TOKENIZER_DIR / "emu3.tiktoken").is_file()
NO_REAL_TOKENIZER = f"real Emu3.5 tokenizer files not found at {REAL_TOKENIZER_DIR} (test data beside the repository)"


def pytest_configure(config: pytest.Config) -> None:
    """On a test lane (``EMU35_REQUIRE_VLLM=<version>``, set by the Makefile), a missing or wrong vLLM
    is an error, not a reason to skip: the vLLM tests would otherwise pass by not running."""
    wanted = os.environ.get("EMU35_REQUIRE_VLLM")
    if not wanted:
        return
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 - any import failure means the lane is broken
        raise pytest.UsageError(f"this lane needs vLLM {wanted}, but `import vllm` failed: {exc!r}") from exc
    if not vllm.__version__.startswith(wanted):
        raise pytest.UsageError(f"this lane needs vLLM {wanted}, but vLLM {vllm.__version__} is installed")
    # the W8A8 tests skip without msModelSlim; on a lane (which installs the quant extra) that is an error
    if not HAVE_MSMODELSLIM:
        raise pytest.UsageError("this lane needs msModelSlim (the quant extra), but it is not installed")


@pytest.fixture(scope="session")
def real_tokenizer() -> Emu35Tokenizer:
    """The real Emu3.5 tokenizer; tests that need it skip with a reason when the files are absent."""
    if not HAVE_REAL_TOKENIZER:
        pytest.skip(NO_REAL_TOKENIZER)
    return Emu35Tokenizer.from_dir(REAL_TOKENIZER_DIR)


@pytest.fixture(scope="session")
def any_tokenizer(tmp_path_factory) -> Emu35Tokenizer:
    """The real tokenizer when present, else the synthetic one (same id layout), so layout tests always run."""
    if HAVE_REAL_TOKENIZER:
        return Emu35Tokenizer.from_dir(REAL_TOKENIZER_DIR)
    from service.tiny.tokenizer_files import write_tokenizer

    return Emu35Tokenizer.from_dir(write_tokenizer(tmp_path_factory.mktemp("synthetic_tokenizer")))


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The cached tiny checkpoints (built on first use by ``make-tiny``)."""
    from service.tiny.make import ensure_tiny

    return ensure_tiny()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir) -> Emu35Tokenizer:
    return Emu35Tokenizer.from_dir(tiny_dir / "tokenizer")


@pytest.fixture(scope="session")
def tiny_w8a8() -> Path:
    """The tiny model as bf16 (``bf16/``) and quantised by ``python -m service quantize`` (``w8a8/``), with
    the quantiser's log; built once and cached (needs msModelSlim: the ``quant`` extra)."""
    if not HAVE_MSMODELSLIM:
        pytest.skip(NO_MSMODELSLIM)
    from service.tiny.w8a8 import ensure_tiny_w8a8

    return ensure_tiny_w8a8()


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster on loopback for the session (tests/pgcluster.py); its URL."""
    from tests.pgcluster import postgres_cluster

    with postgres_cluster() as url:
        yield url
