"""An msModelSlim W8A8 checkpoint: ``quant_model_description.json`` + safetensors, checked at start.

The description maps every tensor name to its quantisation type (``"W8A8_DYNAMIC"`` or ``"FLOAT"``).
vllm-ascend 0.11 (``--quantization ascend``) reads it layer by layer: for each linear layer it looks
up ``prefix + ".weight"``; the parts of a fused layer (q/k/v → ``qkv_proj``, gate/up →
``gate_up_proj``) must share one type; a W8A8_DYNAMIC layer needs ``weight`` int8 ``[out, in]``,
``weight_scale`` ``[out, 1]`` and ``weight_offset`` ``[out, 1]``; embeddings and ``lm_head`` must be
FLOAT. A checkpoint that breaks one of these fails deep inside the engine, or worse, loads wrongly;
:func:`check_checkpoint` refuses it before the engine starts, naming the tensor.

Only safetensors headers are read (shapes and dtypes), never the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from service.lm_checkpoint import CheckpointError, Emu3Config

DESCRIPTION_FILE = "quant_model_description.json"
W8A8_DYNAMIC = "W8A8_DYNAMIC"
FLOAT = "FLOAT"
#: Keys of the description that describe the file, not a tensor.
META_KEYS = frozenset({"version", "model_quant_type", "metadata", "group_size", "optional"})
#: The fused groups of vLLM's Qwen3 (and so of Emu3.5): their parts must share one type.
FUSED_GROUPS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ALWAYS_FLOAT = ("model.embed_tokens.weight", "lm_head.weight")
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})


class DescriptionError(CheckpointError):
    """The W8A8 checkpoint is inconsistent; the message names the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str  # safetensors' names: I8, F32, BF16, …
    shape: tuple[int, ...]


@dataclass(frozen=True)
class W8A8Checkpoint:
    """A checked msModelSlim W8A8 checkpoint."""

    path: Path
    config: Emu3Config
    types: dict[str, str]  # tensor name → W8A8_DYNAMIC | FLOAT
    tensors: dict[str, TensorInfo]

    @property
    def quantised_linears(self) -> list[str]:
        """Prefixes of the W8A8_DYNAMIC linear layers (e.g. ``model.layers.0.self_attn.q_proj``)."""
        return sorted(n[: -len(".weight")] for n, t in self.types.items()
                      if t == W8A8_DYNAMIC and n.endswith(".weight"))

    @property
    def float_linears(self) -> list[str]:
        """Prefixes of the linear layers left in floating point (``lm_head``, ``down_proj``, …)."""
        layers = [f"model.layers.{i}.{name}" for i in range(self.config.raw["num_hidden_layers"]) for name in LINEARS]
        return sorted(p for p in [*layers, "lm_head"] if self.types.get(p + ".weight") == FLOAT)


def is_msmodelslim_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DESCRIPTION_FILE).is_file()


def read_tensor_infos(path: Path) -> dict[str, TensorInfo]:
    """Name → file, dtype and shape of every tensor in the folder's top-level ``*.safetensors``."""
    infos: dict[str, TensorInfo] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                infos[name] = TensorInfo(file.name, part.get_dtype(), tuple(part.get_shape()))
    return infos


def expected_linear_shapes(config: Emu3Config) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of each linear layer of one decoder layer (design.md §1: Qwen3's shapes)."""
    raw = config.raw
    hidden, inter, d = raw["hidden_size"], raw["intermediate_size"], config.head_dim
    q, kv = raw["num_attention_heads"] * d, raw["num_key_value_heads"] * d
    return {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter)}


def _check_linear(prefix: str, kind: str, shape: tuple[int, int], tensors: dict[str, TensorInfo]) -> None:
    weight = tensors[prefix + ".weight"]
    if weight.shape != shape:
        raise DescriptionError(f"{prefix}.weight has shape {list(weight.shape)}, expected {list(shape)}")
    if kind == FLOAT:
        if weight.dtype not in FLOAT_DTYPES:
            raise DescriptionError(f"{prefix}.weight is described FLOAT but stored as {weight.dtype}")
        return
    if weight.dtype != "I8":
        raise DescriptionError(f"{prefix}.weight is described {W8A8_DYNAMIC} but stored as {weight.dtype}, not int8")
    for part in ("weight_scale", "weight_offset"):
        name = f"{prefix}.{part}"
        info = tensors.get(name)
        if info is None:
            raise DescriptionError(f"{name} is missing ({W8A8_DYNAMIC} needs weight, weight_scale, weight_offset)")
        if info.shape != (shape[0], 1):
            raise DescriptionError(f"{name} has shape {list(info.shape)}, expected {[shape[0], 1]}")
        if info.dtype not in FLOAT_DTYPES:
            raise DescriptionError(f"{name} is stored as {info.dtype}, expected a float type")


def check_description(config: Emu3Config, types: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    """Apply vllm-ascend 0.11's loading rules (module docstring); raise :class:`DescriptionError`."""
    for name, kind in types.items():
        if kind not in (W8A8_DYNAMIC, FLOAT):
            raise DescriptionError(f"{name} has type {kind!r}; this service serves {W8A8_DYNAMIC} and {FLOAT} only")
        if name not in tensors:
            raise DescriptionError(f"{name} is in {DESCRIPTION_FILE} but in no safetensors file")
    for name in tensors:
        if name not in types:
            raise DescriptionError(f"{name} is stored but not in {DESCRIPTION_FILE}")
    for name in ALWAYS_FLOAT:
        if name not in types:
            raise DescriptionError(f"{name} is missing")
        if types[name] != FLOAT:
            raise DescriptionError(f"{name} must be {FLOAT} (embeddings and lm_head are never quantised), "
                                   f"is {types[name]}")
    shapes = expected_linear_shapes(config)
    for layer in range(config.raw["num_hidden_layers"]):
        base = f"model.layers.{layer}"
        for linear in shapes:
            if f"{base}.{linear}.weight" not in types:
                raise DescriptionError(f"{base}.{linear}.weight is missing")
        for fused, parts in FUSED_GROUPS.items():
            kinds = {p: types[f"{base}.{p}.weight"] for p in parts}
            if len(set(kinds.values())) > 1:
                listed = ", ".join(f"{base}.{p}.weight={k}" for p, k in kinds.items())
                raise DescriptionError(f"{base}.{fused} fuses parts of different types ({listed}); "
                                       "they must share one type")
        for linear, shape in shapes.items():
            _check_linear(f"{base}.{linear}", types[f"{base}.{linear}.weight"], shape, tensors)


def load_checkpoint(path: str | Path) -> W8A8Checkpoint:
    """Read and check an msModelSlim W8A8 checkpoint; raises :class:`DescriptionError` /
    :class:`~service.lm_checkpoint.CheckpointError` naming what is wrong."""
    path = Path(path)
    config = Emu3Config.from_dir(path)
    try:
        described = json.loads((path / DESCRIPTION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DescriptionError(f"{path / DESCRIPTION_FILE}: {e}") from None
    if not isinstance(described, dict):
        raise DescriptionError(f"{path / DESCRIPTION_FILE} is not a JSON object")
    quant_type = described.get("model_quant_type")
    if quant_type != W8A8_DYNAMIC:
        raise DescriptionError(f"{DESCRIPTION_FILE}: model_quant_type is {quant_type!r}, expected {W8A8_DYNAMIC!r}")
    types = {k: v for k, v in described.items() if k not in META_KEYS}
    tensors = read_tensor_infos(path)
    check_description(config, types, tensors)
    return W8A8Checkpoint(path, config, types, tensors)
