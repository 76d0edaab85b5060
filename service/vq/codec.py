"""IBQ vision tokenizer: images ⇄ grids of visual codes (design.md §6), with bounded-memory quantisation.

Encode: resize each reference image by the design.md §4 rule (:mod:`service.vq.resize`), map pixels to
[-1, 1], run the encoder and ``quant_conv``, then pick for every latent position the code whose
embedding has the largest dot product with it (:func:`nearest_codes`). Decode: look the codes up in
the codebook, ``post_quant_conv``, decoder, then ``((x + 1) * 127.5)`` clamped to [0, 255] and
truncated to uint8, as the release does. Images (grids) of equal size are batched into one forward.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from service.vq.checkpoint import VQConfig, load_model
from service.vq.device import resolve_device, resolve_dtype
from service.vq.network import IBQ
from service.vq.resize import reference_image_size

__all__ = [
    "DEFAULT_CHUNK_PIXELS",
    "DEFAULT_CHUNK_CODES",
    "DEFAULT_MAX_BATCH",
    "nearest_codes",
    "VisionTokenizer",
]

#: Latent positions scored at once. 4096 = one whole 1024×1024 image (a 64×64 grid).
DEFAULT_CHUNK_PIXELS = 4096
#: Codebook entries scored at once. With the pixel chunk: 4096 × 16384 × 4 B = 256 MiB of scores.
DEFAULT_CHUNK_CODES = 16384
#: Most images (grids) run through the encoder (decoder) in one forward.
DEFAULT_MAX_BATCH = 8


def nearest_codes(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
    chunk_codes: int = DEFAULT_CHUNK_CODES,
) -> torch.Tensor:
    """``argmax_k z[i] · codebook[k]`` for every row ``i`` of ``z`` — without the full score matrix.

    ``z`` is ``(N, D)`` (latent positions), ``codebook`` is ``(K, D)``; returns int64 ``(N,)``. Plain dot products:
    the release never L2-normalises either side (design.md §6).

    Why chunked: the real tokenizer has K = 131,072 codes, and a 1024×1024 image is a 64×64 grid,
    N = 4096, so the dense score matrix is 4096 × 131,072 = 536M scores = 2 GiB in fp32 (the
    reference implementation then also builds a softmax and a one-hot of the same size). Instead we
    walk ``chunk_pixels`` rows at a time and, for each, ``chunk_codes`` codebook rows at a time,
    keeping a running (best score, best index) per row. Extra memory is therefore bounded by
    ``chunk_pixels × chunk_codes`` scores (4 B each in fp32, 256 MiB with the defaults) plus
    chunk-sized copies of the inputs — whatever K and N are. No softmax is needed: it is monotone,
    so the argmax of the logits is the argmax of the probabilities.

    Ties go to the lowest index, as with ``torch.argmax``: within a chunk ``argmax`` returns the first
    maximum, and a later chunk replaces the running best only when strictly greater.

    Scores are computed in at least fp32 (``bfloat16``/``float16`` inputs are upcast chunk by chunk;
    ``float64`` stays ``float64``), which avoids the mass of spurious ties bf16 dot products over
    D = 256 would produce.
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_codes: need z (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if chunk_pixels < 1 or chunk_codes < 1:
        raise ValueError(f"chunk sizes must be >= 1, got chunk_pixels={chunk_pixels}, chunk_codes={chunk_codes}")
    n, k = z.shape[0], codebook.shape[0]
    if k == 0:
        raise ValueError("nearest_codes: empty codebook")
    dtype = torch.promote_types(torch.promote_types(z.dtype, codebook.dtype), torch.float32)
    out = torch.empty(n, dtype=torch.long, device=z.device)
    for p0 in range(0, n, chunk_pixels):
        zc = z[p0 : p0 + chunk_pixels].to(dtype)
        best_score = best_index = None
        for c0 in range(0, k, chunk_codes):
            ec = codebook[c0 : c0 + chunk_codes].to(dtype)
            scores = zc @ ec.T  # (pixels, codes): the only chunk-sized buffer
            idx = scores.argmax(dim=1)
            val = scores.gather(1, idx[:, None]).squeeze(1)
            del scores
            if best_score is None:
                best_score, best_index = val, idx
            else:
                better = val > best_score  # strict: an equal later code never displaces an earlier one
                best_score = torch.where(better, val, best_score)
                best_index = torch.where(better, idx + c0, best_index)
        out[p0 : p0 + zc.shape[0]] = best_index
    return out


def _batches(keys: Sequence, max_batch: int) -> list[list[int]]:
    """Indices grouped by equal key (first-appearance order), each group split into ≤ max_batch."""
    groups: dict = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return [idx[s : s + max_batch] for idx in groups.values() for s in range(0, len(idx), max_batch)]


class VisionTokenizer:
    """The IBQ tokenizer on one device. Not thread-safe by itself: one worker thread should own it."""

    def __init__(
        self,
        model: IBQ,
        config: VQConfig,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        chunk_pixels: int = DEFAULT_CHUNK_PIXELS,
        chunk_codes: int = DEFAULT_CHUNK_CODES,
        max_batch: int = DEFAULT_MAX_BATCH,
    ):
        if chunk_pixels < 1 or chunk_codes < 1 or max_batch < 1:
            raise ValueError("chunk_pixels, chunk_codes and max_batch must be >= 1")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.requires_grad_(False)
        self.config = config
        self.chunk_pixels, self.chunk_codes, self.max_batch = chunk_pixels, chunk_codes, max_batch

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        **kwargs,
    ) -> "VisionTokenizer":
        """Load a checkpoint folder (``config.yaml`` + ``model.ckpt``) strictly; see ``checkpoint``.

        ``kwargs``: ``chunk_pixels``, ``chunk_codes``, ``max_batch``.
        """
        resolve_device(device)  # fail on a bad device before reading hundreds of MB
        model, config = load_model(path)
        return cls(model, config, device=device, dtype=dtype, **kwargs)

    # ---- facts -------------------------------------------------------------------------------
    @property
    def downsample(self) -> int:
        """Pixels per visual token along each side (16 for Emu3.5)."""
        return self.config.ddconfig.downsample

    @property
    def n_embed(self) -> int:
        return self.config.n_embed

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def codebook(self) -> torch.Tensor:
        return self.model.quantize.embedding.weight

    # ---- encode ------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image, area: int | None) -> torch.Tensor:
        """One PIL image → ``(3, H, W)`` float tensor in [-1, 1] at its reference size (CPU)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image, got {type(image).__name__}")
        image = image.convert("RGB")
        size = reference_image_size(image.width, image.height, area, self.downsample)
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
        # float64 then cast, as the release does (arr / 127.5 - 1).
        arr = np.asarray(image, dtype=np.float64) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32)

    @torch.inference_mode()
    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` in [-1, 1] (H, W multiples of 16) → int64 codes ``(B, H/16, W/16)``.

        One encoder forward for the whole batch; the result is on the tokenizer's device.
        """
        f = self.downsample
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % f or x.shape[3] % f or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"encode_tensor: need (B, 3, H, W) with H, W positive multiples of {f}, got {tuple(x.shape)}")
        x = x.to(device=self.device, dtype=self.dtype)
        z = self.model.encode_latents(x)  # (B, D, h, w)
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(b * h * w, d)
        codes = nearest_codes(
            flat,
            self.codebook,
            chunk_pixels=self.chunk_pixels,
            chunk_codes=self.chunk_codes,
        )
        return codes.view(b, h, w)

    def encode(self, images: Sequence[Image.Image], area: int | None) -> list[np.ndarray]:
        """Reference images → int64 code grids ``(rows, cols)``, in input order.

        Each image is resized by the design.md §4 rule for ``area`` (``None``: keep its size, rounded to
        multiples of 16); images that end up the same size are encoded together.
        """
        pixels = [self.preprocess(im, area) for im in images]
        out: list[np.ndarray | None] = [None] * len(pixels)
        for idx in _batches([tuple(p.shape) for p in pixels], self.max_batch):
            codes = self.encode_tensor(torch.stack([pixels[i] for i in idx])).cpu().numpy()
            for row, i in enumerate(idx):
                out[i] = codes[row].astype(np.int64, copy=True)
        return out

    # ---- decode ------------------------------------------------------------------------------
    def _check_grid(self, grid: object, i: int) -> np.ndarray:
        g = np.asarray(grid)
        if g.ndim != 2 or g.shape[0] == 0 or g.shape[1] == 0:
            raise ValueError(f"grid {i}: expected a non-empty 2-D array of codes, got shape {g.shape}")
        if not np.issubdtype(g.dtype, np.integer):
            raise ValueError(f"grid {i}: codes must be integers, got dtype {g.dtype}")
        lo, hi = int(g.min()), int(g.max())
        if lo < 0 or hi >= self.n_embed:
            raise ValueError(f"grid {i}: codes must be in [0, {self.n_embed}), got range [{lo}, {hi}]")
        return g.astype(np.int64, copy=False)

    @torch.inference_mode()
    def decode_tensor(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, h, w)`` → decoder output ``(B, 3, 16h, 16w)`` as float32 (≈[-1, 1]), one forward."""
        if codes.dim() != 3:
            raise ValueError(f"decode_tensor: need (B, h, w) codes, got {tuple(codes.shape)}")
        codes = codes.to(device=self.device, dtype=torch.long)
        quant = F.embedding(codes, self.codebook)  # (B, h, w, D)
        quant = quant.permute(0, 3, 1, 2).contiguous()
        return self.model.decode_latents(quant).float()

    @staticmethod
    def to_uint8(pixels: torch.Tensor) -> np.ndarray:
        """``(B, 3, H, W)`` in [-1, 1] → uint8 ``(B, H, W, 3)``: ``(x+1)·127.5`` clamped, truncated."""
        return ((pixels + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    def decode(self, grids: Sequence[np.ndarray]) -> list[Image.Image]:
        """Code grids → RGB images of ``16·cols × 16·rows`` pixels; equal-size grids share one forward."""
        checked = [self._check_grid(g, i) for i, g in enumerate(grids)]
        out: list[Image.Image | None] = [None] * len(checked)
        for idx in _batches([g.shape for g in checked], self.max_batch):
            batch = torch.from_numpy(np.stack([checked[i] for i in idx]))
            arrays = self.to_uint8(self.decode_tensor(batch))
            for row, i in enumerate(idx):
                out[i] = Image.fromarray(arrays[row])  # uint8 (H, W, 3) -> RGB
        return out
