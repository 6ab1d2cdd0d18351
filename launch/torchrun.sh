#!/usr/bin/env bash
# `scldm-scale train` under torchrun, from the repository's .venv. Arguments go to `train` unchanged, and
# paths in them are relative to the current directory, as with the plain CLI (the examples run from the root).
#
# NOT YET USEFUL FOR MORE THAN ONE PROCESS. Multi-process strategies (DDP, FSDP, ZeRO) land with the
# distributed-engine issue; today the trainer is single-process and knows nothing of ranks, so N processes
# would be N independent copies writing one run directory. This script therefore refuses a world size
# above 1 until then; the commands below are the ones it is meant for.
#
#   CPU / one process (works today):
#     bash launch/torchrun.sh configs/quickstart.yaml stage=vae
#   one node, N GPUs (--standalone --nproc_per_node=N):
#     NPROC_PER_NODE=8 bash launch/torchrun.sh configs/quickstart.yaml stage=vae
#   two nodes (c10d rendezvous; run the same line on every node):
#     NNODES=2 NPROC_PER_NODE=8 MASTER_ADDR=node0.cluster MASTER_PORT=29500 \
#       bash launch/torchrun.sh configs/quickstart.yaml stage=vae
#
# Environment: NPROC_PER_NODE (default 1), NNODES (default 1), MASTER_ADDR and MASTER_PORT (the c10d
# rendezvous endpoint, needed when NNODES > 1; default port 29500), RDZV_ID (job id shared by all nodes,
# default $SLURM_JOB_ID or "scldm"). NODE_RANK is accepted but not needed: c10d assigns node ranks itself.
# On several nodes .venv must already be complete on the shared filesystem (`bash launch/_venv.sh` once),
# so that nodes do not pip-install into it at the same time.
set -euo pipefail
# shellcheck source=launch/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

nproc_per_node="${NPROC_PER_NODE:-1}"
nnodes="${NNODES:-1}"

# Remove when the distributed engine lands.
if (( nproc_per_node * nnodes > 1 )); then
    echo "torchrun.sh: refusing $nnodes node(s) x $nproc_per_node process(es): the trainer is single-process" \
        "until the distributed-engine issue lands; run with NPROC_PER_NODE=1 NNODES=1." >&2
    exit 2
fi

if (( nnodes > 1 )); then
    if ! _venv_is_fresh; then
        echo "torchrun.sh: $VENV is missing or stale; build it once before a multi-node job: bash launch/_venv.sh" >&2
        exit 1
    fi
    : "${MASTER_ADDR:?torchrun.sh: set MASTER_ADDR to the rendezvous host (e.g. the first node) when NNODES > 1}"
    rendezvous=(--nnodes="$nnodes" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
        --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-scldm}}")
else
    ensure_venv
    rendezvous=(--standalone)
fi

exec "$VENV/bin/python" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$nproc_per_node" \
    -m scldm_scale train "$@"
