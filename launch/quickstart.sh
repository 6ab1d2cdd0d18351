#!/usr/bin/env bash
# Train the small scLDM on the built-in PBMC data, or on your own raw counts (both stages), generate cells,
# write a report. Works from any directory; the first run builds .venv in the repository root (~1-2 min).
#   bash launch/quickstart.sh --out quickstart_out
#   bash launch/quickstart.sh --out /tmp/qs optim.vae.max_steps=10 optim.ldm.max_steps=10   # smoke run
#   bash launch/quickstart.sh --data cells.h5ad --labels cell_type,donor --out my_run      # your cells
#   bash launch/quickstart.sh --data cells.h5ad --out my_run            # no labels: an unconditional prior
# With --data the run is sized to the data and the machine and prints what it chose (--minutes of training,
# default 8). Arguments go to `scldm-scale quickstart` unchanged: --out DIR, --data, --labels, --minutes, then
# dot-list overrides of configs/quickstart.yaml (they win over the sizing).
# Threads: the run uses the CPU cores that other processes leave free when it starts and logs the count
# ("scldm_scale.threads: N threads per process (...)"); SCLDM_THREADS=N bash launch/quickstart.sh ... sets it.
set -euo pipefail
# shellcheck source=launch/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
ensure_venv
exec "$VENV/bin/scldm-scale" quickstart "$@"
