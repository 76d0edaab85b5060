"""The quantised tiny model against vllm-ascend 0.11's loading rules (``quant_config.py``,
``w8a8_dynamic.py``), written from the rules themselves, not from vllm-ascend's code and not through
``service.quant.description``; then the service's own check refusing checkpoints that break them.

Rules: ``quant_model_description.json`` maps each tensor to ``W8A8_DYNAMIC`` or ``FLOAT``; each linear
layer is looked up as ``prefix + ".weight"``; the parts of a fused ``qkv_proj`` / ``gate_up_proj`` share
one type; W8A8_DYNAMIC needs ``weight`` int8 ``[out, in]``, ``weight_scale`` ``[out, 1]``, ``weight_offset``
``[out, 1]``; embeddings and ``lm_head`` are FLOAT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from service.quant.description import DescriptionError, load_checkpoint
from tests.quant_env import HAVE_MSMODELSLIM, NO_MSMODELSLIM

pytestmark = pytest.mark.skipif(not HAVE_MSMODELSLIM, reason=NO_MSMODELSLIM)

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def headers(folder: Path) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()})
    return out


def test_the_output_follows_vllm_ascend_011_rules(tiny_w8a8):
    out = tiny_w8a8 / "w8a8"
    desc = json.loads((out / "quant_model_description.json").read_text())
    stored = headers(out)
    config = json.loads((out / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"self_attn.q_proj": [q, hidden], "self_attn.k_proj": [kv, hidden], "self_attn.v_proj": [kv, hidden],
              "self_attn.o_proj": [hidden, q], "mlp.gate_proj": [inter, hidden], "mlp.up_proj": [inter, hidden],
              "mlp.down_proj": [hidden, inter]}
    assert desc["model_quant_type"] == "W8A8_DYNAMIC"
    described = {k for k in desc if k.startswith(("model.", "lm_head"))}
    assert described == set(stored)  # every tensor described, every described tensor stored
    assert desc["model.embed_tokens.weight"] == desc["lm_head.weight"] == "FLOAT"
    for layer in range(config["num_hidden_layers"]):
        base = f"model.layers.{layer}"
        for fused, parts in FUSED.items():
            group = "self_attn" if fused == "qkv_proj" else "mlp"
            assert len({desc[f"{base}.{group}.{p}.weight"] for p in parts}) == 1, f"{base}.{group}.{fused}"
        for linear, shape in shapes.items():
            p = f"{base}.{linear}"
            kind = desc[p + ".weight"]
            assert stored[p + ".weight"][1] == shape
            if kind == "W8A8_DYNAMIC":
                assert stored[p + ".weight"][0] == "I8"
                assert stored[p + ".weight_scale"][1] == [shape[0], 1]
                assert stored[p + ".weight_offset"][1] == [shape[0], 1]
            else:
                assert kind == "FLOAT" and stored[p + ".weight"][0] in ("BF16", "F16", "F32")


# ---- the service's check refuses what breaks the rules ------------------------------------------
@pytest.fixture
def editable(tiny_w8a8, tmp_path) -> Path:
    """The quantised folder with every file linked, except a private copy of the description."""
    src = tiny_w8a8 / "w8a8"
    for item in src.iterdir():
        if item.name != "quant_model_description.json":
            os.symlink(item, tmp_path / item.name)
    (tmp_path / "quant_model_description.json").write_text((src / "quant_model_description.json").read_text())
    return tmp_path


def edit(folder: Path, **changes) -> None:
    path = folder / "quant_model_description.json"
    desc = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            desc.pop(key)
        else:
            desc[key] = value
    path.write_text(json.dumps(desc))


def test_the_unchanged_output_passes(editable):
    checkpoint = load_checkpoint(editable)
    assert len(checkpoint.quantised_linears) == 12
    assert checkpoint.float_linears == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("changes, named", [
    ({"model.layers.1.self_attn.k_proj.weight": "FLOAT"}, "model.layers.1.self_attn.qkv_proj"),
    ({"model.layers.0.mlp.up_proj.weight": "FLOAT"}, "model.layers.0.mlp.gate_up_proj"),
    ({"model.layers.0.self_attn.q_proj.weight_scale": None}, "model.layers.0.self_attn.q_proj.weight_scale"),
    ({"model.layers.0.mlp.down_proj.weight": "W8A8_DYNAMIC"}, "model.layers.0.mlp.down_proj.weight"),
    ({"lm_head.weight": "W8A8_DYNAMIC"}, "lm_head.weight"),
    ({"model.layers.9.mlp.gate_proj.weight": "FLOAT"}, "model.layers.9.mlp.gate_proj.weight"),
    ({"model.norm.weight": "W4A8_DYNAMIC"}, "model.norm.weight"),
    ({"model_quant_type": "W4A8_DYNAMIC"}, "model_quant_type"),
])
def test_an_inconsistent_description_is_refused_naming_the_tensor(editable, changes, named):
    edit(editable, **changes)
    with pytest.raises(DescriptionError, match=named.replace(".", r"\.")):
        load_checkpoint(editable)


def test_a_wrong_shape_is_refused_naming_the_tensor(editable):
    config = json.loads((editable / "config.json").read_text())
    os.unlink(editable / "config.json")
    config["intermediate_size"] = 256
    (editable / "config.json").write_text(json.dumps(config))
    with pytest.raises(DescriptionError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[128, 64\]"):
        load_checkpoint(editable)
