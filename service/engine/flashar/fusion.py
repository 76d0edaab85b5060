"""How the horizontal and vertical predictions of the previous diagonal become one cell's logits (§7).

For a target cell ``(r, c)`` the left neighbour ``(r, c−1)`` and the upper one ``(r−1, c)`` both lie on
the previous diagonal. Row 0 takes the left neighbour's horizontal logits, column 0 the upper
neighbour's vertical logits, interior cells a learned sigmoid gate of both; the corner (0, 0) mixes the
prompt's features with its own gate. Everything is vectorised over the targets of a whole batch.
"""

from __future__ import annotations

import torch

from service.engine.flashar.network import FlashARNetwork


def corner_logits(net: FlashARNetwork, pre_h: torch.Tensor, pre_b: torch.Tensor) -> torch.Tensor:
    """Cell (0, 0) of each row: ``g₀·H(pre_H) + (1−g₀)·V(pre_B)``, ``g₀ = σ(corner(pre_H))``; ``[R, V]``."""
    pre_b = pre_b.to(pre_h.device)
    g = net.corner_gate(pre_h)
    return g * net.horizontal_logits(pre_h) + (1 - g) * net.vertical_logits(pre_b)


def fused_logits(net: FlashARNetwork, h_h: torch.Tensor, h_v: torch.Tensor, left: torch.Tensor, up: torch.Tensor,
                 has_left: torch.Tensor, has_up: torch.Tensor) -> torch.Tensor:
    """Logits of ``T`` target cells from the previous diagonal's features.

    ``h_h``/``h_v`` ``[N, D]``: the normed horizontal and vertical features of the fed cells (all rows,
    flattened); ``left``/``up`` ``[T]``: index into them of each target's left / upper neighbour (any
    valid index where the neighbour does not exist); ``has_left``/``has_up`` ``[T]`` bool."""
    dev = h_h.device
    left, up, has_left, has_up = left.to(dev), up.to(dev), has_left.to(dev), has_up.to(dev)
    hl, vu = h_h[left], h_v[up]
    g = net.interior_gate(hl, vu)
    g = torch.where(has_left & has_up, g.squeeze(-1), has_left.float())[:, None]  # row 0: 1, column 0: 0
    z_h = net.horizontal_logits(hl)
    z_v = net.vertical_logits(vu)
    return g * z_h + (1 - g) * z_v
