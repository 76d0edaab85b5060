"""W8A8 quantisation: time and peak memory for the tiny model, bytes on disk, and the real model's sizes.

1. Quantises the tiny model (as bf16, tokenizer in the folder: ``service.tiny.w8a8``) with
   ``python -m service quantize --device cpu`` in a child process, fresh each run; reports wall time and
   the peak resident memory of the largest process in that tree (``RUSAGE_CHILDREN``; msModelSlim runs
   in a grandchild, which the child waits for, so it counts).
2. Bytes on disk of the weights before (bf16 safetensors) and after (W8A8 safetensors), and of the
   whole folders (the tokenizer files are copied along).
3. The weight bytes of the real Emu3.5 (34.1B) in bf16 and in this W8A8 recipe (q/k/v/o/gate/up int8 with
   fp32 scale and offset per output channel; down_proj, norms, embeddings and lm_head bf16), and what
   that frees per NPU at tensor parallelism 2 on a 64 GB Atlas A2.

Shapes of the real model: hidden 5120 and vocabulary 282,926 (design.md §1); the rest is Qwen3-32B's
(64 layers, intermediate 25,600, 64 query / 8 key-value heads of 128) — the only Qwen3 shape that gives
the design's (docs/design.md §1) ≈31B transformer + ≈3B embeddings = 34.1B.

Usage: python bench/quant.py [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 1e9


@dataclass(frozen=True)
class RealShape:
    hidden: int = 5120
    vocab: int = 282_926
    layers: int = 64
    intermediate: int = 25_600
    heads: int = 64
    kv_heads: int = 8
    head_dim: int = 128


def real_model_bytes(s: RealShape = RealShape()) -> dict[str, float]:
    """Weight bytes in bf16 and in W8A8 (the packaged recipe), and the KV cache per token."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    quantised = {"q": (q, s.hidden), "k": (kv, s.hidden), "v": (kv, s.hidden), "o": (s.hidden, q),
                 "gate": (s.intermediate, s.hidden), "up": (s.intermediate, s.hidden)}
    down = s.intermediate * s.hidden
    norms = 2 * s.hidden + 2 * s.head_dim
    per_layer_params = sum(o * i for o, i in quantised.values()) + down + norms
    embeddings = 2 * s.vocab * s.hidden + s.hidden  # embed_tokens, lm_head, final norm
    params = s.layers * per_layer_params + embeddings
    w8a8_layer = sum(o * i + 2 * 4 * o for o, i in quantised.values()) + 2 * (down + norms)
    return {
        "params": params,
        "bf16_bytes": 2 * params,
        "w8a8_bytes": s.layers * w8a8_layer + 2 * embeddings,
        "kv_bytes_per_token": 2 * s.layers * kv * 2,  # K and V, bf16, all layers
    }


def a2_tp2(sizes: dict[str, float], npu_bytes: float = 64 * GB, utilisation: float = 0.8) -> dict[str, float]:
    """Per NPU at TP 2: weights halve (vocab-parallel embeddings too), KV heads halve."""
    per_npu_bf16, per_npu_w8a8 = sizes["bf16_bytes"] / 2, sizes["w8a8_bytes"] / 2
    kv_per_token = sizes["kv_bytes_per_token"] / 2
    freed = per_npu_bf16 - per_npu_w8a8
    # a guided 1024² T2I generation: cond + uncond, each ≈ 100 prompt + 64·65 image tokens
    pair_tokens = 2 * (100 + 64 * 65)
    return {"budget_bytes": utilisation * npu_bytes, "weights_bf16_per_npu": per_npu_bf16,
            "weights_w8a8_per_npu": per_npu_w8a8, "freed_per_npu": freed,
            "kv_bytes_per_token_per_npu": kv_per_token, "freed_kv_tokens": freed / kv_per_token,
            "freed_t2i_1024_pairs": freed / kv_per_token / pair_tokens}


def folder_bytes(path: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def quantise_tiny(bf16: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of ``python -m service quantize`` on ``bf16``."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "service", "quantize", "--model", str(bf16), "--out", str(out),
                           "--device", "cpu"], cwd=REPO, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"quantize failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    from service.tiny.w8a8 import ensure_tiny_w8a8

    tiny = ensure_tiny_w8a8()  # the bf16 copy (and a cached export, not used for timing)
    bf16 = tiny / "bf16"
    with tempfile.TemporaryDirectory(prefix="emu35-bench-quant-") as tmp:
        out = Path(tmp) / "w8a8"
        seconds, peak = quantise_tiny(bf16, out)
        disk = {"bf16_weights": folder_bytes(bf16, "*.safetensors"),
                "w8a8_weights": folder_bytes(out, "*.safetensors"),
                "bf16_folder": folder_bytes(bf16), "w8a8_folder": folder_bytes(out)}
    real = real_model_bytes()
    a2 = a2_tp2(real)
    result = {"tiny": {"quantize_seconds": round(seconds, 1), "peak_rss_bytes": peak, **disk},
              "real": {**real, "shape": asdict(RealShape())}, "a2_tp2": a2}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("tiny model (bf16, 2 layers, vocabulary 282,926), python -m service quantize --device cpu:")
    print(f"  time {seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB")
    print(f"  weights on disk: bf16 {disk['bf16_weights']:,} B → W8A8 {disk['w8a8_weights']:,} B "
          f"({disk['w8a8_weights'] / disk['bf16_weights']:.3f}×); folders {disk['bf16_folder']:,} B → "
          f"{disk['w8a8_folder']:,} B")
    print(f"real Emu3.5 ({real['params'] / 1e9:.2f}B parameters):")
    print(f"  weights bf16 {real['bf16_bytes'] / GB:.1f} GB, W8A8 {real['w8a8_bytes'] / GB:.1f} GB "
          f"({real['w8a8_bytes'] / real['bf16_bytes']:.3f}×)")
    print(f"  A2 (64 GB/NPU), TP 2: weights per NPU {a2['weights_bf16_per_npu'] / GB:.1f} GB → "
          f"{a2['weights_w8a8_per_npu'] / GB:.1f} GB; frees {a2['freed_per_npu'] / GB:.1f} GB per NPU = "
          f"{a2['freed_kv_tokens']:,.0f} more KV tokens ({a2['kv_bytes_per_token_per_npu'] / 1024:.0f} KiB/token/NPU) "
          f"≈ {a2['freed_t2i_1024_pairs']:.1f} more concurrent guided 1024² T2I generations")
    print(f"  vLLM budget at 0.8 utilisation: {a2['budget_bytes'] / GB:.1f} GB per NPU")


if __name__ == "__main__":
    main()
