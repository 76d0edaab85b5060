"""Resolve a device string (``cpu``, ``cuda:N``, ``npu:N``) to a ``torch.device``.

``torch_npu`` (Ascend) registers the ``npu`` device type with torch when it is imported, and importing
it has side effects (it patches torch and initialises the CANN runtime), so it is imported only when
an ``npu`` device is actually asked for — never for ``cpu`` or ``cuda``.
"""

from __future__ import annotations

import importlib
import re

import torch

__all__ = ["DeviceError", "resolve_device", "resolve_dtype"]

_DEVICE_RE = re.compile(r"^(cpu|cuda|npu)(?::(\d+))?$")


class DeviceError(ValueError):
    """A device string is malformed, names an unknown backend, or the device is not available."""


def _import_torch_npu() -> None:
    try:
        importlib.import_module("torch_npu")
    except ImportError as exc:
        raise DeviceError(
            "an 'npu' device was requested but the Ascend package torch_npu could not be imported "
            f"({exc}); install the torch_npu build that matches this torch ({torch.__version__}) "
            "and the CANN toolkit, or choose 'cpu' / 'cuda:N'"
        ) from exc


def resolve_device(spec: str | torch.device) -> torch.device:
    """Parse and check a device.

    Accepted forms: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"npu"``, ``"npu:N"`` (a bare accelerator
    name means index 0), or a ``torch.device`` of one of those types. Raises :class:`DeviceError`
    for anything else, and when the backend or the index is not available on this machine.
    """
    if isinstance(spec, torch.device):
        spec = str(spec) if spec.index is not None or spec.type == "cpu" else f"{spec.type}:0"
    if not isinstance(spec, str):
        raise DeviceError(f"device must be a string like 'cpu', 'cuda:0' or 'npu:0', got {spec!r}")
    m = _DEVICE_RE.match(spec.strip().lower())
    if m is None:
        raise DeviceError(
            f"invalid device {spec!r}: expected 'cpu', 'cuda', 'cuda:N', 'npu' or 'npu:N'"
        )
    kind, index_s = m.group(1), m.group(2)
    if kind == "cpu":
        if index_s is not None:
            raise DeviceError(f"invalid device {spec!r}: 'cpu' takes no index")
        return torch.device("cpu")
    index = int(index_s) if index_s is not None else 0
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} requested but CUDA is not available in this torch build/machine")
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"device {spec!r} requested but only {count} CUDA device(s) are visible")
        return torch.device("cuda", index)
    # npu
    _import_torch_npu()
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        raise DeviceError(f"device {spec!r} requested: torch_npu is installed but no NPU is available")
    count = npu.device_count()
    if index >= count:
        raise DeviceError(
            f"device {spec!r} requested but only {count} NPU(s) are visible (check ASCEND_RT_VISIBLE_DEVICES)"
        )
    return torch.device("npu", index)


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.float32`` / ``bfloat16`` / ``float16`` from a dtype or one of their usual names."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported VQ dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"unsupported VQ dtype {dtype!r}; use float32, bfloat16 or float16")
