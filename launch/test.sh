#!/usr/bin/env bash
# Run the test suite (pytest settings and the default marker selection live in pyproject.toml).
# Works from any directory; the first run builds .venv in the repository root (~1-2 min), later runs reuse it.
#   bash launch/test.sh                          # default tier: CPU, fast, offline
#   bash launch/test.sh -x tests/models          # arguments go to pytest unchanged
#   bash launch/test.sh -m multiproc             # one tier only (markers in pyproject.toml: multiproc = torchrun/subprocess
#                                                # tests; slow and gpu are reserved, no test carries them yet)
# The exit status is pytest's, except "no tests collected" (5), which is a failure (1) here.
set -euo pipefail
# shellcheck source=launch/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv
cd "$ROOT"
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test.sh: pytest collected no tests (arguments: ${*:-none}); check the paths and -m/-k filters" >&2
    exit 1
fi
exit "$status"
