#!/usr/bin/env bash
# Train the small scLDM on the built-in PBMC data (both stages), generate cells, write a report.
# Works from any directory; the first run builds .venv in the repository root (~1-2 min), later runs reuse it.
#   bash launch/quickstart.sh --out quickstart_out
#   bash launch/quickstart.sh --out /tmp/qs optim.vae.max_steps=10 optim.ldm.max_steps=10   # smoke run
# Arguments go to `scldm-scale quickstart` unchanged: --out DIR, then dot-list overrides of configs/quickstart.yaml.
set -euo pipefail
# shellcheck source=launch/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv
exec "$VENV/bin/scldm-scale" quickstart "$@"
