"""Which cache entries each query of a pass sees: the one visibility rule of every schedule.

A pass feeds, per row (one cond or uncond sequence), a list of :class:`Entry`: a token at an explicit
position. Its cache is indexed by position (service.engine.native.network), and a query at position
``p`` sees

* every *filled* entry at a position ``<= p``: tokens accepted and fed in earlier passes;
* the entries of this pass at positions ``<= p``, except other lanes' drafts (a draft of the row
  above may still be rejected: nothing that is not in the final image is ever seen).

Raster-order AR is the special case of one entry per pass; Jacobi windows are causal inside the
window; ZipAR rows see the row above exactly as far as it has been drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Entry:
    """One token fed in a pass. ``lane`` −1: text, header, prefix (no lane); ``draft``: a guess that
    may be rejected; ``query``: its logits are wanted."""

    token: int
    pos: int
    lane: int = -1
    draft: bool = False
    query: bool = False


def pass_mask(rows: list[list[Entry]], filled: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """``(ids, positions, mask)`` of one forward: ``[R, n]``, ``[R, n]``, ``[R, n, width]`` bool. Rows are
    padded to the longest by repeating their last entry (the same token at the same position writes the
    same K/V, so a pad changes nothing). ``filled`` ``[R, ≥width]``: each row's filled cache entries."""
    n = max(len(r) for r in rows)
    padded = [r + [r[-1]] * (n - len(r)) for r in rows]
    ids = torch.tensor([[e.token for e in r] for r in padded])
    pos = torch.tensor([[e.pos for e in r] for r in padded])
    lane = torch.tensor([[e.lane for e in r] for r in padded])
    draft = torch.tensor([[e.draft for e in r] for r in padded])
    keys = torch.arange(width)
    mask = filled[:, None, :width] & (keys[None, None, :] <= pos[:, :, None])
    here = (pos[:, None, :] <= pos[:, :, None]) & (~draft[:, None, :] | (lane[:, None, :] == lane[:, :, None]))
    inpass = torch.zeros(len(rows), n, width, dtype=torch.bool)
    inpass.scatter_(2, pos[:, None, :].expand(-1, n, -1), here)
    return ids, pos, mask | inpass


def zipar_sees(query: tuple[int, int], key: tuple[int, int], window: int) -> bool:
    """ZipAR's rule on image cells (the oracle's form): the query at cell ``(r, j)`` — the input that
    predicts ``(r, j+1)``; the row end above a row counts as its column −1 — sees cell ``(r', c')`` iff
    ``r' <= r`` and ``c' <= j + (r − r')·window``: its own row up to itself, each row above ``window``
    columns further ahead than the row below it."""
    (r, j), (rk, ck) = query, key
    return rk <= r and ck <= j + (r - rk) * window
