"""The types every layer shares: HTTP, the task layer and the engines all import them from here.

What the engine is asked to do (one guided generation, a cond/uncond pair, with Emu3.5's rules), what
it answers (token deltas) and what it reports (stats). Nothing here imports another part of the
service, so no layer has to reach into another to name a request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

#: What the unconditional (CFG) branch of a guided generation sees (design.md §5.2). ``lockstep``: the
#: uncond prompt and every generated token, text included (the release's vLLM path). ``reference``:
#: the uncond prompt and only the generated image spans, BOI…EOI (the release's transformers path).
UncondMode = Literal["lockstep", "reference"]
UNCOND_MODES: tuple[str, ...] = get_args(UncondMode)


@dataclass(frozen=True)
class SamplingSettings:
    """top-k / top-p / temperature for one kind of token (text or image). ``temperature == 0`` (or
    ``top_k == 1``) means greedy."""

    top_k: int
    top_p: float
    temperature: float

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1


@dataclass(frozen=True)
class SamplingOverride:
    """A client's partial sampling settings: None keeps the task's default for that field."""

    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None

    @property
    def empty(self) -> bool:
        return self.top_k is None and self.top_p is None and self.temperature is None

    def over(self, default: SamplingSettings) -> SamplingSettings:
        """These overrides on top of ``default`` (raises ``ValueError`` for an invalid combination)."""
        return SamplingSettings(
            top_k=default.top_k if self.top_k is None else self.top_k,
            top_p=default.top_p if self.top_p is None else self.top_p,
            temperature=default.temperature if self.temperature is None else self.temperature,
        )


#: How an engine draws an image's cells (docs/design.md, decoding schedules). ``ar``: one token per
#: forward pass, raster order. ``jacobi``: speculative Jacobi decoding, a window of ``draft_len`` draft
#: tokens verified per pass (lossless: greedy ids equal ``ar``'s, samples keep its distribution).
#: ``zipar``: next-set prediction, row r+1 opens once row r has ``window`` tokens (approximate; exactly
#: ``ar`` when ``window`` ≥ the row width); with ``draft_len`` > 1 every open row is drafted with Jacobi.
DecodingMode = Literal["ar", "jacobi", "zipar"]
DECODING_MODES: tuple[str, ...] = get_args(DecodingMode)
#: Bounds a request's decoding fields must keep (the HTTP layer turns a violation into a 400).
MAX_DRAFT_LEN = 64
MIN_WINDOW = 1
MAX_WINDOW = 4096
#: ``jacobi``'s default window: SJD's Emu3 scheduler verifies 16 new tokens per pass (its code's
#: ``max_num_new_tokens``). ``zipar`` defaults to 1 (plain ZipAR, no drafts).
DEFAULT_DRAFT_LEN = 16
#: ``zipar``'s default window: row r+1 opens once row r has 16 tokens. It keeps the real 55×73 grid under
#: 1,000 passes (7 + 54·16 + 73 = 944) with the row above a fifth of a row ahead; ZipAR's own runs use
#: windows of this order, smaller ones being faster and further from AR.
DEFAULT_WINDOW = 16


@dataclass(frozen=True)
class Decoding:
    """The schedule one request's images are drawn with. ``None`` fields take the engine's defaults for
    the mode (:meth:`resolved`). Text is always decoded one token per pass."""

    mode: DecodingMode = "ar"
    draft_len: int | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in DECODING_MODES:
            raise ValueError(f"decoding.mode must be one of {DECODING_MODES}, got {self.mode!r}")
        if self.draft_len is not None:
            if isinstance(self.draft_len, bool) or not isinstance(self.draft_len, int) \
                    or not 1 <= self.draft_len <= MAX_DRAFT_LEN:
                raise ValueError(f"decoding.draft_len must be an int in [1, {MAX_DRAFT_LEN}], got {self.draft_len!r}")
            if self.mode == "ar":
                raise ValueError("decoding.draft_len applies to the jacobi and zipar modes, not ar")
        if self.window is not None:
            if isinstance(self.window, bool) or not isinstance(self.window, int) \
                    or not MIN_WINDOW <= self.window <= MAX_WINDOW:
                raise ValueError(f"decoding.window must be an int in [{MIN_WINDOW}, {MAX_WINDOW}], got {self.window!r}")
            if self.mode != "zipar":
                raise ValueError("decoding.window applies to the zipar mode only")

    def resolved(self) -> "Decoding":
        """The same schedule with the defaults of its mode filled in (``ar`` has no fields)."""
        if self.mode == "jacobi":
            return Decoding("jacobi", self.draft_len or DEFAULT_DRAFT_LEN)
        if self.mode == "zipar":
            return Decoding("zipar", self.draft_len or 1, self.window or DEFAULT_WINDOW)
        return self


@dataclass(frozen=True)
class GenerationRequest:
    """One Emu3.5 generation. ``uncond_prompt`` is None (or ``cfg_scale == 1``) for no guidance;
    ``target_grid`` (rows, cols in tokens) forces every image's size, None lets the model write the
    first header (constrained) and reuse it for later images. ``uncond_mode`` says what the uncond
    branch sees (:data:`UncondMode`); both modes give the same tokens when the answer opens with BOI."""

    request_id: str
    cond_prompt: list[int]
    uncond_prompt: list[int] | None
    cfg_scale: float
    text_sampling: SamplingSettings
    image_sampling: SamplingSettings
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    target_grid: tuple[int, int] | None = None
    seed: int | None = None
    uncond_mode: UncondMode = "lockstep"
    decoding: Decoding = field(default_factory=Decoding)
    metadata: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.uncond_mode not in UNCOND_MODES:
            raise ValueError(f"uncond_mode must be one of {UNCOND_MODES}, got {self.uncond_mode!r}")

    @property
    def image_only_uncond(self) -> bool:
        """True when the uncond branch sees only image spans (a guided request in ``reference`` mode)."""
        return self.guided and self.uncond_mode == "reference"

    @property
    def guided(self) -> bool:
        return self.uncond_prompt is not None and self.cfg_scale != 1.0


#: What a checkpoint is: plain Emu3.5 (autoregressive) or a FlashAR post-training (anti-diagonal T2I).
ModelKind = Literal["emu3.5", "flashar"]


@dataclass(frozen=True)
class TokenDelta:
    """Tokens the cond sequence produced since the last delta. ``finish_reason`` is set on the last one:
    ``"stop"`` (a stop token, included in ``token_ids``), ``"length"`` (max_new_tokens) or ``"abort"``.
    ``decode_steps``: the forward passes whose logits chose these tokens; None means one per token (an
    autoregressive engine), FlashAR says 1 per diagonal however many tokens it streams."""

    token_ids: list[int]
    finish_reason: str | None = None
    step_seconds: float = 0.0
    decode_steps: int | None = None
    #: an engine that draws an image out of order (FlashAR, by anti-diagonal): the cells drawn in this
    #: step as ``(r·W + c, token id)``, and ``(diagonals done, diagonals in all)``; the tokens above still
    #: come in Emu3.5's order, as rows complete
    cells: tuple[tuple[int, int], ...] = ()
    diagonals: tuple[int, int] | None = None

    @property
    def steps(self) -> int:
        return len(self.token_ids) if self.decode_steps is None else self.decode_steps

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    """What the engine is doing now. Pairs count generations (a guided one is two vLLM sequences)."""

    running_pairs: int
    waiting_pairs: int
    running_sequences: int  # the engine's own count, from its last scheduler step
    waiting_sequences: int
    kv_usage: float  # fraction of the KV cache in use at the last step
    steps: int  # scheduler steps seen
    preempted_sequences: int  # sequences preempted since start (the pair scheduler keeps this 0)
    peak_running_sequences: int  # most sequences run in one step since start
    unfinished_sequences: int = 0  # sequences the engine still tracks now (live, not from the last step)
