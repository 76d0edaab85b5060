"""A tiny IBQ checkpoint in the exact folder format of Emu3.5-VisionTokenizer, for tests and the demo.

Same structure as the real tokenizer — 16× downsampling (five levels), attention at one level and in
the middle — and the real widths and flags where code outside this project depends on them: the real
codebook of 131,072 codes of dimension 256 (the release's decode path reshapes embeddings to
``(1, h, w, 256)``), ``z_channels`` 256, and ``use_entropy_loss: false`` (with ``true`` the release's
encoder fails in eval mode). Only the convolution trunk is thin (ch 32, one ResNet block per level).
The codebook costs 131,072 × 256 × 4 B = 128 MiB. Weights are random but deterministic for a seed; the
state dict is written wrapped as ``{"state_dict": ...}`` to exercise that loading path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from service.vq.checkpoint import build_model, parse_config, save_checkpoint

__all__ = ["TINY_VQ_CONFIG", "make_tiny_vq"]

TINY_VQ_CONFIG: dict = {
    "ddconfig": {
        "double_z": False,
        "z_channels": 256,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 2, 2, 4],
        "num_res_blocks": 1,
        "attn_resolutions": [16],
        "dropout": 0.0,
    },
    "n_embed": 131072,
    "embed_dim": 256,
    # training-only keys, present in the real config and ignored by inference
    "beta": 0.25,
    "use_entropy_loss": False,
    "cosine_similarity": False,
    "entropy_temperature": 0.01,
    "sample_minimization_weight": 1.0,
    "batch_maximization_weight": 1.0,
}


def make_tiny_vq(out_dir: Path, seed: int = 0, *, l2_normalize: bool = False) -> Path:
    """Write ``config.yaml`` + ``model.ckpt`` of the tiny IBQ into ``out_dir``; return ``out_dir``."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY_VQ_CONFIG.items()}
    if l2_normalize:
        raw["l2_normalize"] = True
    config = parse_config(raw)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = build_model(config, "cpu")
    return save_checkpoint(Path(out_dir), raw, model.state_dict(), wrap=True)
