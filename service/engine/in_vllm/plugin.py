"""vLLM general plugin: teaches vLLM the Emu3.5 checkpoint format (``model_type: "Emu3"``).

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in every process it
starts (front end, engine core, each worker) before it reads a model config. It does two things,
with public hooks only (both vLLM 0.11 and 0.32; see docs/vllm-interfaces.md):

* registers :class:`Emu3VllmConfig` with transformers' ``AutoConfig`` under ``"Emu3"`` (capital E;
  transformers' own ``emu3`` is a different, multimodal model). vLLM reads every config that is not
  in its private ``_CONFIG_REGISTRY`` with ``AutoConfig.from_pretrained``, which then returns a
  Qwen3 config describing the same network (design.md §1);
* registers the architecture ``Emu3ForCausalLM`` with vLLM's ``ModelRegistry`` as a lazy
  ``"module:Class"`` reference, so the model code (and torch device state) is imported only in the
  processes that build the model.

This module must stay cheap to import (transformers only, no vLLM model code): vLLM pickles the
config, so workers unpickle ``Emu3VllmConfig`` by importing this module.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, Qwen3Config

from service.lm_checkpoint import ARCHITECTURE, MODEL_TYPE

#: Name of the entry point (what ``VLLM_PLUGINS`` filters on).
PLUGIN_NAME = "emu35"
#: Lazy reference to the vLLM model class (imported only where the model is built).
MODEL_CLASS_REF = "service.engine.in_vllm.model:Emu3ForCausalLM"
#: Default RoPE base of Emu3.5 (design.md §1); transformers' Qwen3 default is 10,000.
DEFAULT_ROPE_THETA = 1_000_000.0


class Emu3VllmConfig(Qwen3Config):
    """A Qwen3 config that answers to ``model_type == "Emu3"``.

    The Emu3.5 token-id fields (``img_token_id``, ``boi_token_id``, …) are kept as plain attributes.
    """

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        d = dict(config_dict)
        if d.get("head_dim") is None and d.get("hidden_size") and d.get("num_attention_heads"):
            d["head_dim"] = int(d["hidden_size"]) // int(d["num_attention_heads"])
        if d.get("rope_theta") is None and not d.get("rope_parameters"):
            d["rope_theta"] = DEFAULT_ROPE_THETA
        d.setdefault("hidden_act", "silu")
        d.setdefault("tie_word_embeddings", False)
        d.setdefault("attention_bias", False)
        return super().from_dict(d, **kwargs)


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group. Idempotent (vLLM may call it repeatedly)."""
    AutoConfig.register(MODEL_TYPE, Emu3VllmConfig, exist_ok=True)

    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_REF)
