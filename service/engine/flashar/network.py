"""The FlashAR transformer: the Emu3 (Qwen3-shaped) backbone, the vertical branch and both KV caches.

Weights are plain tensors taken from the strictly loaded state dict (no transformers model: the
attention needs the spec's non-causal chunk masks, and the cache is a slot pool shared by every
request in a batch). Each decoder layer lives on one device; ``devices`` with several entries splits
the layers in contiguous runs (pipeline placement for a model larger than one accelerator), the hidden
state moving at the boundaries.

Two forms of the same network:

* cached (:meth:`FlashARNetwork.prefill` / :meth:`FlashARNetwork.step`): a prompt, then one anti-diagonal
  chunk per call; a chunk's queries see every valid key of their row's cache and the whole chunk —
  exactly the proximity rule, because the cache holds only earlier diagonals (§5);
* full (:meth:`FlashARNetwork.full`): the whole ``[prefix | grid]`` sequence under the explicit 4-D mask,
  no cache. The oracle in the tests recomputes everything with it at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.engine.flashar.checkpoint import FlashARConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm: statistics in float32, result in the input's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; ``x`` is ``[B, heads, n, hd]``, ``cos``/``sin`` ``[B, 1, n, hd]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class Layer:
    """One Emu3 decoder layer's weights, on its device."""

    w: dict[str, torch.Tensor]
    device: torch.device

    @classmethod
    def take(cls, weights: dict[str, torch.Tensor], prefix: str, device: torch.device) -> "Layer":
        keys = [k for k in weights if k.startswith(prefix)]
        return cls({k[len(prefix):]: weights.pop(k).to(device) for k in keys}, device)


class KVCache:
    """Per-layer K/V for ``slots`` rows of up to ``capacity`` tokens: ``[slots, kv_heads, capacity, hd]``.

    A row (one cond or uncond sequence) owns a slot; the host keeps each slot's valid length. Only real
    tokens are stored (a prompt's padding never is), so the key-validity mask is ``t < length``."""

    def __init__(self, layers: list[Layer], slots: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype) -> None:
        self.k = [torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype, device=la.device) for la in layers]
        self.v = [torch.zeros_like(k) for k in self.k]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def grow(self, capacity: int) -> None:
        """Make room for ``capacity`` tokens per slot (kept contents)."""
        extra = capacity - self.capacity
        if extra > 0:
            self.k = [F.pad(k, (0, 0, 0, extra)) for k in self.k]
            self.v = [F.pad(v, (0, 0, 0, extra)) for v in self.v]


@dataclass
class Chunk:
    """One batched forward's bookkeeping: per row its slot, the cache index of each query (where its
    K/V is written) and how many keys are valid once it is written; all on the host until moved."""

    slots: torch.Tensor  # [R] long
    write_at: torch.Tensor  # [R, n] long
    valid: torch.Tensor  # [R] long: cache length after this chunk
    positions: torch.Tensor  # [R, n] long: RoPE positions
    causal: bool  # a prompt (causal inside the chunk) or a diagonal (the whole chunk visible)


class FlashARNetwork:
    """Backbone + vertical branch + heads + gates of one FlashAR checkpoint."""

    def __init__(self, config: FlashARConfig, weights: dict[str, torch.Tensor],
                 devices: list[torch.device], dtype: torch.dtype) -> None:
        self.cfg, self.dtype, self.devices = config, dtype, devices
        weights = dict(weights)
        n, L = len(devices), config.num_layers

        def dev(i: int) -> torch.device:  # contiguous runs of layers per device
            return devices[min(i * n // L, n - 1)]

        self.layers = [Layer.take(weights, f"backbone.layers.{i}.", dev(i)) for i in range(L)]
        s = config.vertical_start
        self.vertical = [Layer.take(weights, f"vertical_block.{k}.", dev(min(s + k, L - 1)))
                         for k in range(config.vertical_layers)]
        first, last = devices[0], devices[-1]
        self.embed = weights.pop("backbone.embed_tokens.weight").to(first)
        heads = ("backbone.norm.weight", "horizontal_head.weight", "vertical_head.weight", "vertical_norm.weight",
                 "hv_gate_mlp.0.weight", "hv_gate_mlp.2.weight", "hv_gate_mlp.2.bias", "hv_gate_corner.weight",
                 "hv_gate_corner.bias")
        self.head = {k: weights.pop(k).to(last) for k in heads}
        hd = config.head_dim
        self._inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))

    # ---- building blocks -------------------------------------------------------------------------
    def _rope_tables(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(device, torch.float64)[..., None] * self._inv_freq.to(device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _attend(self, la: Layer, x: torch.Tensor, rope_cs: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor, cache: KVCache | None, index: int, chunk: Chunk | None) -> torch.Tensor:
        """Self-attention of one layer; with a cache the chunk's K/V are written first, then every query
        attends to its row's valid keys (``mask``)."""
        cfg, w = self.cfg, la.w
        b, n, _ = x.shape
        hd = cfg.head_dim
        q = rms_norm((x @ w["self_attn.q_proj.weight"].T).view(b, n, cfg.num_heads, hd), w["self_attn.q_norm.weight"],
                     cfg.rms_norm_eps).transpose(1, 2)
        k = rms_norm((x @ w["self_attn.k_proj.weight"].T).view(b, n, cfg.num_kv_heads, hd),
                     w["self_attn.k_norm.weight"], cfg.rms_norm_eps).transpose(1, 2)
        v = (x @ w["self_attn.v_proj.weight"].T).view(b, n, cfg.num_kv_heads, hd).transpose(1, 2)
        q, k = rope(q, *rope_cs), rope(k, *rope_cs)
        if cache is not None and chunk is not None:
            slots = chunk.slots.to(la.device)
            at = chunk.write_at.to(la.device)
            rows = slots[:, None].expand_as(at)
            cache.k[index][rows, :, at] = k.transpose(1, 2)
            cache.v[index][rows, :, at] = v.transpose(1, 2)
            width = mask.shape[-1]
            k = cache.k[index][slots, :, :width]
            v = cache.v[index][slots, :, :width]
        groups = cfg.num_heads // cfg.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, n, cfg.num_heads * hd) @ w["self_attn.o_proj.weight"].T

    def _layer(self, la: Layer, x: torch.Tensor, rope_cs, mask, cache, index, chunk) -> torch.Tensor:
        eps, w = self.cfg.rms_norm_eps, la.w
        x = x + self._attend(la, rms_norm(x, w["input_layernorm.weight"], eps), rope_cs, mask, cache, index, chunk)
        h = rms_norm(x, w["post_attention_layernorm.weight"], eps)
        return x + (F.silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T

    def _run(self, layers: list[Layer], x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             cache: KVCache | None, chunk: Chunk | None, tap: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``layers``; returns the output and (with ``tap``) the residual entering layer ``tap``."""
        tables: dict[torch.device, tuple] = {}
        tapped = None
        for i, la in enumerate(layers):
            if i == tap:
                tapped = x
            if la.device not in tables:
                tables[la.device] = (self._rope_tables(positions, la.device), mask.to(la.device))
            rope_cs, m = tables[la.device]
            x = self._layer(la, x.to(la.device), rope_cs, m, cache, i, chunk)
        if tap == len(layers):
            tapped = x
        return x, tapped

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x.to(self.devices[-1]), self.head["backbone.norm.weight"], self.cfg.rms_norm_eps)

    # ---- heads and gates (§7) --------------------------------------------------------------------
    def horizontal_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of the visual ids only (columns ``O…V−1``): nothing else may be drawn in a grid (§9)."""
        return (h.to(self.devices[-1]) @ self.head["horizontal_head.weight"][self.cfg.visual_offset:].T).float()

    def vertical_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Like :meth:`horizontal_logits`, from the vertical head."""
        return (h.to(self.devices[-1]) @ self.head["vertical_head.weight"][self.cfg.visual_offset:].T).float()

    def interior_gate(self, h_left: torch.Tensor, v_up: torch.Tensor) -> torch.Tensor:
        """``σ(MLP([h_H ; h_V]))``: the horizontal prediction's weight, ``[..., 1]`` float32."""
        u = torch.cat([h_left, v_up], dim=-1)
        hidden = F.silu(u @ self.head["hv_gate_mlp.0.weight"].T)
        return torch.sigmoid((hidden @ self.head["hv_gate_mlp.2.weight"].T + self.head["hv_gate_mlp.2.bias"]).float())

    def corner_gate(self, pre_h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((pre_h @ self.head["hv_gate_corner.weight"].T + self.head["hv_gate_corner.bias"]).float())

    # ---- cached form -----------------------------------------------------------------------------
    def new_caches(self, slots: int, capacity: int) -> tuple[KVCache, KVCache]:
        """The backbone's cache (prompt + image tokens) and the vertical branch's (image tokens only)."""
        cfg = self.cfg
        return (KVCache(self.layers, slots, capacity, cfg.num_kv_heads, cfg.head_dim, self.dtype),
                KVCache(self.vertical, slots, capacity, cfg.num_kv_heads, cfg.head_dim, self.dtype))

    @staticmethod
    def _chunk_mask(chunk: Chunk, width: int) -> torch.Tensor:
        """``[R, 1, n, width]`` bool: a query sees its row's valid keys (and, in a prompt, none after it)."""
        keys = torch.arange(width)
        mask = keys[None, None, :] < chunk.valid[:, None, None]
        if chunk.causal:
            mask = mask & (keys[None, None, :] <= chunk.write_at[:, :, None])
        return mask[:, None]

    def prefill(self, ids: torch.Tensor, chunk: Chunk, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Run right-padded prompts ``[R, n]`` into the backbone cache; returns ``h_H`` and ``x_S`` at every
        position (the caller picks each row's last real token)."""
        width = int(chunk.valid.max())
        x = self.embed[ids.to(self.devices[0])]
        out, x_s = self._run(self.layers, x, chunk.positions, self._chunk_mask(chunk, max(width, ids.shape[1])),
                             cache, chunk, tap=self.cfg.vertical_start)
        assert x_s is not None
        return self._finish(out), x_s

    def step(self, ids: torch.Tensor, chunk: Chunk, vchunk: Chunk, cache: KVCache, vcache: KVCache
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed one diagonal chunk per row ``[R, n]`` (padded); returns ``h_H`` and ``h_V`` of its cells."""
        x = self.embed[ids.to(self.devices[0])]
        out, x_s = self._run(self.layers, x, chunk.positions, self._chunk_mask(chunk, int(chunk.valid.max())),
                             cache, chunk, tap=self.cfg.vertical_start)
        assert x_s is not None
        y, _ = self._run(self.vertical, x_s, vchunk.positions, self._chunk_mask(vchunk, int(vchunk.valid.max())),
                         vcache, vchunk)
        return self._finish(out), rms_norm(y.to(self.devices[-1]), self.head["vertical_norm.weight"],
                                           self.cfg.rms_norm_eps)

    # ---- full-sequence form (the oracle's) -------------------------------------------------------
    def full(self, ids: torch.Tensor, prefix_valid: torch.Tensor, grid: tuple[int, int]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The whole ``[prefix (P, right-padded) | H·W grid]`` sequence of each row under §5's 4-D mask, no
        cache. ``prefix_valid`` ``[R, P]`` bool. Returns ``h_H`` ``[R, P+HW, D]``, ``x_S`` (same) and ``h_V``
        of the grid ``[R, HW, D]``."""
        rows, total = ids.shape
        h, w = grid
        p = total - h * w
        diag = (torch.arange(h)[:, None] + torch.arange(w)[None, :]).reshape(-1)
        allow = torch.zeros(rows, total, total, dtype=torch.bool)
        causal = torch.ones(p, p, dtype=torch.bool).tril()
        allow[:, :p, :p] = causal[None] & prefix_valid[:, None, :] & prefix_valid[:, :, None]
        allow[:, p:, :p] = prefix_valid[:, None, :]
        allow[:, p:, p:] = (diag[None, :] <= diag[:, None])[None]
        # padded prefix queries see nothing in the release; let them see themselves (their output is unused)
        allow |= torch.eye(total, dtype=torch.bool)[None]
        positions = torch.arange(total)[None].expand(rows, total)
        x = self.embed[ids.to(self.devices[0])]
        out, x_s = self._run(self.layers, x, positions, allow[:, None], None, None, tap=self.cfg.vertical_start)
        assert x_s is not None
        grid_allow = (diag[None, :] <= diag[:, None])[None, None].expand(rows, 1, h * w, h * w)
        y, _ = self._run(self.vertical, x_s[:, p:], positions[:, p:], grid_allow, None, None)
        h_v = rms_norm(y.to(self.devices[-1]), self.head["vertical_norm.weight"], self.cfg.rms_norm_eps)
        return self._finish(out), x_s, h_v
