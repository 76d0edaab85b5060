"""The FlashAR checkpoint format (docs/flashar.md §2), recognised and loaded strictly.

A FlashAR folder has ``config.json`` with ``model_type: "emu3_flashar"`` and safetensors whose names
start with ``backbone.`` plus the two heads, the vertical block and the gates. Loading checks every
tensor against the shapes the config implies and refuses a missing, extra or misshapen tensor with a
:class:`CheckpointError` that names it (the server turns it into exit code 2).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.lm_checkpoint import CheckpointError

MODEL_TYPE = "emu3_flashar"
ARCHITECTURE = "Emuflashar"
#: Keys older trainings wrote that the release's loaders ignore (§2); ignored here too.
LEGACY_KEYS = frozenset({"fuse_h_logit", "fuse_corner_h_logit", "horizontal_head.bias", "vertical_head.bias"})
_VERTICAL_RE = re.compile(r"^vertical_block\.(\d+)\.")


def is_flashar_checkpoint(path: str | Path) -> bool:
    """True when ``path/config.json`` declares a FlashAR model (cheap: reads no weights)."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == MODEL_TYPE


@dataclass(frozen=True)
class FlashARConfig:
    """The shapes and ids a FlashAR network needs, from its ``config.json`` (``backbone_config`` holds
    the Emu3 fields)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vertical_layers: int
    vertical_start: int
    visual_offset: int
    max_position_embeddings: int
    token_ids: dict[str, int]

    @property
    def gate_width(self) -> int:
        """``G = max(64, D // 8)``: the hidden width of the interior gate's MLP."""
        return max(64, self.hidden_size // 8)

    @classmethod
    def from_dir(cls, path: str | Path) -> "FlashARConfig":
        file = Path(path) / "config.json"
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: cannot read a FlashAR config ({exc})") from None
        return cls.from_raw(raw, str(file))

    @classmethod
    def from_raw(cls, raw: dict[str, Any], where: str = "config.json") -> "FlashARConfig":
        if raw.get("model_type") != MODEL_TYPE:
            raise CheckpointError(f"{where}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
        base = raw.get("backbone_config")
        if not isinstance(base, dict):
            raise CheckpointError(f"{where}: no backbone_config (the Emu3 config of the backbone)")
        need = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
        missing = [k for k in need if k not in base]
        if missing:
            raise CheckpointError(f"{where}: backbone_config lacks {missing}")
        hidden = int(raw.get("hidden_size") or base.get("hidden_size") or 0)
        heads = int(base["num_attention_heads"])
        layers = int(base["num_hidden_layers"])
        k = int(raw.get("vertical_layers", 0))
        start = int(raw.get("vertical_start_layer", layers))
        if not raw.get("use_vertical_block", True) or k < 1 or not 0 <= start <= layers - k:
            raise CheckpointError(f"{where}: vertical block K={k} from layer {start} does not fit {layers} layers "
                                  f"(need use_vertical_block, K >= 1 and S + K <= L)")
        ids = {name: int(base[name]) for name in ("bos_token_id", "eos_token_id", "pad_token_id", "img_token_id",
                                                  "boi_token_id", "eoi_token_id", "eol_token_id") if name in base}
        offset = int(raw.get("visual_token_offset", ids.get("eoi_token_id", -2) + 1))
        return cls(
            vocab_size=int(raw.get("vocab_size") or base.get("vocab_size") or 0), hidden_size=hidden,
            intermediate_size=int(base["intermediate_size"]), num_layers=layers, num_heads=heads,
            num_kv_heads=int(base["num_key_value_heads"]),
            head_dim=int(base.get("head_dim") or hidden // heads), rms_norm_eps=float(base.get("rms_norm_eps", 1e-6)),
            rope_theta=float(base.get("rope_theta", 1_000_000.0)), vertical_layers=k, vertical_start=start,
            visual_offset=offset, max_position_embeddings=int(base.get("max_position_embeddings", 32768)),
            token_ids=ids)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the checkpoint must hold, with its shape (§2's table)."""
        d, v, hd = self.hidden_size, self.vocab_size, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"backbone.embed_tokens.weight": (v, d), "backbone.norm.weight": (d,),
                                              "horizontal_head.weight": (v, d), "vertical_head.weight": (v, d),
                                              "vertical_norm.weight": (d,),
                                              "hv_gate_mlp.0.weight": (self.gate_width, 2 * d),
                                              "hv_gate_mlp.2.weight": (1, self.gate_width), "hv_gate_mlp.2.bias": (1,),
                                              "hv_gate_corner.weight": (1, d), "hv_gate_corner.bias": (1,)}
        layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                 "self_attn.q_proj.weight": (self.num_heads * hd, d),
                 "self_attn.k_proj.weight": (self.num_kv_heads * hd, d),
                 "self_attn.v_proj.weight": (self.num_kv_heads * hd, d),
                 "self_attn.o_proj.weight": (d, self.num_heads * hd),
                 "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
                 "mlp.gate_proj.weight": (self.intermediate_size, d), "mlp.up_proj.weight": (self.intermediate_size, d),
                 "mlp.down_proj.weight": (d, self.intermediate_size)}
        for prefix, count in (("backbone.layers", self.num_layers), ("vertical_block", self.vertical_layers)):
            for i in range(count):
                shapes.update({f"{prefix}.{i}.{key}": shape for key, shape in layer.items()})
        return shapes


def _checkpoint_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return files


def check_flashar_checkpoint(path: str | Path, config: FlashARConfig | None = None
                             ) -> tuple[FlashARConfig, dict[str, Path]]:
    """Check the checkpoint at ``path`` strictly without reading its weights (names and shapes come from
    the safetensors headers): the vertical block's depth from the tensor names equals
    ``vertical_layers``; no tensor is missing, extra (legacy fuse keys aside) or misshapen. Returns the
    config and the file of each tensor; raises :class:`CheckpointError` naming the first bad tensor."""
    from safetensors import safe_open

    path = Path(path)
    config = config or FlashARConfig.from_dir(path)
    expected = config.expected_shapes()
    where: dict[str, Path] = {}
    found_k = 0
    for file in _checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in LEGACY_KEYS:
                    continue
                if name not in expected:
                    raise CheckpointError(f"{file.name}: unexpected tensor {name!r} (not part of a FlashAR model "
                                          f"with {config.num_layers} layers and K={config.vertical_layers})")
                m = _VERTICAL_RE.match(name)
                if m:
                    found_k = max(found_k, int(m.group(1)) + 1)
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise CheckpointError(f"{file.name}: tensor {name!r} has shape {shape}, "
                                          f"the config implies {expected[name]}")
                where[name] = file
    if found_k != config.vertical_layers:
        raise CheckpointError(f"{path}: the tensors hold {found_k} vertical layers, config.json says "
                              f"vertical_layers={config.vertical_layers}")
    missing = sorted(set(expected) - set(where))
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more"
                                                                         if len(missing) > 1 else ""))
    return config, where


def load_flashar_weights(path: str | Path, config: FlashARConfig | None = None,
                         dtype: torch.dtype = torch.float32) -> tuple[FlashARConfig, dict[str, torch.Tensor]]:
    """Every tensor of the checkpoint (on the CPU, in ``dtype``) after :func:`check_flashar_checkpoint`."""
    from safetensors import safe_open

    config, where = check_flashar_checkpoint(path, config)
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(set(where.values())):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in where:
                    weights[name] = f.get_tensor(name).to(dtype)
    return config, weights
