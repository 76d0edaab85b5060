"""The Emu3 transformer (Qwen3 shapes) as plain tensors, over a slot KV cache indexed by position.

The native engine needs what transformers' model classes do not offer: every query with an explicit
position and its own key mask, and a cache shared by all requests of a batch whose entries can be
written out of order (ZipAR rows, Jacobi windows) and overwritten (a rejected draft). So the cache of
a row (one cond or uncond sequence) is indexed by the token's *position*: the entry at index ``t`` is
the K/V of the token at position ``t``, whatever pass wrote it, and which entries a query sees is
decided by the mask the caller builds (service.engine.native.visibility), never by write order.

The building blocks (RMSNorm, RoPE, a decoder layer's weights, the slot cache, contiguous layer runs per
device) are the FlashAR network's; only the heads differ (one ``lm_head`` over the whole vocabulary).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from service.engine.flashar.network import KVCache, Layer, rms_norm, rope
from service.lm_checkpoint import CheckpointError, Emu3Config

_LAYER_KEYS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
               "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
               "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
               "mlp.down_proj.weight")


def expected_names(layers: int) -> set[str]:
    """Every tensor an Emu3 checkpoint of ``layers`` layers holds (transformers' Qwen3 names)."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    return names | {f"model.layers.{i}.{k}" for i in range(layers) for k in _LAYER_KEYS}


def load_emu3_weights(model_dir: str | Path, dtype: torch.dtype) -> tuple[Emu3Config, dict[str, torch.Tensor]]:
    """The checkpoint's tensors on the CPU in ``dtype``, strictly: a missing or extra tensor is refused."""
    from safetensors import safe_open

    cfg = Emu3Config.from_dir(model_dir)
    if cfg.raw.get("rope_scaling"):
        raise CheckpointError(f"{model_dir}: rope_scaling {cfg.raw['rope_scaling']!r} is not supported by the "
                              "native engine (plain RoPE only)")
    want = expected_names(int(cfg.raw["num_hidden_layers"]))
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name not in want:
                    raise CheckpointError(f"{file.name}: unexpected tensor {name!r} (not an Emu3 weight)")
                weights[name] = f.get_tensor(name).to(dtype)
    missing = sorted(want - set(weights))
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensor {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return cfg, weights


class NativeNetwork:
    """Embedding, decoder layers (contiguous runs per device) and the LM head of one Emu3 checkpoint."""

    def __init__(self, config: Emu3Config, weights: dict[str, torch.Tensor], devices: list[torch.device],
                 dtype: torch.dtype) -> None:
        raw = config.raw
        self.config, self.dtype, self.devices = config, dtype, devices
        self.num_heads = int(raw["num_attention_heads"])
        self.num_kv_heads = int(raw["num_key_value_heads"])
        self.head_dim = config.head_dim
        self.eps = float(raw.get("rms_norm_eps", 1e-6))
        self.vocab_size = int(raw["vocab_size"])
        self.max_positions = int(raw.get("max_position_embeddings", 32768))
        weights = dict(weights)
        n, count = len(devices), int(raw["num_hidden_layers"])
        self.layers = [Layer.take(weights, f"model.layers.{i}.", devices[min(i * n // count, n - 1)])
                       for i in range(count)]
        self.embed = weights.pop("model.embed_tokens.weight").to(devices[0])
        self.norm = weights.pop("model.norm.weight").to(devices[-1])
        self.lm_head = weights.pop("lm_head.weight").to(devices[-1])
        theta = float(raw.get("rope_theta", 1_000_000.0))
        hd = self.head_dim
        # float32 tables as transformers builds them, whatever the weights' dtype (ids must match it)
        self._inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))

    def new_cache(self, slots: int, capacity: int) -> KVCache:
        return KVCache(self.layers, slots, capacity, self.num_kv_heads, self.head_dim, self.dtype)

    def _rope_tables(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(device, torch.float32)[..., None] * self._inv_freq.to(device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _attend(self, la: Layer, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVCache | None, index: int, slots: torch.Tensor | None, write_at: torch.Tensor | None
                ) -> torch.Tensor:
        """One layer's self-attention. With a cache the queries' K/V are written at their positions first,
        then each query attends to its row's entries ``0 … width−1`` under ``mask``."""
        w, b, n, hd = la.w, x.shape[0], x.shape[1], self.head_dim
        q = rms_norm((x @ w["self_attn.q_proj.weight"].T).view(b, n, self.num_heads, hd),
                     w["self_attn.q_norm.weight"], self.eps).transpose(1, 2)
        k = rms_norm((x @ w["self_attn.k_proj.weight"].T).view(b, n, self.num_kv_heads, hd),
                     w["self_attn.k_norm.weight"], self.eps).transpose(1, 2)
        v = (x @ w["self_attn.v_proj.weight"].T).view(b, n, self.num_kv_heads, hd).transpose(1, 2)
        q, k = rope(q, *cos_sin), rope(k, *cos_sin)
        if cache is not None and slots is not None and write_at is not None:
            rows = slots[:, None].expand_as(write_at)
            cache.k[index][rows, :, write_at] = k.transpose(1, 2)
            cache.v[index][rows, :, write_at] = v.transpose(1, 2)
            width = mask.shape[-1]
            k, v = cache.k[index][slots, :, :width], cache.v[index][slots, :, :width]
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        # transformers' eager form (softmax in float32), so that ids match the reference engine's
        scores = torch.matmul(q, k.transpose(2, 3)) * hd ** -0.5
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
        return out.transpose(1, 2).reshape(b, n, self.num_heads * hd) @ w["self_attn.o_proj.weight"].T

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: KVCache | None = None,
               slots: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states of ``ids`` ``[R, n]`` at ``positions`` ``[R, n]``; ``mask`` ``[R, n, width]``
        bool says which keys each query sees. With ``cache`` (and ``slots`` ``[R]``) keys are the slot
        entries ``0 … width−1`` (this call's tokens written at their positions first); without, the
        keys are the call's own tokens (``width == n``: the oracle's full recomputation)."""
        x = self.embed[ids.to(self.devices[0])]
        tables: dict[torch.device, tuple] = {}
        for i, la in enumerate(self.layers):
            if la.device not in tables:
                tables[la.device] = (self._rope_tables(positions, la.device), mask[:, None].to(la.device),
                                     None if slots is None else slots.to(la.device), positions.to(la.device))
            cos_sin, m, s, at = tables[la.device]
            x = x.to(la.device)
            h = rms_norm(x, la.w["input_layernorm.weight"], self.eps)
            x = x + self._attend(la, h, cos_sin, m, cache, i, s, at if cache is not None else None)
            h = rms_norm(x, la.w["post_attention_layernorm.weight"], self.eps)
            x = x + (F.silu(h @ la.w["mlp.gate_proj.weight"].T) * (h @ la.w["mlp.up_proj.weight"].T)) \
                @ la.w["mlp.down_proj.weight"].T
        return rms_norm(x.to(self.devices[-1]), self.norm, self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the whole vocabulary of hidden states ``[..., D]``."""
        return (hidden.to(self.devices[-1]) @ self.lm_head.T).float()
