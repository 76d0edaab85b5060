"""The reference engine: transformers' Qwen3 classes (eager attention, KV cache) with Emu3.5's rules.

It runs where vLLM does not and is the oracle of the vLLM engine's tests: both apply the same rule and
sampling functions (``service.engine.policy.rules``) to their logits, so greedy decoding must give identical
ids. The cond and uncond sequences of a request run as one left-padded batch of two; the uncond row
always receives the cond row's token (the lockstep form of design.md §5). In the ``reference`` uncond
mode the uncond branch is a sequence of its own that is fed only the generated image spans.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Iterator

import torch

from service.engine.policy.rules import (
    PIXELS,
    TEXT,
    Guidance,
    RowState,
    SamplingColumns,
    VocabTables,
    advance,
    effective_top_k,
    host_mode,
    next_tokens,
    sampling_columns,
)
from service.engine.policy.spans import in_image_span
from service.lm_checkpoint import CheckpointError, Emu3Config
from service.tokenizer import Emu35Tokenizer
from service.types import GenerationRequest, TokenDelta


def load_qwen3_model(model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load an Emu3.5 checkpoint into transformers' Qwen3ForCausalLM, strictly (no missing/extra weights)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Emu3Config.from_dir(model_dir)
    qcfg = Qwen3Config(**cfg.qwen3_kwargs(), attn_implementation="eager")
    model, info = Qwen3ForCausalLM.from_pretrained(
        str(model_dir), config=qcfg, dtype=dtype, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(f"{model_dir}: weights do not match the Emu3 (Qwen3) layout: {bad}")
    return model.to(device).eval(), cfg


class ReferenceEngine:
    """Synchronous, one request at a time; good for tests, tools and machines without vLLM."""

    def __init__(self, model_dir: str | Path | None, tokenizer: Emu35Tokenizer, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, model=None, config: Emu3Config | None = None):
        """Load ``model_dir``; or, with ``model_dir=None``, serve an already built ``model`` / ``config``
        (the FlashAR benchmark's random model of the real width)."""
        self.tok = tokenizer
        self.device = torch.device(device)
        if model_dir is not None:
            self.model, self.config = load_qwen3_model(model_dir, device, dtype)
        else:
            assert model is not None and config is not None
            self.model, self.config = model.eval(), config
        self.tables = VocabTables.from_tokenizer(tokenizer, self.device)
        self._fallback = torch.Generator(self.device).manual_seed(torch.seed() % (2**63))
        # transformers 5 renamed the KV-cache argument and output field ``past_key_values`` → ``cache``
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def generate(self, req: GenerationRequest) -> Iterator[TokenDelta]:
        """Yield one delta per generated token (the cond sequence's)."""
        image_only = req.image_only_uncond
        prompts = [req.cond_prompt] + ([req.uncond_prompt] if req.guided and req.uncond_prompt else [])
        rows = len(prompts)  # rows the rules see: cond (and uncond when guided)
        # the rows the model runs in one batch: both in lockstep, the cond row alone in reference mode
        # (its uncond branch is a separate sequence that sees only image spans)
        batch = prompts[:1] if image_only else prompts
        ids, attn, positions = self._left_padded(batch)
        uncond = _ImageOnlyUncond(self, req.uncond_prompt or []) if image_only else None

        state = RowState.empty(rows, self.device)
        fixed = req.target_grid or (0, 0)
        state.reset_rows(slice(None), fixed_h=fixed[0], fixed_w=fixed[1])
        dev = self.device
        guidance = None
        if rows == 2:
            guidance = Guidance(torch.tensor([0], device=dev), torch.tensor([1], device=dev),
                                torch.tensor([float(req.cfg_scale)], device=dev))
        ts, im = req.text_sampling, req.image_sampling
        text = SamplingColumns(torch.full((rows,), ts.top_k, device=dev), torch.full((rows,), ts.top_p, device=dev),
                               torch.full((rows,), ts.temperature, device=dev))
        image = SamplingColumns(torch.full((rows,), im.top_k, device=dev), torch.full((rows,), im.top_p, device=dev),
                                torch.full((rows,), im.temperature, device=dev))
        k_cap = max(effective_top_k(ts.top_k, self.tok.vocab_size), effective_top_k(im.top_k, self.tok.vocab_size))
        gen = torch.Generator(self.device).manual_seed(req.seed) if req.seed is not None else None
        stops = set(req.stop_token_ids)

        mode = TEXT  # host-side mirror of the cond row's mode (picks the sampling columns)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True)
        cache = getattr(out, self._cache_arg)
        for step in range(req.max_new_tokens):
            started = time.perf_counter()
            logits = out.logits[:, -1, :].float().clone()
            if uncond is not None:
                # the uncond branch is needed (and fed) only while a pixel is drawn; elsewhere CFG gives
                # its row weight 0, so the cond row's own logits stand in for it
                logits = torch.cat([logits, uncond.logits() if mode == PIXELS else logits])
            chosen = next_tokens(logits, state, self.tables, guidance, text, image, k_cap,
                                 [gen] + [None] * (rows - 1), [k_cap] * rows, self._fallback,
                                 columns=sampling_columns([mode == PIXELS], self.tables))
            token = chosen[:1]
            advance(state, token.expand(rows), self.tables)  # the uncond row takes the cond row's token
            t = int(token.item())
            before, mode = mode, host_mode(mode, t, self.tables)
            if uncond is not None and in_image_span(before, mode):
                uncond.append(t)
            if t in stops:
                reason = "stop"
            elif step + 1 >= req.max_new_tokens:
                reason = "length"
            else:
                reason = None
            if reason is None:
                fed = token.expand(len(batch))
                attn = torch.cat([attn, torch.ones((len(batch), 1), dtype=attn.dtype, device=self.device)], dim=1)
                positions = positions[:, -1:] + 1
                out = self.model(input_ids=fed[:, None], attention_mask=attn, position_ids=positions,
                                 use_cache=True, **{self._cache_arg: cache})
                cache = getattr(out, self._cache_arg)
            yield TokenDelta([t], reason, time.perf_counter() - started)
            if reason is not None:
                return

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input ids, attention mask and positions of ``prompts`` as one left-padded batch."""
        width = max(len(p) for p in prompts)
        pad = self.tok.ids.pad
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        return ids, attn, (attn.cumsum(-1) - 1).clamp(min=0)

    def generate_ids(self, req: GenerationRequest) -> list[int]:
        return [t for d in self.generate(req) for t in d.token_ids]


class _ImageOnlyUncond:
    """The reference form's unconditional branch (design.md §5.2): the uncond prompt followed by the
    generated image spans only, run as its own sequence with its own KV cache.

    Tokens are queued as the cond row writes them and run only when the branch's logits are needed
    (a pixel step), so a stretch of header tokens costs one forward, as a prefill would."""

    def __init__(self, engine: ReferenceEngine, prompt: list[int]) -> None:
        self._engine = engine
        self._pending = list(prompt)
        self._length = 0  # tokens already in the cache
        self._cache = None
        self._last: torch.Tensor | None = None

    def append(self, token: int) -> None:
        self._pending.append(token)

    def logits(self) -> torch.Tensor:
        """``(1, vocab)`` float32 logits after everything appended so far."""
        if self._pending:
            engine, n = self._engine, len(self._pending)
            ids = torch.tensor([self._pending], device=engine.device)
            positions = torch.arange(self._length, self._length + n, device=engine.device)[None]
            attn = torch.ones((1, self._length + n), dtype=torch.long, device=engine.device)
            kwargs: dict[str, object] = {engine._cache_arg: self._cache} if self._cache is not None else {}
            out = engine.model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True, **kwargs)
            self._cache = getattr(out, engine._cache_arg)
            self._last = out.logits[:, -1, :].float()
            self._length += n
            self._pending = []
        assert self._last is not None
        return self._last.clone()

