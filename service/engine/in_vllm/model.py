"""The Emu3.5 language model for vLLM: vLLM's own Qwen3 implementation under the Emu3.5 name.

Emu3.5's transformer has exactly Qwen3's shapes and weight names (design.md §1), so the class adds
nothing: weights load unchanged through Qwen3's loader (q/k/v and gate/up are fused on load), and
tensor parallelism, graphs and quantisation are Qwen3's. Imported lazily by vLLM through
``service.engine.in_vllm.plugin.MODEL_CLASS_REF``; never import it from code that runs without vLLM.
"""

from __future__ import annotations

from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM


class Emu3ForCausalLM(Qwen3ForCausalLM):
    """Architecture ``Emu3ForCausalLM`` (``model_type: "Emu3"``) served by vLLM's Qwen3 code."""
