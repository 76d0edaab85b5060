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

import multiprocessing
import os
import signal
import threading
import time
from typing import Any

from transformers import AutoConfig, Qwen3Config

from service.lm_checkpoint import ARCHITECTURE, MODEL_TYPE

#: Name of the entry point (what ``VLLM_PLUGINS`` filters on).
PLUGIN_NAME = "emu35"
#: Lazy reference to the vLLM model class (imported only where the model is built).
MODEL_CLASS_REF = "service.engine.in_vllm.model:Emu3ForCausalLM"
#: Seconds between checks that a vLLM process's parent is still there.
PARENT_POLL_SECONDS = 0.5
_parent_watch: threading.Thread | None = None
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
    _die_with_parent()


def _die_with_parent() -> None:
    """In vLLM's own processes (engine core, workers): end this process as soon as its parent is gone.

    A supervisor that SIGKILLs the server must not leave the engine behind (gigabytes of weights and KV
    cache; a restart would then hold two engines). vLLM starts these processes with multiprocessing, so
    they have a parent process; the server itself and short-lived helper subprocesses do not and are
    left alone. Polling ``getppid`` (reparented = orphaned) is used instead of ``PR_SET_PDEATHSIG``,
    which fires when the parent *thread* that started the process ends, and vLLM starts its engine core
    from a worker thread."""
    global _parent_watch
    if _parent_watch is not None or multiprocessing.parent_process() is None:
        return
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    _parent_watch = threading.Thread(target=watch, name="emu35-parent-watch", daemon=True)
    _parent_watch.start()
