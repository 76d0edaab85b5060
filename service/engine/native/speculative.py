"""Speculative acceptance (SJD, arXiv 2410.01699) on the policy's distributions, for every draft of a pass.

A draft token ``d`` drawn from ``q`` is accepted with probability ``min(1, p(d)/q(d))`` where ``p`` is the
model's distribution at its position now (CFG, masks, top-k/temperature/top-p all applied:
:class:`~service.engine.policy.rules.Candidates`); at the first rejection the position is drawn from
``max(0, p − q)`` normalised. Whatever ``q`` is, the token kept at each position is then distributed
exactly as ``p`` given the accepted prefix — so ``q`` must be the distribution the draft really came
from: a refreshed draft's ``q`` is the (stale-context) prediction it was drawn from, recorded with it.
Greedy rows are one-hot on both sides, so a draft survives iff it is the argmax and the "residual" is
the argmax itself: greedy ids are AR's.
"""

from __future__ import annotations

import torch

from service.engine.policy.rules import Candidates


def accept(p: Candidates, drafts: torch.Tensor, q_of_draft: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """``[D]`` bool: each draft kept (``u·q(d) < p(d)``, i.e. ``u < p(d)/q(d)``), ``p`` row ``i`` verifying draft ``i``."""
    return uniform * q_of_draft < p.prob_of(drafts)


def residual(p: Candidates, q: Candidates, vocab: int) -> Candidates:
    """``max(0, p − q)`` on ``p``'s candidates (normalising is left to the draw); where it is all zero
    (only possible through rounding) ``p`` itself."""
    dense_q = torch.zeros(q.probs.shape[0], vocab, dtype=q.probs.dtype, device=q.probs.device)
    dense_q.scatter_add_(1, q.ids, q.probs)
    left = (p.probs - dense_q.gather(1, p.ids)).clamp(min=0.0)
    empty = left.sum(-1, keepdim=True) <= 0
    return Candidates(torch.where(empty, p.probs, left), p.ids)


def draw(c: Candidates, noise: torch.Tensor) -> torch.Tensor:
    """``[N]`` token ids, each row drawn from its (unnormalised) candidates by the exponential race with
    ``noise`` ~ Exp(1) of the same shape."""
    return c.ids.gather(1, torch.argmax(c.probs / noise, dim=-1, keepdim=True)).squeeze(1)
