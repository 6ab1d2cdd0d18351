#!/usr/bin/env bash
# Run the test suite (pytest settings and the default marker selection live in pyproject.toml).
# Works from any directory; the first run builds .venv in the repository root (~1-2 min), later runs reuse it.
#   bash launch/test.sh                          # default tier: CPU, fast, offline
#   bash launch/test.sh -x tests/models          # arguments go to pytest unchanged
#   bash launch/test.sh -m multiproc             # one tier only (markers in pyproject.toml: multiproc = torchrun/subprocess
#                                                # tests; slow and gpu are reserved, no test carries them yet)
#   SCLDM_TEST_WORKERS=0 bash launch/test.sh     # in one process (also chosen for --pdb, --trace, -s); default: one
#                                                # pytest-xdist worker per core, at most 4 (every test uses one torch
#                                                # thread), whole files per worker
# The exit status is pytest's, except "no tests collected" (5), which is a failure (1) here.
set -euo pipefail
# shellcheck source=launch/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv
cd "$ROOT"
status=0
cores=$(nproc)
workers=${SCLDM_TEST_WORKERS:-$((cores < 4 ? cores : 4))}
[[ $workers =~ ^[0-9]+$ ]] || { echo "test.sh: SCLDM_TEST_WORKERS must be a whole number, not '$workers'" >&2; exit 2; }
(( workers > 1 )) || workers=0
for arg in "$@"; do  # a debugger or uncaptured output needs the tests in this process
    case $arg in --pdb | --trace | -s | --capture=no) workers=0 ;; esac
done
.venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test.sh: pytest collected no tests (arguments: ${*:-none}); check the paths and -m/-k filters" >&2
    exit 1
fi
exit "$status"
