"""Service settings: command-line flags, ``EMU35_*`` environment variables, defaults — one model.

``emu35-serve --max-concurrent 4`` and ``EMU35_MAX_CONCURRENT=4`` set the same field (flags win over
the environment). ``--demo`` fills in the built-in tiny checkpoints and CPU devices for whatever was not
set explicitly.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.limits import MAX_IMAGE_AREA, MIN_IMAGE_AREA
from service.prompts import ModelVariant
from service.types import MAX_DRAFT_LEN, MAX_WINDOW, MIN_WINDOW, Decoding, DecodingMode

ENV_PREFIX = "EMU35_"
#: Image area (px) every task uses in ``--demo`` unless set: a 13×18-token T2I image, seconds on a CPU.
DEMO_IMAGE_AREA = 256 * 256
#: Context of the demo engine (the tiny model's answers are a few hundred tokens).
DEMO_MAX_MODEL_LEN = 4096


def default_accelerator() -> str:
    """``npu:0`` where torch_npu is installed (Ascend images), else ``cuda:0`` when CUDA works, else ``cpu``."""
    if importlib.util.find_spec("torch_npu") is not None:
        return "npu:0"
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda:0"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return "cpu"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class Settings(BaseSettings):
    """Everything the service can be told. Paths are folders in the release's formats (design.md §6)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="emu35-serve",
        extra="forbid",
        validate_default=True,
    )

    # ---- model ------------------------------------------------------------------------------------
    model: Path | None = Field(None, description="Emu3.5 checkpoint folder (config.json + safetensors)")
    vq_model: Path | None = Field(None, description="IBQ vision tokenizer folder (config.yaml + model.ckpt)")
    tokenizer: Path | None = Field(
        None, description="tokenizer folder (emu3.tiktoken + emu3_vision_tokens.txt); default: --model")
    #: The values, not the enum, so ``--help`` lists ``{emu3.5,emu3.5-image}`` as the README and
    #: EMU35_MODEL_VARIANT spell them (an enum would be listed by its member names).
    model_variant: Literal["emu3.5", "emu3.5-image"] = Field(
        "emu3.5", description="which release the weights are: its per-task defaults (design.md §4)")
    served_model_name: str = Field("emu3.5", min_length=1, description="model id in /v1/models and OpenAI APIs")

    # ---- engine -----------------------------------------------------------------------------------
    engine: Literal["auto", "vllm", "reference", "native"] = Field(
        "auto", description="vllm (default when installed: throughput, one token per pass), native (the latency of "
                            "one image: fewer passes per image with --decoding jacobi or zipar) or reference "
                            "(transformers, one request at a time); a FlashAR checkpoint gets its own engine")
    decoding: DecodingMode | None = Field(
        None, description="the decoding schedule a request gets when it names none: ar (one token per pass), jacobi "
                          "(speculative Jacobi, lossless) or zipar (rows in parallel, approximate); the engine must "
                          "offer it (vllm and reference: ar only); default: ar")
    draft_len: int | None = Field(
        None, ge=1, le=MAX_DRAFT_LEN, description="with --decoding jacobi or zipar: draft tokens verified per pass "
                                                  "(default: the engine's)")
    window: int | None = Field(
        None, ge=MIN_WINDOW, le=MAX_WINDOW, description="with --decoding zipar: tokens a row needs before the next "
                                                        "one opens (default: the engine's)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor-parallel size (NPUs/GPUs)")
    device: str = Field("auto", description="reference/FlashAR engine device: cpu, cuda:N, npu:N (auto: best present); "
                                            "FlashAR also takes a list, npu:0,npu:1, and splits its layers across it")
    vq_device: str = Field("auto", description="VQ worker device (auto: npu:0 with torch_npu, else cuda:0, else cpu)")
    dtype: str = Field("auto", description="weights dtype: auto, bfloat16, float16, float32")
    max_model_len: int | None = Field(None, ge=64, description="context length (default: the model's)")
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1, description="vLLM's share of accelerator memory")
    quantization: str | None = Field(
        None, description="vLLM quantization; unset: detected (an msModelSlim W8A8 checkpoint is served with "
                          "'ascend' where vllm-ascend is installed, else converted to compressed-tensors int8)")
    w8a8_cache_dir: Path | None = Field(
        None, description="where a W8A8 checkpoint's compressed-tensors form is written for vLLM without "
                          "vllm-ascend (default: $EMU35_CACHE_DIR/w8a8, else ~/.cache/emu35-serve/w8a8)")
    enforce_eager: bool = Field(False, description="never capture graphs (debugging)")

    # ---- admission --------------------------------------------------------------------------------
    max_concurrent: int = Field(4, ge=1, description="generations running at once (engine pairs)")
    max_queue: int = Field(16, ge=0, description="further requests that may wait for a slot; then 429")
    image_area: int | None = Field(
        None, ge=MIN_IMAGE_AREA, le=MAX_IMAGE_AREA,
        description="image area in px for every task (default: the task's, design.md §4)")
    max_image_bytes: int = Field(20 * 2**20, ge=1024, description="largest accepted upload per image")
    max_image_pixels: int = Field(40_000_000, ge=64, description="largest accepted image (width × height)")

    # ---- HTTP -------------------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    api_key: SecretStr | None = Field(None, description="bearer token required on every route but /health, /ready "
                                                        "(named 'default'; it sees every job)")
    api_keys_file: Path | None = Field(
        None, description="TOML file of named API keys ([[keys]] name, key, admin): each job belongs to the key "
                          "that submitted it, other keys get 404 for it, admin keys see all (docs/security.md)")
    output_dir: Path | None = Field(None, description="write each record as <id>.pb here; serve at /v1/records/{id}")
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="time in-flight work gets to finish on SIGTERM")
    max_connections: int = Field(
        512, ge=1,
        description="open HTTP connections at most; one more is answered 503 too_many_connections and closed")
    keep_alive_timeout: float = Field(5.0, gt=0, description="seconds an idle keep-alive connection is kept open")
    header_timeout: float = Field(
        10.0, gt=0, description="seconds a client has to send a request's headers (from connecting, or from the "
                                "first byte of the next request on a kept-alive connection); then 408 and closed")
    body_timeout: float = Field(
        60.0, gt=0, description="seconds a client has to send a request's body once its headers are in, plus one "
                                "per 64 KiB received (a slow but steady upload gets through, a trickle does not); "
                                "then 408")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    # ---- durable jobs (`Prefer: respond-async`, /v1/jobs) -------------------------------------------
    job_store: str | None = Field(
        None, description="where jobs are kept: unset is a SQLite file under --state-dir (one replica); "
                          "postgresql://user:pass@host/db lets several replicas share one queue")
    state_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_STATE_HOME", os.path.expanduser("~/.local/state")))
        / "emu35-serve",
        description="the SQLite job store and job results (results go under --output-dir when that is set)")
    job_ttl: float = Field(86400.0, gt=0, description="seconds a finished job, its events and result are kept")
    job_lease: float = Field(30.0, ge=1, description="seconds a replica's claim on a running job lasts unrenewed")
    job_max_attempts: int = Field(3, ge=1, description="claims of a job whose replica keeps dying before it fails")
    job_store_wait: float = Field(
        60.0, ge=0, description="seconds to wait for an unreachable job store at start (retried with backoff while "
                                "/ready answers 503) before exiting with one line that says so")
    job_reserve_after: float = Field(
        60.0, ge=0, description="seconds the oldest queued job may wait for more free slots than a replica has "
                                "before that replica holds its free slots for it (smaller jobs pass it until then)")
    replica_id: str | None = Field(
        None, min_length=1, max_length=128,
        description="this replica's name in the job store, 128 characters at most (default: the host name; keep it "
                    "stable across restarts so a restart queues its own jobs again at once)")
    webhook_secret: SecretStr | None = Field(
        None, description="Standard Webhooks signing secret (whsec_… base64); unset: webhooks are sent unsigned")
    webhook_allow_hosts: list[str] = Field(
        default_factory=list, description="hosts webhooks may be sent to: patterns such as *.example.com (ports "
                                          "80 and 443) or hooks.example.com:8443; empty: webhooks are refused")
    webhook_allow_private: bool = Field(
        False, description="let webhooks reach loopback, private, link-local and other non-public addresses "
                           "(off: such an address is refused at submit and at delivery)")

    demo: bool = Field(False, description="serve the built-in tiny model on CPU (built once, cached)")
    flashar: bool = Field(False, description="with --demo: serve the tiny FlashAR checkpoint (text-to-image only)")

    @model_validator(mode="after")
    def _need_a_model(self) -> "Settings":
        if not self.demo and self.model is None:
            raise ValueError("set --model (EMU35_MODEL) and --vq-model, or run with --demo")
        if not self.demo and self.vq_model is None:
            raise ValueError("set --vq-model (EMU35_VQ_MODEL) to the IBQ vision tokenizer folder")
        if self.decoding is None and (self.draft_len is not None or self.window is not None):
            raise ValueError("--draft-len and --window refine --decoding: set --decoding jacobi or zipar too")
        self.default_decoding  # noqa: B018 - raises, naming the flag, for a combination the mode does not take
        return self

    # ---- derived ----------------------------------------------------------------------------------
    def with_demo_defaults(self, tiny_dir: Path) -> "Settings":
        """The demo: tiny checkpoints, CPU, small images and context, unless set explicitly."""
        from service.task import cpu_default_dtype  # the task layer knows what a W8A8 export needs

        given = self.model_fields_set
        update: dict = {}
        if "model" not in given:
            update["model"] = tiny_dir / ("flashar" if self.flashar else "model")
        if "vq_model" not in given:
            update["vq_model"] = tiny_dir / "vq"
        if "tokenizer" not in given:
            update["tokenizer"] = tiny_dir / "tokenizer"
        dtype = cpu_default_dtype(update.get("model", self.model))
        for key, value in (("device", "cpu"), ("vq_device", "cpu"), ("dtype", dtype),
                           ("image_area", DEMO_IMAGE_AREA), ("max_model_len", DEMO_MAX_MODEL_LEN)):
            if key not in given:
                update[key] = value
        return self.model_copy(update=update)

    @property
    def variant(self) -> ModelVariant:
        """``model_variant`` as the task layer's enum."""
        return ModelVariant(self.model_variant)

    @property
    def default_decoding(self) -> Decoding | None:
        """``--decoding`` with ``--draft-len`` / ``--window`` (None: the engine's first schedule, ``ar``)."""
        if self.decoding is None:
            return None
        try:
            return Decoding(self.decoding, self.draft_len, self.window)
        except ValueError as exc:  # e.g. --window with --decoding jacobi
            raise ValueError(str(exc).replace("decoding.draft_len", "--draft-len").replace("decoding.window",
                                                                                       "--window")) from None

    @property
    def engine_kind(self) -> Literal["vllm", "reference", "native"]:
        if self.engine == "auto":
            return "vllm" if vllm_available() else "reference"
        return self.engine

    @property
    def tokenizer_dir(self) -> Path:
        return self.tokenizer or self.model  # type: ignore[return-value]

    @property
    def resolved_w8a8_cache_dir(self) -> Path:
        if self.w8a8_cache_dir is not None:
            return self.w8a8_cache_dir
        root = os.environ.get("EMU35_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "emu35-serve")
        return Path(root) / "w8a8"

    @property
    def resolved_device(self) -> str:
        return default_accelerator() if self.device == "auto" else self.device

    @property
    def resolved_vq_device(self) -> str:
        return default_accelerator() if self.vq_device == "auto" else self.vq_device


def load_settings(argv: list[str] | None = None) -> Settings:
    """Settings from flags (``argv``; None: none), then ``EMU35_*`` variables, then defaults."""
    return Settings(_cli_parse_args=list(argv or []))
