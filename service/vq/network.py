"""The IBQ network: a classic VQGAN convolutional encoder/decoder plus a codebook (design.md §6).

Written for this project. The module tree (and therefore every ``state_dict`` name) follows the
taming-transformers VQGAN layout that the Emu3.5-VisionTokenizer checkpoint uses:

* ``encoder.conv_in``; ``encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2[,nin_shortcut]}``;
  ``encoder.down.{i}.attn.{j}.{norm,q,k,v,proj_out}``; ``encoder.down.{i}.downsample.conv`` (all
  levels but the last); ``encoder.mid.{block_1,attn_1,block_2}``; ``encoder.norm_out``;
  ``encoder.conv_out``;
* ``decoder.conv_in``; ``decoder.mid.*``; ``decoder.up.{i}.block.{j}`` (``num_res_blocks + 1`` per
  level); ``decoder.up.{i}.attn.{j}``; ``decoder.up.{i}.upsample.conv`` (all levels but 0);
  ``decoder.norm_out``; ``decoder.conv_out``;
* ``quant_conv`` (z_channels → embed_dim), ``post_quant_conv`` (embed_dim → z_channels),
  ``quantize.embedding.weight`` (n_embed × embed_dim).

Level ``i`` of ``encoder.down`` and of ``decoder.up`` both work at resolution ``resolution / 2**i``
(the decoder builds its levels deepest first but stores them by level index). Attention blocks are
placed where that *nominal* resolution, computed from the config's ``resolution``, is in
``attn_resolutions`` — independent of the size of the image actually encoded.

Differences from the training code that do not change the numbers: the encoder keeps only the
current activation instead of a list of all of them, and attention uses
``scaled_dot_product_attention`` (same math, ``softmax(q·kᵀ/√c)·v``, without materialising the
``hw × hw`` matrix where a fused kernel exists).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DDConfig", "Encoder", "Decoder", "Codebook", "IBQ", "GROUPS"]

#: GroupNorm group count of the VQGAN family; every normalised channel count must be a multiple.
GROUPS = 32


@dataclass(frozen=True)
class DDConfig:
    """The ``ddconfig`` block of the checkpoint's ``config.yaml`` (encoder/decoder shape)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    z_channels: int
    resolution: int
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = False
    dropout: float = 0.0
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample(self) -> int:
        """Spatial reduction factor: one latent position per ``downsample × downsample`` pixels."""
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        def pos_int(name: str, v: object) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ddconfig.{name} must be a positive int, got {v!r}")

        for name in ("ch", "num_res_blocks", "z_channels", "resolution", "in_channels", "out_ch"):
            pos_int(name, getattr(self, name))
        if not self.ch_mult:
            raise ValueError("ddconfig.ch_mult must not be empty")
        for m in self.ch_mult:
            pos_int("ch_mult[*]", m)
        for r in self.attn_resolutions:
            pos_int("attn_resolutions[*]", r)
        bad = sorted({self.ch * m for m in self.ch_mult if (self.ch * m) % GROUPS})
        if bad:
            raise ValueError(
                f"ddconfig: channel counts {bad} (ch × ch_mult) are not multiples of {GROUPS}, "
                f"which GroupNorm({GROUPS}) requires"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"ddconfig.dropout must be in [0, 1), got {self.dropout!r}")


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6, affine=True)


def _conv3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding)


def _conv1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1)


class ResnetBlock(nn.Module):
    """norm1 → swish → conv1 → norm2 → swish → dropout → conv2, plus a (1×1 when needed) skip."""

    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = _conv3(cin, cout)
        self.norm2 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3(cout, cout)
        if cin != cout:
            self.nin_shortcut = _conv1(cin, cout)
        self.in_channels, self.out_channels = cin, cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = _conv1(channels, channels)
        self.k = _conv1(channels, channels)
        self.v = _conv1(channels, channels)
        self.proj_out = _conv1(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)

        def seq(t: torch.Tensor) -> torch.Tensor:  # (b, c, h, w) -> (b, 1, h*w, c)
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(seq(self.q(n)), seq(self.k(n)), seq(self.v(n)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad one column on the right and one row at the bottom, then a stride-2 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """Pixels ``(B, in_channels, H, W)`` → latents ``(B, z, H/f, W/f)`` with ``f = 2**(levels-1)``.

    ``z`` is ``2 * z_channels`` when ``double_z`` (the layout's VAE variant) else ``z_channels``.
    """

    def __init__(self, cfg: DDConfig):
        super().__init__()
        ch, mult = cfg.ch, tuple(cfg.ch_mult)
        self.num_levels, self.num_res_blocks = len(mult), cfg.num_res_blocks
        self.conv_in = _conv3(cfg.in_channels, ch)
        res = cfg.resolution
        cin = ch
        self.down = nn.ModuleList()
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cout = ch * m
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, cout, cfg.dropout))
                cin = cout
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != len(mult) - 1:
                level.downsample = Downsample(cin)
                res //= 2
            self.down.append(level)
        self.mid = _mid(cin, cfg.dropout)
        self.norm_out = _norm(cin)
        self.conv_out = _conv3(cin, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != self.num_levels - 1:
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents ``(B, z_channels, h, w)`` → pixels ``(B, out_ch, h·f, w·f)`` (unbounded; ≈[-1, 1])."""

    def __init__(self, cfg: DDConfig):
        super().__init__()
        ch, mult = cfg.ch, tuple(cfg.ch_mult)
        self.num_levels = len(mult)
        cin = ch * mult[-1]
        res = cfg.resolution // 2 ** (len(mult) - 1)
        self.conv_in = _conv3(cfg.z_channels, cin)
        self.mid = _mid(cin, cfg.dropout)
        levels: list[nn.Module] = []
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            cout = ch * mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, cout, cfg.dropout))
                cin = cout
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(cin))
            if i != 0:
                level.upsample = Upsample(cin)
                res *= 2
            levels.insert(0, level)  # store by level index: up[i] works at resolution / 2**i
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = _conv3(cin, cfg.out_ch)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class Codebook(nn.Module):
    """Holds ``embedding.weight`` (n_embed × embed_dim); the search itself is in ``codec``."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)


class IBQ(nn.Module):
    """Encoder, decoder, codebook and the two 1×1 convs around the codebook."""

    def __init__(self, ddconfig: DDConfig, n_embed: int, embed_dim: int):
        super().__init__()
        ddconfig.validate()
        if ddconfig.double_z:
            raise ValueError(
                "ddconfig.double_z=true is not an IBQ tokenizer: the encoder would emit "
                "2*z_channels but quant_conv takes z_channels"
            )
        for name, v in (("n_embed", n_embed), ("embed_dim", embed_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.ddconfig = ddconfig
        self.encoder = Encoder(ddconfig)
        self.decoder = Decoder(ddconfig)
        self.quantize = Codebook(n_embed, embed_dim)
        self.quant_conv = _conv1(ddconfig.z_channels, embed_dim)
        self.post_quant_conv = _conv1(embed_dim, ddconfig.z_channels)

    @property
    def downsample(self) -> int:
        return self.ddconfig.downsample

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] ``(B, 3, H, W)`` → pre-quantisation latents ``(B, embed_dim, h, w)``."""
        return self.quant_conv(self.encoder(x))

    def decode_latents(self, quant: torch.Tensor) -> torch.Tensor:
        """Code embeddings ``(B, embed_dim, h, w)`` → pixels ``(B, 3, H, W)`` (≈[-1, 1])."""
        return self.decoder(self.post_quant_conv(quant))
