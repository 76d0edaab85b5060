"""The reference engine: transformers' Qwen3 classes (eager attention, KV cache) with Emu3.5's rules.

It runs where vLLM does not and is the oracle of the vLLM engine's tests: both apply the same rule and
sampling functions (``service.engine.policy.rules``) to their logits, so greedy decoding must give identical
ids. The cond and uncond sequences of a request run as one left-padded batch of two; the uncond row
always receives the cond row's token (the lockstep form of design.md §5).
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

    def __init__(self, model_dir: str | Path, tokenizer: Emu35Tokenizer, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.tok = tokenizer
        self.device = torch.device(device)
        self.model, self.config = load_qwen3_model(model_dir, device, dtype)
        self.tables = VocabTables.from_tokenizer(tokenizer, self.device)
        self._fallback = torch.Generator(self.device).manual_seed(torch.seed() % (2**63))
        # transformers 5 renamed the KV-cache argument and output field ``past_key_values`` → ``cache``
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def generate(self, req: GenerationRequest) -> Iterator[TokenDelta]:
        """Yield one delta per generated token (the cond sequence's)."""
        prompts = [req.cond_prompt] + ([req.uncond_prompt] if req.guided and req.uncond_prompt else [])
        rows = len(prompts)
        width = max(len(p) for p in prompts)
        pad = self.tok.ids.pad
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)

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
            chosen = next_tokens(logits, state, self.tables, guidance, text, image, k_cap,
                                 [gen] + [None] * (rows - 1), [k_cap] * rows, self._fallback,
                                 columns=sampling_columns([mode == PIXELS], self.tables))
            token = chosen[:1]
            tokens = token.expand(rows)  # the uncond row takes the cond row's token (lockstep)
            advance(state, tokens, self.tables)
            t = int(token.item())
            mode = host_mode(mode, t, self.tables)
            if t in stops:
                reason = "stop"
            elif step + 1 >= req.max_new_tokens:
                reason = "length"
            else:
                reason = None
            if reason is None:
                attn = torch.cat([attn, torch.ones((rows, 1), dtype=attn.dtype, device=self.device)], dim=1)
                positions = positions[:, -1:] + 1
                out = self.model(input_ids=tokens[:, None], attention_mask=attn, position_ids=positions,
                                 use_cache=True, **{self._cache_arg: cache})
                cache = getattr(out, self._cache_arg)
            yield TokenDelta([t], reason, time.perf_counter() - started)
            if reason is not None:
                return

    def generate_ids(self, req: GenerationRequest) -> list[int]:
        return [t for d in self.generate(req) for t in d.token_ids]

