"""Peak extra memory of VQ encoding: the chunked quantiser vs the dense score matrix.

Scenario: one 1024×1024 reference image = a 64×64 latent grid (N = 4096 positions) against the real
codebook size, 131,072 codes × 256 dims. Every measurement runs in a fresh child process:

1. set up (import torch, build the random codebook/latents or the tiny network), then record the
   resident set size (VmRSS);
2. reset the kernel's peak-RSS mark (write ``5`` to ``/proc/self/clear_refs``, Linux ≥ 4.0), so that
   set-up peaks do not count (``ru_maxrss`` cannot be reset; it is the fallback);
3. run the operation once, read the peak (VmHWM); report ``peak − rss_before``.

Allocations this big are mmap-backed (glibc), so RSS really rises and falls with them. tracemalloc
cannot see torch's allocations, which is why RSS is used.

Modes:
  chunked-default  nearest_codes with the library defaults (4096 pixels × 16384 codes)
  chunked-small    nearest_codes with 4096 × 4096
  dense-argmax     torch.argmax(z @ E.T): the full N × K fp32 score matrix
  reference-style  the training-code path: einsum logits, softmax, argmax, one-hot scatter, z_q einsum
  encode-1024      VisionTokenizer.encode of a 1024×1024 PIL image: tiny network (the repo's tiny
                   config) but with a 131072 × 256 codebook, default chunks — the whole encode
  encoder-1024     the same tiny network's encoder + quant_conv alone (no quantiser), to attribute
                   the encode-1024 peak between network activations and the quantiser

Usage: python bench/vq_memory.py [--skip-reference] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

N_CODES, DIM, GRID = 131072, 256, 64
REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(mode: str, threads: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from service.vq.codec import DEFAULT_CHUNK_CODES, DEFAULT_CHUNK_PIXELS, VisionTokenizer, nearest_codes

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    n = GRID * GRID
    if mode in ("encode-1024", "encoder-1024"):
        from service.tiny.vq import TINY_VQ_CONFIG
        from service.vq.checkpoint import build_model, parse_config

        raw = dict(TINY_VQ_CONFIG, embed_dim=DIM, n_embed=N_CODES)
        config = parse_config(raw)
        torch.manual_seed(0)
        tok = VisionTokenizer(build_model(config, "cpu"), config)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
        if mode == "encode-1024":
            run = lambda: tok.encode([image], area=1024 * 1024)[0]  # noqa: E731
            bound = DEFAULT_CHUNK_PIXELS * DEFAULT_CHUNK_CODES * 4
        else:
            x = tok.preprocess(image, 1024 * 1024)[None]

            def run():
                with torch.inference_mode():
                    return tok.model.encode_latents(x)[0, 0].flatten()

            bound = 0
    else:
        codebook = torch.randn(N_CODES, DIM, generator=g)
        z = torch.randn(n, DIM, generator=g)
        if mode == "chunked-default":
            run = lambda: nearest_codes(z, codebook)  # noqa: E731
            bound = min(n, DEFAULT_CHUNK_PIXELS) * min(N_CODES, DEFAULT_CHUNK_CODES) * 4
        elif mode == "chunked-small":
            run = lambda: nearest_codes(z, codebook, chunk_pixels=4096, chunk_codes=4096)  # noqa: E731
            bound = 4096 * 4096 * 4
        elif mode == "dense-argmax":
            run = lambda: torch.argmax(z @ codebook.T, dim=1)  # noqa: E731
            bound = n * N_CODES * 4
        elif mode == "reference-style":
            zb = z.T.reshape(1, DIM, GRID, GRID).contiguous()

            def run():
                logits = torch.einsum("bdhw,nd->bnhw", zb, codebook)
                soft = torch.softmax(logits, dim=1)
                ind = soft.max(1, keepdim=True)[1]
                hard = torch.zeros_like(logits).scatter_(1, ind, 1.0)
                torch.einsum("bnhw,nd->bdhw", hard, codebook)
                return ind.flatten()

            bound = n * N_CODES * 4
        else:
            raise SystemExit(f"unknown mode {mode}")

    rss_before = _status_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reset = _reset_peak()
    t0 = time.perf_counter()
    codes = run()
    seconds = time.perf_counter() - t0
    if reset:
        peak_extra_kib = _status_kib("VmHWM") - rss_before
        method = "VmHWM after clear_refs"
    else:
        peak_extra_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before
        method = "ru_maxrss delta (lower bound)"
    first = [round(v, 3) if isinstance(v, float) else v for v in codes.reshape(-1)[:4].tolist()]
    return {
        "mode": mode,
        "peak_extra_mib": peak_extra_kib / 1024,
        "score_buffer_mib": bound / MiB,
        "seconds": seconds,
        "method": method,
        "first_codes": first,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--skip-reference", action="store_true", help="skip the ~6 GiB reference-style run")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads)))
        return
    modes = ["chunked-default", "chunked-small", "dense-argmax", "reference-style", "encode-1024", "encoder-1024"]
    if args.skip_reference:
        modes.remove("reference-style")
    rows = []
    for mode in modes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--threads", str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    dense = N_CODES * GRID * GRID * 4 / MiB
    print(f"1024x1024 image -> {GRID}x{GRID} grid = {GRID * GRID} positions; codebook {N_CODES} x {DIM} fp32; "
          f"{args.threads} thread(s); dense score matrix = {GRID * GRID * N_CODES / 1e6:.0f}M scores = {dense:.0f} MiB")
    print(f"{'mode':<17} {'score buffer MiB':>17} {'peak extra MiB':>15} {'time s':>8}  first codes")
    for r in rows:
        print(f"{r['mode']:<17} {r['score_buffer_mib']:>17.0f} {r['peak_extra_mib']:>15.0f} {r['seconds']:>8.2f}  {r['first_codes']}")
    quant = [r["first_codes"] for r in rows if r["mode"] in ("chunked-default", "chunked-small", "dense-argmax", "reference-style")]
    print(f"(peak measured as: {rows[0]['method']}; quantiser modes agree on the codes: {all(q == quant[0] for q in quant)})")


if __name__ == "__main__":
    main()
