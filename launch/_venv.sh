#!/usr/bin/env bash
# Shared virtual-environment logic for the launch scripts; source it, then call ensure_venv.
#   source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh" && ensure_venv
#   bash launch/_venv.sh          # build or refresh .venv on its own (e.g. once, before a multi-node job)
#
# .venv lives in the repository root. The install is redone only when it is missing or stale: the stamp
# .venv/.scldm-install-stamp holds the sha256 of pyproject.toml from the last successful install, and
# `import scldm_scale` must resolve to this checkout. A complete .venv costs well under a second to check.
# PYTHON picks the interpreter that creates .venv (default python3; the project needs 3.11).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
VENV_PY="$VENV/bin/python"
VENV_STAMP="$VENV/.scldm-install-stamp"

_venv_log() { echo "[launch] $*" >&2; }

_pyproject_hash() { sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1; }

# -I keeps the current directory off sys.path, so a checkout in the cwd cannot pass for an install; the
# path check catches a .venv copied from another checkout, whose editable install points elsewhere.
_venv_is_fresh() {
    [[ -x "$VENV_PY" && -x "$VENV/bin/scldm-scale" && -f "$VENV_STAMP" ]] || return 1
    [[ "$(cat "$VENV_STAMP")" == "$(_pyproject_hash)" ]] || return 1
    "$VENV_PY" -I -c 'import sys, scldm_scale; sys.exit(not scldm_scale.__file__.startswith(sys.argv[1] + "/"))' \
        "$ROOT" 2>/dev/null
}

ensure_venv() {
    if _venv_is_fresh; then
        return 0
    fi
    # Two launches at once (two shells, or the ranks of a node) must not install over each other: the
    # first takes the lock and installs, the others wait for it and then find .venv fresh.
    mkdir -p "$VENV"
    local lock_fd
    exec {lock_fd}>"$VENV/.install.lock"
    flock "$lock_fd"
    if _venv_is_fresh; then
        exec {lock_fd}>&-
        return 0
    fi
    # A .venv whose creation was interrupted (Ctrl-C during `python -m venv`) has an interpreter but no pip:
    # it is created again rather than failing every later install.
    if [[ -x "$VENV_PY" ]] && ! "$VENV_PY" -m pip --version >/dev/null 2>&1; then
        _venv_log "$VENV has no working pip (an interrupted creation?); creating it again"
        rm -rf "${VENV:?}/bin" "$VENV/lib" "$VENV/lib64" "$VENV/include" "$VENV/pyvenv.cfg"
    fi
    if [[ ! -x "$VENV_PY" ]]; then
        local python="${PYTHON:-python3}"
        if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            _venv_log "error: scldm-scale needs Python 3.11, but '$python' is $("$python" --version 2>&1)." \
                "Point PYTHON at a 3.11 interpreter, e.g. PYTHON=python3.11 bash $0"
            return 1
        fi
        _venv_log "creating $VENV with $("$python" --version 2>&1)"
        "$python" -m venv "$VENV" || { _venv_log "error: '$python -m venv $VENV' failed"; exec {lock_fd}>&-; return 1; }
    fi
    _venv_log "installing scldm-scale[test,dist,logging] into $VENV (first run or pyproject.toml changed; ~1-2 min)"
    rm -f "$VENV_STAMP"
    "$VENV_PY" -m pip install -q --upgrade pip \
        || _venv_log "warning: could not upgrade pip; continuing with $("$VENV_PY" -m pip --version)"
    # Checked here, not left to the caller's `set -e`: a failed install must never get a stamp.
    if ! "$VENV_PY" -m pip install -e "${ROOT}[test,dist,logging]"; then
        _venv_log "error: installing scldm-scale into $VENV failed (pip's message above); rerun to retry"
        exec {lock_fd}>&-
        return 1
    fi
    # umap-learn caches its compiled numba functions next to its sources; filling that cache now (~20 s)
    # spares the first report's UMAP the compile. A failure here costs only that time later.
    _venv_log "compiling umap-learn's numba cache for the reports' UMAP (~20 s)"
    "$VENV_PY" -c 'import numpy as np; from scldm_scale.evaluate.plots import umap_embedding
x = np.random.default_rng(0).normal(size=(40, 5))
for dtype in (np.float32, np.float64): umap_embedding(x.astype(dtype), seed=0)' \
        || _venv_log "warning: could not fill umap's numba cache; the first report will compile it instead"
    _pyproject_hash >"$VENV_STAMP"
    _venv_log "installed; stamp written to $VENV_STAMP"
    exec {lock_fd}>&-
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    ensure_venv
fi
