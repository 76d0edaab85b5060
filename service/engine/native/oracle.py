"""The oracle of the ZipAR tests: one full recomputation of a finished image under ZipAR's rule, no cache.

The engine decides visibility pass by pass (service.engine.native.visibility: filled cache entries and
this pass's known entries). For ZipAR with one token per row per pass that is, cell by cell, a fixed
geometric rule (:func:`~service.engine.native.visibility.zipar_sees`). Here the whole sequence — prompt,
header and the image the engine drew — runs once through the network under that rule as a static mask,
and every pixel is re-chosen greedily from the logits of the token before it, with the policy's own
CFG and masks. Equal ids mean the cached, out-of-order, batched forwards computed exactly what the rule says.
"""

from __future__ import annotations

import torch

from service.engine.native.network import NativeNetwork
from service.engine.native.visibility import zipar_sees
from service.engine.policy.rules import PIXELS, Guidance, RowState, SamplingColumns, VocabTables, policy_candidates


def _cell(offset: int, width: int) -> tuple[int, int]:
    """A body offset as a ZipAR cell; a row end is column −1 of the row below it."""
    r, c = divmod(offset, width + 1)
    return (r + 1, -1) if c == width else (r, c)


def zipar_mask(length: int, base: int, width: int, window: int) -> torch.Tensor:
    """``[T, T]`` bool: causal before the body (offset 0 at ``base``), :func:`zipar_sees` inside it."""
    allow = torch.ones(length, length, dtype=torch.bool).tril()
    cells = [_cell(p - base, width) for p in range(base, length)]
    for i, q in enumerate(cells):
        for j, k in enumerate(cells):
            allow[base + i, base + j] = zipar_sees(q, k, window)
    return allow


@torch.inference_mode()
def zipar_greedy_pixels(net: NativeNetwork, tables: VocabTables, prompts: list[list[int]], answer: list[int],
                        grid: tuple[int, int], window: int, cfg_scale: float) -> list[int]:
    """The pixels (raster order) a greedy ZipAR decoding of ``grid`` must have drawn, given the engine's
    ``answer`` (header, body, EOI) after each prompt (cond, and the lockstep uncond when guided)."""
    height, width = grid
    start = answer.index(tables.img) + 1
    pixels = [start + r * (width + 1) + c for r in range(height) for c in range(width)]
    logits = []
    for prompt in prompts:
        ids = torch.tensor(prompt + answer)
        base = len(prompt) + start
        mask = zipar_mask(len(ids), base, width, window)
        hidden = net.hidden(ids[None], torch.arange(len(ids))[None], mask[None])
        at = torch.tensor([len(prompt) + p - 1 for p in pixels])
        logits.append(net.logits(hidden[0].index_select(0, at)))
    n = len(pixels)
    batch = torch.cat(logits)
    state = RowState.empty(batch.shape[0])
    state.mode.fill_(PIXELS)
    state.img_h.fill_(height)
    state.img_w.fill_(width)
    state.k.copy_(torch.tensor([p - start for p in pixels] * len(prompts)))
    guidance = None
    if len(prompts) == 2:
        guidance = Guidance(torch.arange(n), torch.arange(n, 2 * n), torch.full((n,), float(cfg_scale)))
    greedy = SamplingColumns(torch.ones(batch.shape[0], dtype=torch.long), torch.ones(batch.shape[0]),
                             torch.ones(batch.shape[0]))
    cands = policy_candidates(batch, state, tables, guidance, greedy, greedy, 1,
                              columns=slice(tables.first_visual, tables.vocab_size))
    return cands.ids[:n, 0].tolist()
