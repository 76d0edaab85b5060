"""Rewrite an msModelSlim W8A8 checkpoint as a compressed-tensors int8 checkpoint for stock vLLM.

Why a converter (and not a quantisation method registered with ``register_quantization_config``):
msModelSlim's W8A8_DYNAMIC is exactly compressed-tensors' int8 "W8A8" scheme — int8 weights with one
symmetric scale per output channel (``weight_scale`` ``[out, 1]``; msModelSlim's ``weight_offset`` is
all zeros) and int8 activations quantised per token at run time. compressed-tensors is a published
checkpoint format that vLLM loads through its own, tested kernels on CPU (oneDNN int8) and CUDA
(CUTLASS) in both 0.11 and 0.32; a registered method would have to build on vLLM's internal linear
and kernel-selection classes, which change between those releases. The cost is disk: the int8
weights are rewritten once (about the size of the W8A8 checkpoint), cached and reused.

The conversion: each tensor is copied unchanged except ``weight_offset`` (dropped after checking it is
zero: an asymmetric checkpoint is refused) and ``weight_scale`` (float32). ``config.json`` gains a
``quantization_config`` naming the FLOAT linear layers (``lm_head``, every ``down_proj``) as ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from service.quant.description import DESCRIPTION_FILE, DescriptionError, W8A8Checkpoint
from service.tokenizer import TIKTOKEN_FILE, VISION_FILE

#: Bump when the converted layout changes, so cached conversions are redone.
CONVERTER_VERSION = 1
MARKER = "emu35_converted_from.json"
INDEX_FILE = "model.safetensors.index.json"
_COPIED = (TIKTOKEN_FILE, VISION_FILE, "generation_config.json")


def quantization_config(checkpoint: W8A8Checkpoint) -> dict[str, Any]:
    """compressed-tensors' description of W8A8_DYNAMIC: int8 channel-wise weights, int8 token-wise
    dynamic activations, every FLOAT linear layer ignored."""
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                            "dynamic": False, "group_size": None, "observer": "minmax"},
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                      "dynamic": True, "group_size": None, "observer": None},
                "output_activations": None,
            }
        },
        "ignore": checkpoint.float_linears,
        "kv_cache_scheme": None,
    }


def fingerprint(checkpoint: W8A8Checkpoint) -> str:
    """Identifies the source (description, config, shard sizes and times) and this converter."""
    h = hashlib.sha256(f"v{CONVERTER_VERSION}".encode())
    for name in (DESCRIPTION_FILE, "config.json"):
        h.update((checkpoint.path / name).read_bytes())
    for file in sorted({t.file for t in checkpoint.tensors.values()}):
        st = (checkpoint.path / file).stat()
        h.update(f"{file}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _converted_shard(checkpoint: W8A8Checkpoint, file: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(checkpoint.path / file), framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            if name.endswith(".weight_offset"):
                if torch.count_nonzero(tensor):
                    raise DescriptionError(f"{name} is not zero: asymmetric int8 weights cannot be served "
                                           "as compressed-tensors here (quantise with symmetric: True)")
                continue
            out[name] = tensor.to(torch.float32) if name.endswith(".weight_scale") else tensor.contiguous()
    return out


def convert(checkpoint: W8A8Checkpoint, out: Path) -> Path:
    """Write the compressed-tensors checkpoint into ``out`` (atomically: a sibling temp dir, renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        files = sorted({t.file for t in checkpoint.tensors.values()})
        weight_map: dict[str, str] = {}
        for k, file in enumerate(files, 1):
            name = f"model-{k:05d}-of-{len(files):05d}.safetensors"
            tensors = _converted_shard(checkpoint, file)
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({t: name for t in tensors})
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        config = dict(checkpoint.config.raw)
        config["quantization_config"] = quantization_config(checkpoint)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in _COPIED:
            if (checkpoint.path / name).is_file():
                shutil.copyfile(checkpoint.path / name, tmp / name)
        (tmp / MARKER).write_text(json.dumps({"source": str(checkpoint.path), "fingerprint": fingerprint(checkpoint)}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def converted(checkpoint: W8A8Checkpoint, cache_root: Path) -> Path:
    """The compressed-tensors form of ``checkpoint`` under ``cache_root``, converted on first use."""
    key = fingerprint(checkpoint)
    out = cache_root / f"{checkpoint.path.name}-ct-{key}"
    try:
        if json.loads((out / MARKER).read_text()).get("fingerprint") == key:
            return out
    except (OSError, ValueError):
        pass
    return convert(checkpoint, out)
