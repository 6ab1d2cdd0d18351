#!/usr/bin/env bash
# `scldm-scale train` under torchrun, on one node or several (c10d rendezvous). Options come first, then an
# optional `--`, then the arguments of `scldm-scale train` unchanged (config first; paths relative to the
# current directory, as with the plain CLI).
#
#   CPU, one process:
#     bash launch/torchrun.sh --nproc-per-node 1 -- configs/quickstart.yaml stage=vae
#   one node, one process per GPU:
#     bash launch/torchrun.sh --nproc-per-node 8 -- configs/quickstart.yaml stage=vae data.uri=cells.soma \
#       train.strategy=fsdp
#   two nodes: the same line on each, --node-rank 0 on node0 (the endpoint host) and 1 on node1:
#     bash launch/torchrun.sh --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-endpoint node0:29500 \
#       --rdzv-id run42 -- configs/quickstart.yaml stage=vae data.uri=/shared/cells.soma train.strategy=fsdp
#
# Options (torchrun's underscore spellings, e.g. --nproc_per_node=8, work too):
#   --nproc-per-node N        processes on this node; default: the GPUs in CUDA_VISIBLE_DEVICES, else the GPUs
#                             nvidia-smi lists, else 1
#   --nnodes N                nodes in the job (default 1, run as torchrun --standalone)
#   --rdzv-endpoint HOST[:P]  where the c10d rendezvous store listens (port default 29500); needed with --nnodes > 1
#   --rdzv-id ID              the same on every node of one job (default $SLURM_JOB_ID, else scldm)
#   --node-rank R             optional; c10d numbers the nodes itself, so R only says which node hosts the store:
#                             0 does (run it on the endpoint host), others connect. Without it, the node whose
#                             hostname or address matches the endpoint hosts it
#   --shutdown-timeout S      seconds the workers get after a SIGTERM/SIGINT to finish their step and write the
#                             checkpoint before torchrun SIGKILLs them (default 120; torchrun's own is 30)
#   --dry-run                 print the command instead of running it (nothing is built or checked)
#   -h, --help                this text
#
# Python: the repository's .venv, built on first use on a single node. For several nodes build it once
# beforehand (`bash launch/_venv.sh`) on the shared filesystem; the script refuses a missing or stale one
# rather than let every node pip-install into it at once. SCLDM_PYTHON=/path/to/python uses that interpreter
# as it is instead (a conda environment, the Docker image); it must import scldm_scale. (PYTHON is not read
# here: launch/_venv.sh takes it as the interpreter that creates .venv.)
#
# Preemption: torchrun forwards SIGTERM/SIGINT to its workers; each finishes its step, writes a checkpoint and
# exits 128+signal (143 for SIGTERM). torchrun itself then exits 1 after a "got signal" traceback, which is
# expected. Resume with the same command plus train.resume=auto.
set -euo pipefail

LAUNCHER=torchrun.sh
# shellcheck source=launch/_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

gpu_count() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        case "$CUDA_VISIBLE_DEVICES" in
            "" | -1 | NoDevFiles) echo 0 ;;
            *)
                local ids
                IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
                echo "${#ids[@]}"
                ;;
        esac
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

launch_parse "${BASH_SOURCE[0]}" "nproc-per-node nnodes node-rank rdzv-endpoint rdzv-id shutdown-timeout" "$@"
set -- "${LAUNCH_REST[@]}"
dry_run=$LAUNCH_DRY_RUN
nproc_per_node=${LAUNCH_OPTS[nproc-per-node]:-}
nnodes=${LAUNCH_OPTS[nnodes]:-1}
node_rank=${LAUNCH_OPTS[node-rank]:-}
rdzv_endpoint=${LAUNCH_OPTS[rdzv-endpoint]:-}
rdzv_id=${LAUNCH_OPTS[rdzv-id]:-${SLURM_JOB_ID:-scldm}}
shutdown_timeout=${LAUNCH_OPTS[shutdown-timeout]:-120}
for option in nproc-per-node nnodes node-rank shutdown-timeout; do
    [[ -z ${LAUNCH_OPTS[$option]:-} ]] || launch_whole_number "--$option" "${LAUNCH_OPTS[$option]}"
done

if [[ -z $nproc_per_node ]]; then
    nproc_per_node=$(gpu_count)
    ((nproc_per_node > 0)) || nproc_per_node=1
fi
((nproc_per_node >= 1)) || launch_die "--nproc-per-node must be at least 1"
((nnodes >= 1)) || launch_die "--nnodes must be at least 1"

if ((nnodes > 1)); then
    [[ -n $rdzv_endpoint ]] || launch_die "--nnodes $nnodes needs --rdzv-endpoint HOST[:PORT], the same on every node" \
        "(e.g. the first node's hostname and a free port: --rdzv-endpoint node0:29500)"
    if [[ $rdzv_endpoint =~ ^(.+):([0-9]+)$ ]]; then
        host=${BASH_REMATCH[1]} port=${BASH_REMATCH[2]}
    else
        host=$rdzv_endpoint port=29500
    fi
    [[ -n $host && $host != *:* || $host == \[*\] ]] ||
        launch_die "--rdzv-endpoint '$rdzv_endpoint' is not HOST[:PORT] (write an IPv6 address as [ADDR]:PORT)"
    ((port >= 1 && port <= 65535)) || launch_die "--rdzv-endpoint port $port is not between 1 and 65535"
    rendezvous=(--nnodes="$nnodes" --rdzv-backend=c10d --rdzv-endpoint="$host:$port" --rdzv-id="$rdzv_id")
    if [[ -n $node_rank ]]; then
        ((node_rank < nnodes)) || launch_die "--node-rank $node_rank is outside 0..$((nnodes - 1)) for --nnodes $nnodes"
        if ((node_rank == 0)); then
            rendezvous+=(--rdzv-conf=is_host=true)
        else
            rendezvous+=(--rdzv-conf=is_host=false)
        fi
    fi
else
    [[ -z $node_rank && -z $rdzv_endpoint ]] ||
        launch_die "--node-rank and --rdzv-endpoint are for --nnodes > 1; one node runs torchrun --standalone"
    rendezvous=(--standalone)
fi

launch_python "$dry_run" "$((nnodes > 1))"
command=("$LAUNCH_PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc-per-node="$nproc_per_node"
    --shutdown-timeout="$shutdown_timeout" -m scldm_scale train "$@")
if ((dry_run)); then
    launch_print "${command[@]}"
    exit 0
fi
exec "${command[@]}"
