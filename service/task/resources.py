"""The engine and the VQ codec a service process holds, built from its settings.

The HTTP layer's runtime calls these, so it never imports an engine implementation or the VQ network
itself. :class:`ResourceSettings` names the settings read here; the server's settings object has them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from service.engine.protocol import AsyncEngine
from service.engine.vllm_logs import loading_bars
from service.lm_checkpoint import CheckpointError
from service.tokenizer import Emu35Tokenizer
from service.types import ModelKind

if TYPE_CHECKING:
    from service.vq.worker import VqWorker


class ResourceSettings(Protocol):
    """The settings the engine and the VQ codec are built from."""

    model: Path
    vq_model: Path
    tensor_parallel_size: int
    dtype: str
    max_model_len: int | None
    gpu_memory_utilization: float
    max_concurrent: int
    engine: str
    quantization: str | None
    enforce_eager: bool

    @property
    def engine_kind(self) -> Literal["vllm", "reference"]: ...

    @property
    def tokenizer_dir(self) -> Path: ...

    @property
    def resolved_device(self) -> str: ...

    @property
    def resolved_vq_device(self) -> str: ...

    @property
    def resolved_w8a8_cache_dir(self) -> Path: ...


def load_tokenizer(s: ResourceSettings) -> Emu35Tokenizer:
    """The Emu3.5 tokenizer the engine, the planner and the parser share."""
    return Emu35Tokenizer.from_dir(s.tokenizer_dir)


def model_kind(s: ResourceSettings) -> ModelKind:
    """``flashar`` when ``--model`` is a FlashAR checkpoint (its config says so), else ``emu3.5``."""
    from service.engine.flashar.checkpoint import is_flashar_checkpoint

    return "flashar" if s.model is not None and is_flashar_checkpoint(s.model) else "emu3.5"


def cpu_default_dtype(model: Path | None) -> str:
    """The dtype a CPU run (the demo) defaults to: float32, except bfloat16 for an msModelSlim W8A8
    export, whose int8 kernel on CPU takes only bf16/half activations (``serving.cpu_int8_dtype``)."""
    from service.quant.description import is_msmodelslim_checkpoint

    return "bfloat16" if model is not None and is_msmodelslim_checkpoint(model) else "float32"


def serves_int8_on_cpu(s: ResourceSettings) -> bool:
    """Whether vLLM will run a W8A8 export through its CPU int8 kernel (not vllm-ascend, not a GPU)."""
    from service.quant.description import is_msmodelslim_checkpoint
    from service.quant.serving import vllm_ascend_available

    return (s.engine_kind == "vllm" and is_msmodelslim_checkpoint(s.model) and not vllm_ascend_available()
            and s.resolved_device == "cpu")


def check_model(s: ResourceSettings) -> None:
    """Refuse, before anything starts, a checkpoint that is inconsistent (a W8A8 or FlashAR one: the
    message names the tensor) or that the chosen engine cannot serve. Raises ``CheckpointError``."""
    from service.quant.serving import check_w8a8, cpu_int8_dtype

    if s.model is None:  # the settings refuse this; nothing to check
        return
    if model_kind(s) == "flashar":
        from service.engine.flashar.checkpoint import check_flashar_checkpoint

        if s.engine == "vllm":
            raise CheckpointError(f"{s.model} is a FlashAR checkpoint: it runs on its own engine, not vllm "
                                  f"(leave --engine at auto)")
        check_flashar_checkpoint(s.model)
        return
    if check_w8a8(s.model, s.quantization) is not None and s.engine_kind != "vllm":
        raise CheckpointError(f"{s.model} is an msModelSlim W8A8 checkpoint: it needs the vllm engine "
                              f"(the reference engine cannot serve it)")
    if serves_int8_on_cpu(s):
        cpu_int8_dtype(s.model, s.dtype)


def build_engine(s: ResourceSettings, tokenizer: Emu35Tokenizer) -> AsyncEngine:
    """The engine the settings ask for (not started). An msModelSlim W8A8 checkpoint is served with
    ``quantization="ascend"`` where vllm-ascend is installed, else in its compressed-tensors form. A
    FlashAR checkpoint gets the FlashAR engine whatever ``engine`` says (``check_model`` refused vllm)."""
    if model_kind(s) == "flashar":
        from service.engine.flashar.async_engine import AsyncFlashAREngine

        return AsyncFlashAREngine(s.model, tokenizer, s.resolved_device, s.dtype, s.max_model_len, s.max_concurrent)
    if s.engine_kind == "vllm":
        from service.engine.config import VllmEngineConfig
        from service.engine.vllm_engine import VllmEngine
        from service.quant.serving import cpu_int8_dtype, engine_model

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # only read by the CPU build (GiB)
        served = engine_model(s.model, s.quantization, s.resolved_w8a8_cache_dir)
        cfg = VllmEngineConfig(
            model=str(served.path), tokenizer=str(s.tokenizer_dir),
            tensor_parallel_size=s.tensor_parallel_size,
            dtype=cpu_int8_dtype(s.model, s.dtype) if serves_int8_on_cpu(s) else s.dtype,
            max_model_len=s.max_model_len, gpu_memory_utilization=s.gpu_memory_utilization,
            max_pairs=s.max_concurrent, quantization=served.quantization,
            graph_mode="eager" if s.enforce_eager else "auto", loading_bar=loading_bars())
        return VllmEngine(cfg, tokenizer)
    from service.engine.reference import AsyncReferenceEngine

    return AsyncReferenceEngine(s.model, tokenizer, s.resolved_device, s.dtype, s.max_model_len)


def load_vq(s: ResourceSettings):
    """The VQ codec (IBQ) on its device; float32 on the CPU."""
    from service.vq import VisionTokenizer

    dtype = "float32" if s.resolved_vq_device == "cpu" or s.dtype == "auto" else s.dtype
    return VisionTokenizer.from_pretrained(s.vq_model, device=s.resolved_vq_device, dtype=dtype)


def start_vq_worker(s: ResourceSettings, observer=None) -> "VqWorker":
    """The VQ worker thread around :func:`load_vq` (not started)."""
    from service.vq.worker import VqWorker

    return VqWorker(lambda: load_vq(s), observer=observer)
