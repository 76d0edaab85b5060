"""What the service needs from an engine, whichever one runs (vLLM or the reference engine).

The HTTP and task layers only see this protocol, the request/delta types and the errors below, so an
engine can be swapped by a setting and tests can use either.
"""

from __future__ import annotations

from typing import AsyncGenerator, Protocol

from service.types import EngineStats, GenerationRequest, TokenDelta


class EngineError(RuntimeError):
    """The engine could not run a generation (server side)."""


class EngineRequestError(ValueError):
    """The generation cannot be run as asked (client side: too long, duplicate id, …)."""


class EngineUnavailableError(EngineError):
    """The engine died (its processes are gone): nothing more can run in this process, which exits so
    that the orchestrator restarts it."""


class PairBrokenError(EngineError):
    """A cond/uncond pair lost lockstep; the generation was failed rather than continued."""


def check_fits(req: GenerationRequest, max_model_len: int) -> list[list[int]]:
    """The checks every engine makes of a request before running it; returns the prompts it will run
    (cond, and uncond when guided). Raises :class:`EngineRequestError`."""
    if req.max_new_tokens < 1:
        raise EngineRequestError("max_new_tokens must be >= 1")
    prompts = [req.cond_prompt] + ([req.uncond_prompt] if req.guided and req.uncond_prompt else [])
    if any(not p for p in prompts):
        raise EngineRequestError("empty prompt")
    longest = max(len(p) for p in prompts)
    if longest + req.max_new_tokens > max_model_len:
        raise EngineRequestError(
            f"prompt ({longest} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the model's "
            f"context of {max_model_len} tokens")
    return prompts


class AsyncEngine(Protocol):
    """The engine API the service holds for its whole life.

    ``schedules`` names the decoding modes (:data:`service.types.DECODING_MODES`) the engine honours in
    ``GenerationRequest.decoding``, the first being its default; the task layer refuses any other with a
    400 before any work. An engine that draws in an order of its own (FlashAR) offers none."""

    schedules: tuple[str, ...]

    @property
    def max_model_len(self) -> int: ...

    def start(self) -> None:
        """Load the model; call from the thread that runs the event loop."""

    def shutdown(self) -> None: ...

    async def self_check(self) -> None:
        """Prove, on the serving loop after :meth:`start`, that the engine applies the Emu3.5 rules;
        raise :class:`EngineError` when it would not (the service then refuses to become ready)."""

    async def health(self) -> bool: ...

    def stats(self) -> EngineStats: ...

    def check(self, req: GenerationRequest) -> None:
        """Raise :class:`EngineRequestError` when ``req`` can never run on this engine."""

    def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """The cond sequence's new ids as they come; closing the iterator aborts the generation.
        Call :meth:`check` first: ``generate`` only refuses an id that is already running."""

    async def abort(self, request_id: str) -> None: ...
