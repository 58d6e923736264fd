#!/usr/bin/env bash
# The GPU device check of medssl: throughput per pre-training method (fp32 and
# bf16/channels_last), data wait of the real loader, peak memory, one fine-tune,
# a distributed pre-training run, and the sparse-path and peer comparisons when
# their scripts exist. It prints one line per part and the goals with PASS/FAIL,
# and writes device_check.json, .csv and .log under --out (default: $OUT if set).
#
#   bash bench/device_check.sh [--device cpu|cuda] [--quick] [--budget part=s ...]
#                              [--parts p ...] [--out DIR]
#
# Runs the checkout's code (PYTHONPATH=src) with the machine's own python3 and
# PyTorch; MONAI, pydicom and hdf5plugin, when missing, are installed from the
# wheels in bench/wheels (scripts/fetch_device_wheels.sh) into a private folder,
# never over the machine's own packages. docs/device-check.md says how to run it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WHEELS="${MEDSSL_WHEELS:-$ROOT/bench/wheels}"
SITE="${MEDSSL_DEVICE_SITE:-/tmp/medssl-device-site}"
# lightly is the peer library of bench/peer_throughput.py (its loss and head modules
# import without its declared pytorch_lightning and hydra dependencies).
NEEDED=(monai==1.6.1 pydicom==3.0.2 hdf5plugin==7.1.0 lightly==1.6.0 timm==1.0.31)

args=("$@")
out="${OUT:-}"
for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ "${args[$i]}" == "--out" ]]; then out="${args[$((i + 1))]:-}"; fi
done
if [[ -n "$out" && ! " ${args[*]} " == *" --out "* ]]; then args+=(--out "$out"); fi

# Which of the needed packages the interpreter lacks (their import names).
missing=()
for spec in "${NEEDED[@]}"; do
    name="${spec%%==*}"
    if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$name') is None)"; then
        missing+=("$spec")
    fi
done
if ((${#missing[@]})); then
    echo "# installing ${missing[*]} from $WHEELS into $SITE"
    if [[ ! -d "$WHEELS" ]]; then
        echo "error: ${missing[*]} missing and no $WHEELS; run scripts/fetch_device_wheels.sh here" \
            "and carry bench/wheels" >&2
        exit 1
    fi
    # --no-deps: their own needs (numpy, torch, h5py) are the machine's.
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --find-links "$WHEELS" --target "$SITE" "${missing[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PYTHON" -c "import medssl, monai, pydicom, hdf5plugin, timm, torch; print('# medssl', medssl.__version__, 'torch', torch.__version__, 'monai', monai.__version__)"
cd "$ROOT"
exec "$PYTHON" bench/device/check.py "${args[@]}"
