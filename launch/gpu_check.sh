#!/usr/bin/env bash
# The GPU check of issue 16 in one call: `scldm-scale bench gpu` (scldm_scale/bench/gpu.py) on a machine that
# has torch and Triton but neither this package installed nor network access, writing JSON, report.md and
# run.log into $OUT (the device tool's output folder) or ./gpu_check_out.
#   bash launch/gpu_wheels.sh                   # once, here: omegaconf's wheel into launch/wheels/ (ignored)
#   bash launch/gpu_check.sh                    # there; arguments go to `bench gpu` (--budget-s, --steps)
#   bash launch/gpu_check.sh --smoke            # here, on the CPU: Triton's interpreter, tiny shapes
#   bash launch/gpu_check.sh --smoke --overwrite  # again into ./gpu_check_out (an earlier check's folder only)
# Python: $PYTHON, else this checkout's .venv if it has one, else python3 (the GPU machine's, which holds
# torch). What that Python lacks of the project's needs comes from launch/wheels/ (pip --no-index --target) and
# the checkout itself (PYTHONPATH; kernels/ is imported as scldm_kernels through a symlink), since the package
# cannot be pip-installed there (it asks for Python 3.11; the GPU machine has 3.12).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
SITE="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/scldm_gpu_check_site}"
mkdir -p "$SITE/links"
if ! "$PY" -c 'import omegaconf' 2>/dev/null; then
    if ! compgen -G "$ROOT/launch/wheels/*.whl" >/dev/null; then
        echo "gpu_check.sh: $PY has no omegaconf and launch/wheels/ holds no wheel; run bash launch/gpu_wheels.sh" \
            "here first and carry launch/wheels to the GPU machine" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/pkgs" \
        "$ROOT"/launch/wheels/*.whl
fi
ln -sfn "$ROOT/kernels" "$SITE/links/scldm_kernels"
export PYTHONPATH="$ROOT:$SITE/links:$SITE/pkgs${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT_DIR="${OUT:-$ROOT/gpu_check_out}"
echo "gpu_check.sh: $("$PY" --version 2>&1) at $(command -v "$PY"), output in $OUT_DIR" >&2
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >&2 || true; fi
exec "$PY" -m scldm_scale bench gpu --out "$OUT_DIR" "$@"
