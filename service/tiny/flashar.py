"""A tiny FlashAR checkpoint in the release's exact format, made from the tiny Emu3.5 model.

The backbone and the horizontal head are the tiny model's (as FlashAR initialises them), the vertical
block clones its last layers and the vertical head its ``lm_head``, each perturbed, and the gates are
random rather than zero, so the two branches and the fusion all matter in tests. No training: pixel
codes are noise either way (the tiny model never learnt pixels).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from service.engine.flashar.checkpoint import ARCHITECTURE, MODEL_TYPE
from service.lm_checkpoint import Emu3Config

#: Vertical layers of the tiny FlashAR model (the release: 4 of 64).
TINY_VERTICAL_LAYERS = 1
#: Scale of the perturbations that make the cloned parts differ from their sources.
NOISE = 0.05


def flashar_config(base: dict, vertical_layers: int) -> dict:
    """``config.json`` with the fields of the release's ``checkpoint_utils`` (docs/flashar.md §2)."""
    layers = int(base["num_hidden_layers"])
    return {
        "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "format": "hf_safetensors", "format_version": 1,
        "base_model_name_or_path": "tiny-emu3.5", "tokenizer_name_or_path": "../tokenizer",
        "vq_model_name_or_path": "../vq", "torch_dtype": "fp32", "vocab_size": base["vocab_size"],
        "hidden_size": base["hidden_size"], "visual_token_offset": int(base["eoi_token_id"]) + 1,
        "use_vertical_block": True, "vertical_layers": vertical_layers,
        "vertical_start_layer": layers - vertical_layers, "backbone_config": base,
    }


def flashar_weights(base_state: dict[str, torch.Tensor], config: dict, seed: int) -> dict[str, torch.Tensor]:
    """The FlashAR state dict built from an Emu3 one (``model.*`` + ``lm_head.weight``)."""
    gen = torch.Generator().manual_seed(seed)

    def noisy(t: torch.Tensor) -> torch.Tensor:
        return (t + NOISE * t.std() * torch.randn(t.shape, generator=gen)).contiguous()

    out = {"backbone." + k[len("model."):]: v.clone() for k, v in base_state.items() if k.startswith("model.")}
    out["horizontal_head.weight"] = base_state["lm_head.weight"].clone()
    out["vertical_head.weight"] = noisy(base_state["lm_head.weight"])
    start, d = config["vertical_start_layer"], config["hidden_size"]
    for k in range(config["vertical_layers"]):
        prefix = f"model.layers.{start + k}."
        for key, value in base_state.items():
            if key.startswith(prefix):
                out[f"vertical_block.{k}.{key[len(prefix):]}"] = noisy(value)
    out["vertical_norm.weight"] = noisy(base_state["model.norm.weight"])
    g = max(64, d // 8)
    out["hv_gate_mlp.0.weight"] = torch.randn(g, 2 * d, generator=gen) / (2 * d) ** 0.5
    out["hv_gate_mlp.2.weight"] = torch.randn(1, g, generator=gen)
    out["hv_gate_mlp.2.bias"] = torch.zeros(1)
    out["hv_gate_corner.weight"] = torch.randn(1, d, generator=gen) / d ** 0.5
    out["hv_gate_corner.bias"] = torch.zeros(1)
    return out


def write_tiny_flashar(model_dir: Path, out_dir: Path, seed: int = 0,
                       vertical_layers: int = TINY_VERTICAL_LAYERS) -> Path:
    """Write ``out_dir/config.json``, ``model.safetensors`` and ``checkpoint_meta.json`` from the Emu3
    checkpoint in ``model_dir``."""
    from safetensors.torch import load_file, save_file

    base = Emu3Config.from_dir(model_dir).raw
    state: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(file)))
    config = flashar_config(base, vertical_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(flashar_weights(state, config, seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    meta = {"format": "hf_safetensors", "global_step": 0, "epoch": 0, "save_reason": "tiny"}
    (out_dir / "checkpoint_meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out_dir
