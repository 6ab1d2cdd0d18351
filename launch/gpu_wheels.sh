#!/usr/bin/env bash
# Download the wheels `launch/gpu_check.sh` needs on a GPU machine that has torch, Triton, numpy, scipy, pandas,
# PyYAML, safetensors, torchdiffeq and tqdm but nothing else, and no network (the device tool's KINDS.md lists
# what is there): omegaconf alone (pure Python; it vendors its parser and needs only PyYAML), into
# launch/wheels/ (ignored by git; carried to the machine by the device tool's `carry`).
#   bash launch/gpu_wheels.sh          # once, here, with pip reaching PyPI
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/launch/wheels"
# The version pyproject.toml pins: the same omegaconf the project is tested with.
OMEGACONF="$(sed -n 's/^ *"omegaconf==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml")"
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform any -d "$DEST" "omegaconf==${OMEGACONF:?not pinned in pyproject.toml}"
ls -l "$DEST"
du -sh "$DEST"
