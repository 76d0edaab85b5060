"""The reference engine: Emu3.5's rules over a transformers model, one generation at a time (tests, tools,
and a CPU fallback when vLLM is absent), and its async wrapper with the service's engine API."""

from service.engine.reference.async_engine import AsyncReferenceEngine
from service.engine.reference.engine import ReferenceEngine

__all__ = ["AsyncReferenceEngine", "ReferenceEngine"]
