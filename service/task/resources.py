"""The engine and the VQ codec a service process holds, built from its settings.

The HTTP layer's runtime calls these, so it never imports an engine implementation or the VQ network
itself. :class:`ResourceSettings` names the settings read here; the server's settings object has them.

Which engine serves ``--model`` is decided by two tables, read in one place (:func:`serving_engine`):
:data:`CHECKPOINT_KINDS`, each kind of checkpoint with how it is recognised, which engines can serve it
and how it is checked before anything loads; and :data:`ENGINES`, each engine with the decoding schedules
it offers and how it is built. A new engine or checkpoint format is one entry, not a branch in several
functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

from service.engine.protocol import AsyncEngine
from service.engine.vllm_logs import loading_bars
from service.lm_checkpoint import CheckpointError
from service.tokenizer import Emu35Tokenizer
from service.types import DECODING_MODES, Decoding, ModelKind

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
    def engine_kind(self) -> Literal["vllm", "reference", "native"]: ...

    @property
    def default_decoding(self) -> Decoding | None: ...

    @property
    def tokenizer_dir(self) -> Path: ...

    @property
    def resolved_device(self) -> str: ...

    @property
    def resolved_vq_device(self) -> str: ...

    @property
    def resolved_w8a8_cache_dir(self) -> Path: ...



#: The engines a service can hold (``--engine`` names the first three; ``flashar`` comes with its checkpoint).
EngineName = Literal["vllm", "reference", "native", "flashar"]


class SettingError(CheckpointError):
    """A setting other than ``--model`` that the serving engine cannot honour (``flag`` names it)."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag


@dataclass(frozen=True)
class EngineKind:
    """One engine: the decoding schedules it offers (known before it loads, so settings and requests
    are checked before any work) and how it is built from the settings (not started)."""

    name: EngineName
    engine_class: Callable[[], Any]  # a class; imported only when asked: no engine's dependencies load for another's
    build: Callable[[ResourceSettings, Emu35Tokenizer], AsyncEngine]

    def schedules(self) -> tuple[str, ...]:
        """The decoding modes the engine offers (its class's ``schedules``), without building it."""
        return tuple(self.engine_class().schedules)


@dataclass(frozen=True)
class CheckpointKind:
    """One kind of checkpoint ``--model`` can be: how it is recognised (cheaply, from its files), which
    engines can serve it (``own_engine``: only that one, whatever ``--engine`` says when left at auto),
    how it is checked strictly before anything loads, and what a refused engine is told."""

    name: str
    model_kind: ModelKind
    recognise: Callable[[Path], bool]
    engines: tuple[EngineName, ...]
    check: Callable[[ResourceSettings], None]
    refusal: str  # formatted with {model} and {engine}
    own_engine: bool = False


def _is_flashar(model: Path) -> bool:
    from service.engine.flashar.checkpoint import is_flashar_checkpoint

    return is_flashar_checkpoint(model)


def _is_w8a8(model: Path) -> bool:
    from service.quant.description import is_msmodelslim_checkpoint

    return is_msmodelslim_checkpoint(model)


def _check_flashar(s: ResourceSettings) -> None:
    from service.engine.flashar.checkpoint import check_flashar_checkpoint

    check_flashar_checkpoint(s.model)


def _check_w8a8(s: ResourceSettings) -> None:
    from service.quant.serving import check_w8a8

    check_w8a8(s.model, s.quantization)


def _check_plain(s: ResourceSettings) -> None:
    """A plain Emu3 checkpoint is checked by the engine that loads it."""


#: Every kind of checkpoint, most specific first: the first whose ``recognise`` says yes is the one.
CHECKPOINT_KINDS: tuple[CheckpointKind, ...] = (
    CheckpointKind("flashar", "flashar", _is_flashar, ("flashar",), _check_flashar,
                   "{model} is a FlashAR checkpoint: it runs on its own engine, not {engine} (leave --engine at auto)",
                   own_engine=True),
    CheckpointKind("w8a8", "emu3.5", _is_w8a8, ("vllm",), _check_w8a8,
                   "{model} is an msModelSlim W8A8 checkpoint: it needs the vllm engine (the {engine} engine "
                   "cannot serve it)"),
    CheckpointKind("emu3", "emu3.5", lambda model: True, ("vllm", "reference", "native"), _check_plain,
                   "{model}: the {engine} engine cannot serve it"),
)


def _build_vllm(s: ResourceSettings, tokenizer: Emu35Tokenizer) -> AsyncEngine:
    """vLLM; an msModelSlim W8A8 checkpoint is served with ``quantization="ascend"`` where vllm-ascend is
    installed, else in its compressed-tensors form."""
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


def _build_reference(s: ResourceSettings, tokenizer: Emu35Tokenizer) -> AsyncEngine:
    from service.engine.reference import AsyncReferenceEngine

    return AsyncReferenceEngine(s.model, tokenizer, s.resolved_device, s.dtype, s.max_model_len)


def _build_flashar(s: ResourceSettings, tokenizer: Emu35Tokenizer) -> AsyncEngine:
    from service.engine.flashar.async_engine import AsyncFlashAREngine

    return AsyncFlashAREngine(s.model, tokenizer, s.resolved_device, s.dtype, s.max_model_len, s.max_concurrent)


def _build_native(s: ResourceSettings, tokenizer: Emu35Tokenizer) -> AsyncEngine:
    from service.engine.native import AsyncNativeEngine

    return AsyncNativeEngine(s.model, tokenizer, s.resolved_device, s.dtype, s.max_model_len,
                             max_slots=2 * s.max_concurrent)  # a guided request holds two rows (cond, uncond)


def _vllm_class() -> type:
    from service.engine.vllm_engine import VllmEngine  # imports no vllm until the engine starts

    return VllmEngine


def _reference_class() -> type:
    from service.engine.reference.async_engine import AsyncReferenceEngine

    return AsyncReferenceEngine


def _native_class() -> type:
    from service.engine.native import AsyncNativeEngine

    return AsyncNativeEngine


def _flashar_class() -> type:
    from service.engine.flashar.async_engine import AsyncFlashAREngine

    return AsyncFlashAREngine


#: Every engine by name. What each offers is its class's ``schedules`` (the engine says it, once): vLLM
#: and the reference engine draw one token per pass (``ar``), FlashAR by anti-diagonals, an order of its
#: own that a request cannot choose.
ENGINES: dict[EngineName, EngineKind] = {
    "vllm": EngineKind("vllm", _vllm_class, _build_vllm),
    "reference": EngineKind("reference", _reference_class, _build_reference),
    "native": EngineKind("native", _native_class, _build_native),
    "flashar": EngineKind("flashar", _flashar_class, _build_flashar),
}


def load_tokenizer(s: ResourceSettings) -> Emu35Tokenizer:
    """The Emu3.5 tokenizer the engine, the planner and the parser share."""
    return Emu35Tokenizer.from_dir(s.tokenizer_dir)


def checkpoint_kind(s: ResourceSettings) -> CheckpointKind:
    """The first entry of :data:`CHECKPOINT_KINDS` that recognises ``--model``."""
    model = s.model
    return next(k for k in CHECKPOINT_KINDS if model is not None and k.recognise(model)) \
        if model is not None else CHECKPOINT_KINDS[-1]


def model_kind(s: ResourceSettings) -> ModelKind:
    """``flashar`` when ``--model`` is a FlashAR checkpoint (its config says so), else ``emu3.5``."""
    return checkpoint_kind(s).model_kind


def engine_name(s: ResourceSettings) -> EngineName:
    """The engine that serves ``--model``: the checkpoint's own when it has one and ``--engine`` is auto,
    else the one ``--engine`` names (auto: vllm when installed, else reference)."""
    kind = checkpoint_kind(s)
    if kind.own_engine and s.engine == "auto":
        return kind.engines[0]
    return s.engine_kind


def serving_engine(s: ResourceSettings) -> EngineKind:
    """The :data:`ENGINES` entry that serves ``--model`` (see :func:`engine_name`)."""
    return ENGINES[engine_name(s)]


def cpu_default_dtype(model: Path | None) -> str:
    """The dtype a CPU run (the demo) defaults to: float32, except bfloat16 for an msModelSlim W8A8
    export, whose int8 kernel on CPU takes only bf16/half activations (``serving.cpu_int8_dtype``)."""
    return "bfloat16" if model is not None and _is_w8a8(model) else "float32"


def serves_int8_on_cpu(s: ResourceSettings) -> bool:
    """Whether vLLM will run a W8A8 export through its CPU int8 kernel (not vllm-ascend, not a GPU)."""
    from service.quant.serving import vllm_ascend_available

    return (s.engine_kind == "vllm" and _is_w8a8(s.model) and not vllm_ascend_available()
            and s.resolved_device == "cpu")


def check_decoding(default: Decoding | None, engine: EngineKind) -> None:
    """Refuse a server-wide ``--decoding`` the serving engine does not offer (``SettingError``)."""
    if default is None:
        return
    offered = engine.schedules()
    if default.mode not in offered:
        what = f"offers {', '.join(offered)}" if offered else "draws with its own schedule and offers none to choose"
        raise SettingError("--decoding", f"{default.mode!r} is not a schedule of the {engine.name} engine, which "
                                         f"{what} (of {', '.join(DECODING_MODES)})")


def check_model(s: ResourceSettings) -> None:
    """Refuse, before anything starts, a checkpoint that is inconsistent (a W8A8 or FlashAR one: the
    message names the tensor) or that the chosen engine cannot serve, and a ``--decoding`` that engine
    does not offer. Raises ``CheckpointError`` (``SettingError`` for a flag other than --model)."""
    if s.model is None:  # the settings refuse this; nothing to check
        return
    kind = checkpoint_kind(s)
    engine = engine_name(s)
    if engine not in kind.engines:
        raise CheckpointError(kind.refusal.format(model=s.model, engine=engine))
    kind.check(s)
    if serves_int8_on_cpu(s):
        from service.quant.serving import cpu_int8_dtype

        cpu_int8_dtype(s.model, s.dtype)
    check_decoding(s.default_decoding, ENGINES[engine])


def build_engine(s: ResourceSettings, tokenizer: Emu35Tokenizer) -> AsyncEngine:
    """The engine that serves ``--model`` (not started; :func:`check_model` refused what it cannot serve)."""
    return serving_engine(s).build(s, tokenizer)


def load_vq(s: ResourceSettings):
    """The VQ codec (IBQ) on its device; float32 on the CPU."""
    from service.vq import VisionTokenizer

    dtype = "float32" if s.resolved_vq_device == "cpu" or s.dtype == "auto" else s.dtype
    return VisionTokenizer.from_pretrained(s.vq_model, device=s.resolved_vq_device, dtype=dtype)


def start_vq_worker(s: ResourceSettings, observer=None) -> "VqWorker":
    """The VQ worker thread around :func:`load_vq` (not started)."""
    from service.vq.worker import VqWorker

    return VqWorker(lambda: load_vq(s), observer=observer)
