#!/usr/bin/env bash
# Download the wheels bench/device_check.sh installs on a GPU machine that has
# PyTorch, h5py and numpy but not MONAI, pydicom or hdf5plugin, and no package
# registry. They land in bench/wheels/ (ignored by its own .gitignore), which a
# device run carries: about 49 MiB, hdf5plugin alone 44 MiB; lightly is the
# peer library of bench/peer_throughput.py.
#
#   bash scripts/fetch_device_wheels.sh [--python-version 3.12]
#
# Pure-Python wheels (monai, pydicom) fit every interpreter; hdf5plugin is
# fetched for the device's CPython and x86-64 manylinux.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${MEDSSL_WHEELS:-$ROOT/bench/wheels}"
PY_VERSION=3.12
if [[ "${1:-}" == "--python-version" ]]; then PY_VERSION="$2"; fi
# The versions pinned in pyproject.toml.
PACKAGES=(monai==1.6.1 pydicom==3.0.2 hdf5plugin==7.1.0 lightly==1.6.0 timm==1.0.31)

mkdir -p "$DEST"
printf '*\n' >"$DEST/.gitignore"
python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${PACKAGES[@]}"
du -ch "$DEST"/*.whl
