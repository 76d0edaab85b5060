"""IBQ vision tokenizer (Emu3.5-VisionTokenizer): images ⇄ grids of visual codes (design.md §6).

Importing this package is light: the torch-free resize rule is imported eagerly, everything that
needs torch is imported on first attribute access (PEP 562), so ``from service.vq.resize import
reference_image_size`` or ``service.vq.reference_image_size`` never pulls in torch.
"""

from __future__ import annotations

import importlib

from service.vq.resize import DOWNSAMPLE, grid_size, reference_image_size

_LAZY = {
    "VisionTokenizer": "service.vq.codec",
    "nearest_codes": "service.vq.codec",
    "DEFAULT_CHUNK_PIXELS": "service.vq.codec",
    "DEFAULT_CHUNK_CODES": "service.vq.codec",
    "DEFAULT_MAX_BATCH": "service.vq.codec",
    "IBQ": "service.vq.network",
    "DDConfig": "service.vq.network",
    "VQConfig": "service.vq.checkpoint",
    "CheckpointError": "service.vq.checkpoint",
    "ConfigError": "service.vq.checkpoint",
    "StateDictMismatchError": "service.vq.checkpoint",
    "load_config": "service.vq.checkpoint",
    "load_model": "service.vq.checkpoint",
    "load_state_dict": "service.vq.checkpoint",
    "save_checkpoint": "service.vq.checkpoint",
    "DeviceError": "service.vq.device",
    "resolve_device": "service.vq.device",
    "resolve_dtype": "service.vq.device",
}

__all__ = ["DOWNSAMPLE", "grid_size", "reference_image_size", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
