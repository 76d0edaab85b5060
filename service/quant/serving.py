"""What ``--model`` becomes for the vLLM engine when it is an msModelSlim W8A8 checkpoint.

* Ascend (vllm-ascend importable): the folder as it is, with ``quantization="ascend"`` — vllm-ascend
  reads ``quant_model_description.json`` itself. No hand edit of any inference code.
* Elsewhere (CPU, CUDA): the same checkpoint rewritten once as compressed-tensors int8
  (:mod:`service.quant.compressed_tensors`, cached), which stock vLLM loads with its int8 W8A8 kernels.

Either way the checkpoint is checked first (:func:`service.quant.description.load_checkpoint`), so an
inconsistent one is refused at start with the tensor named. A folder without a description passes
through unchanged.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from service.lm_checkpoint import CheckpointError
from service.quant.description import W8A8Checkpoint, is_msmodelslim_checkpoint, load_checkpoint

logger = logging.getLogger(__name__)

ASCEND = "ascend"


@dataclass(frozen=True)
class EngineModel:
    """The folder vLLM loads and the ``quantization`` argument it gets."""

    path: Path
    quantization: str | None


def vllm_ascend_available() -> bool:
    return importlib.util.find_spec("vllm_ascend") is not None


def check_w8a8(model: Path, quantization: str | None) -> W8A8Checkpoint | None:
    """The checked checkpoint when ``model`` is an msModelSlim export (else None); raises naming the
    tensor when it is inconsistent, and refuses a ``quantization`` setting that cannot serve it."""
    if not is_msmodelslim_checkpoint(model):
        return None
    checkpoint = load_checkpoint(model)
    if quantization not in (None, ASCEND):
        raise CheckpointError(f"{model} is an msModelSlim W8A8 checkpoint; leave --quantization unset "
                              f"(it is detected) instead of {quantization!r}")
    if quantization == ASCEND and not vllm_ascend_available():
        raise CheckpointError("--quantization ascend needs vllm-ascend, which is not installed here; "
                              "leave it unset to serve the checkpoint through vLLM's int8 path")
    return checkpoint


#: vLLM's CPU int8 W8A8 kernel (``int8_scaled_mm_with_quant``) takes only bfloat16 or half activations.
CPU_INT8_DTYPES = ("bfloat16", "float16", "half")


def cpu_int8_dtype(model: Path, dtype: str) -> str:
    """The dtype vLLM gets for a W8A8 export served through the int8 kernel on CPU: ``auto`` becomes
    bfloat16, bfloat16/float16 stay; anything else would die inside vLLM's start-up probe, so it is
    refused here with one line (``CheckpointError``)."""
    if dtype == "auto":
        return "bfloat16"
    if dtype not in CPU_INT8_DTYPES:
        raise CheckpointError(f"{model} is an msModelSlim W8A8 checkpoint: on CPU vLLM's int8 kernel takes "
                              f"bfloat16 or float16 activations, not --dtype {dtype}; set --dtype bfloat16 "
                              f"or leave it unset")
    return dtype


def engine_model(model: Path, quantization: str | None, cache_root: Path) -> EngineModel:
    """The model folder and quantisation the engine is given (module docstring)."""
    checkpoint = check_w8a8(model, quantization)
    if checkpoint is None:
        return EngineModel(model, quantization)
    if vllm_ascend_available():
        logger.info("%s: msModelSlim W8A8 checkpoint, served with quantization=%r (vllm-ascend)", model, ASCEND)
        return EngineModel(model, ASCEND)
    from service.quant.compressed_tensors import converted

    path = converted(checkpoint, cache_root)
    logger.info("%s: msModelSlim W8A8 checkpoint, served as compressed-tensors int8 from %s", model, path)
    return EngineModel(path, None)
