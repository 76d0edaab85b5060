#!/usr/bin/env bash
# One-call device proof for a lent CUDA machine (issue 25). That machine has Python 3.12, torch 2.11
# (CUDA 13), transformers, numpy, pillow, safetensors and tiktoken, but no vLLM, no FastAPI and no
# package registry, and each call carries at most 64 MiB. So the wheels it lacks are prepared here,
# split into parts, moved into place one call at a time, and the proof itself is one command:
#
#   here:     scripts/device-proof.sh --prepare .device-proof        # wheels + parts + manifest
#   box, K=0..N-1 (carry .device-proof/part-KK, two digits, and .device-proof/manifest.txt):
#             scripts/device-proof.sh --part K
#   box:      scripts/device-proof.sh                                 # table + log in $OUT, < 8 min
#   here:     scripts/device-proof.sh --dry-run-cpu                   # the same steps, CPU, tiny model
#
# The run: (a) the engine-level vLLM tests (the engine's graph_mode auto is FULL_DECODE_ONLY graphs on a
# GPU; the log must show the capture), (b) bench/engine.py on a random-weight model of Emu3.5's width
# and vocabulary (as many layers as fit): guided T2I at 1,2,4,8,16 concurrent and the processor +
# scheduler share of a step against plain vLLM sampling, (c) bench/flashar.py where it exists.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# vLLM 0.26.0 is the newest release whose CUDA wheel pins torch==2.11.0 (0.27.x-0.32 pin 2.13, 0.33+ 2.14)
VLLM_CUDA=${EMU35_PROOF_VLLM:-0.26.0}
PART_BYTES=$((60 * 1024 * 1024))
PREPARED=${EMU35_PROOF_DIR:-$REPO/.device-proof}      # what --prepare wrote (carried here part by part)
STAGE=${EMU35_PROOF_STAGE:-$REPO/.device-proof-box}    # where --part puts each part on the box
PY=${PYTHON:-python3}
# what the box already has (scripts/device_proof.py never downloads these; this catches strays)
BOX_HAS='^(torch|triton|nvidia_.*|transformers|tokenizers|huggingface_hub|hf_xet|numpy|pillow|safetensors|tiktoken)-'
# what the service and the tests need on top of vLLM's own requirements
EXTRA_PKGS=(pytest pytest-timeout hypothesis httpx)

die() { echo "device-proof: $*" >&2; exit 2; }

prepare() {
    local dir=$1 wheels
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    wheels=$(mktemp -d)
    "$PY" -m pip wheel -q --no-deps -w "$wheels" "$REPO"
    local project
    project=$(ls "$wheels"/emu35_serve-*.whl)
    # the project, vLLM and the test tools, with what they need, minus what the box has; what this
    # registry lacks is listed (missing.txt), not fatal
    "$PY" "$REPO/scripts/device_proof.py" download "$wheels" "$project" "vllm==$VLLM_CUDA" "${EXTRA_PKGS[@]}" \
        > "$wheels/missing.txt"
    (cd "$wheels" && ls | { grep -E "$BOX_HAS" || true; } | xargs -r rm -f)
    mv "$wheels/missing.txt" "$dir/missing.txt"
    rm -f "$dir"/part-* "$dir"/manifest.txt
    tar -C "$wheels" -cf - . | split -b "$PART_BYTES" -d -a 2 - "$dir/part-"
    {
        echo "vllm $VLLM_CUDA"
        (cd "$dir" && for p in part-*; do echo "part $p $(sha256sum "$p" | cut -d' ' -f1) $(stat -c %s "$p")"; done)
        (cd "$wheels" && for w in *.whl; do echo "wheel $w $(stat -c %s "$w")"; done)
        sed 's/^/missing /' "$dir/missing.txt"
    } > "$dir/manifest.txt"
    rm -rf "$wheels"
    local n
    n=$(grep -c '^part ' "$dir/manifest.txt")
    echo "device-proof: $(grep -c '^wheel ' "$dir/manifest.txt") wheels in $n parts of <= 60 MiB in $dir"
    [ ! -s "$dir/missing.txt" ] || echo "device-proof: not on this registry (the box must have them): $(tr '\n' ' ' < "$dir/missing.txt")"
    echo "device-proof: on the box, for K in 0..$((n - 1)): carry ${dir#"$REPO"/}/part-0K (two digits) and ${dir#"$REPO"/}/manifest.txt, run: scripts/device-proof.sh --part K"
}

part() {
    local k name want got
    [[ "$1" =~ ^[0-9]+$ ]] || die "--part takes a part number (0, 1, ... or 00, 01, ...), not '$1'"
    k=$(printf '%02d' "$((10#$1))")  # base 10: a leading zero is not octal (08, 09)
    name="part-$k"
    [ -f "$PREPARED/manifest.txt" ] || die "no $PREPARED/manifest.txt (carry it with each part)"
    want=$(awk -v p="$name" '$1 == "part" && $2 == p {print $3}' "$PREPARED/manifest.txt")
    [ -n "$want" ] || die "$name is not in the manifest"
    [ -f "$PREPARED/$name" ] || die "no $PREPARED/$name (carry it)"
    got=$(sha256sum "$PREPARED/$name" | cut -d' ' -f1)
    [ "$got" = "$want" ] || die "$name: sha256 $got, manifest says $want"
    mkdir -p "$STAGE"
    mv "$PREPARED/$name" "$STAGE/$name"
    cp "$PREPARED/manifest.txt" "$STAGE/manifest.txt"
    echo "device-proof: $name in place ($(ls "$STAGE" | grep -c '^part-') of $(grep -c '^part ' "$STAGE/manifest.txt"))"
}

install_on_box() {
    # a venv over the box's own torch: the wheels go in without dependency resolution (no registry)
    local venv=$STAGE/venv
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import vllm" 2>/dev/null; then
        [ -f "$STAGE/manifest.txt" ] || die "no parts in $STAGE: run --part K for every part first"
        local missing
        missing=$(awk '$1 == "part" {print $2}' "$STAGE/manifest.txt" | while read -r p; do [ -f "$STAGE/$p" ] || echo "$p"; done)
        [ -z "$missing" ] || die "parts not in place yet: $missing"
        rm -rf "$STAGE/wheels" && mkdir -p "$STAGE/wheels"
        cat "$STAGE"/part-* | tar -C "$STAGE/wheels" -xf -
        "$PY" -m venv --system-site-packages "$venv"
        "$venv/bin/python" -m pip install -q --no-index --no-deps "$STAGE"/wheels/*.whl
        "$venv/bin/python" -m pip check || echo "device-proof: pip check above lists what the box lacks"
    fi
    PY=$venv/bin/python
}

step() {  # step NAME SECONDS CMD...: run with a time limit, log it, remember its exit status
    local name=$1 limit=$2 rc=0 t0=$SECONDS
    shift 2
    echo "==== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1 || rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/steps.txt" "$LOG"
}

run() {
    local mode=$1
    OUT=${OUT:-$(mktemp -d)}
    mkdir -p "$OUT"
    LOG=$OUT/device-proof.log
    : > "$OUT/steps.txt"
    cd "$REPO"
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} PYTHONPATH=$REPO
    local device tests bench flashar
    if [ "$mode" = cuda ]; then
        install_on_box
        device=cuda
        tests=(tests/test_vllm_engine.py tests/test_vllm_processor.py)
        bench=(--device cuda --real-width --concurrency 1 2 4 8 16 --repeats 2)
        flashar=(--device cuda --real-width)
        [ -z "${EMU35_PROOF_LAYERS:-}" ] || { bench+=(--layers "$EMU35_PROOF_LAYERS"); flashar+=(--layers "$EMU35_PROOF_LAYERS"); }
    else
        [ -n "${PYTHON:-}" ] || [ ! -x "$REPO/.venv/bin/python" ] || PY=$REPO/.venv/bin/python
        device=cpu
        tests=(tests/test_vllm_processor.py -k "python_data or cfg")
        bench=(--device cpu --concurrency 1 2 --repeats 1)
        flashar=(--device cpu --grid 4 --engines flashar)
    fi
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no gpu')" | tee -a "$LOG" > "$OUT/machine.txt"
    step tests 200 "$PY" -m pytest -q -m vllm -p no:cacheprovider "${tests[@]}"
    step engine_bench 300 "$PY" bench/engine.py "${bench[@]}" --json "$OUT/engine.json"
    if [ -f bench/flashar.py ]; then
        step flashar_bench 120 "$PY" bench/flashar.py "${flashar[@]}" --json "$OUT/flashar.json"
    else
        echo "flashar_bench rc=skipped (no bench/flashar.py)" | tee -a "$OUT/steps.txt"
    fi
    "$PY" "$REPO/scripts/device_proof.py" table "$OUT" "$device" | tee "$OUT/table.md"
    ! grep -q "rc=[1-9]" "$OUT/steps.txt"
}

case "${1:-}" in
    --prepare) [ $# -eq 2 ] || die "usage: --prepare DIR"; prepare "$2" ;;
    --part) [ $# -eq 2 ] || die "usage: --part K"; part "$2" ;;
    --dry-run-cpu) run cpu ;;
    "") run cuda ;;
    *) die "usage: $0 [--prepare DIR | --part K | --dry-run-cpu]" ;;
esac
