#!/usr/bin/env bash
# `scldm-scale train` with train.strategy=deepspeed under the DeepSpeed launcher, which starts the workers of
# every host in a hostfile over ssh (pdsh) from this one command: run it on the first host. Options come
# first, then an optional `--`, then the arguments of `scldm-scale train` (config first).
#
#   one node, 8 GPUs (no hostfile: this machine only):
#     bash launch/deepspeed.sh --num-gpus 8 -- configs/quickstart.yaml stage=vae data.uri=cells.soma \
#       train.zero_stage=3
#   two nodes from a hostfile (one line per host: HOSTNAME slots=GPUS):
#     printf 'node0 slots=8\nnode1 slots=8\n' > hostfile
#     bash launch/deepspeed.sh --hostfile hostfile --num-nodes 2 --num-gpus 8 --master-addr node0 -- \
#       configs/quickstart.yaml stage=vae data.uri=/shared/cells.soma train.zero_stage=3 train.offload_optimizer=true
#
# Options (underscore spellings work too):
#   --hostfile FILE      the hosts and their GPU slots; without it, this machine only
#   --num-nodes N        use the first N hosts of the hostfile (default: all)
#   --num-gpus N         GPUs per host (default: the hostfile's slots, or every GPU of this machine)
#   --master-addr HOST   address of the first host for torch.distributed (default: the launcher asks that host
#                        for `hostname -I` over ssh)
#   --master-port PORT   default 29500
#   --dry-run            print the command instead of running it (nothing is built or checked)
#   -h, --help           this text
#
# The command is `python -m deepspeed.launcher.runner ... --no_local_rank --module scldm_scale train CONFIG...
# train.strategy=deepspeed ARGS...`: the workers read RANK, LOCAL_RANK and WORLD_SIZE from the environment
# the launcher sets, not from a --local_rank argument. train.strategy=deepspeed is added unless ARGS set
# train.strategy; the ZeRO stage and offload are train.zero_stage and train.offload_optimizer.
#
# Needs: passwordless ssh and pdsh from the first host to the others; the repository at the same path and the
# same Python on every host (a shared filesystem); deepspeed in that Python (the `dist` extra:
# .venv/bin/pip install -e '.[dist]'). Python is chosen as in torchrun.sh (SCLDM_PYTHON, else .venv). The
# launcher forwards only variables whose names start with NCCL, PYTHON, UCX, MV2 or MLFLOW to the other
# hosts; put any other (WANDB_MODE=offline, SCLDM_...) one KEY=VALUE per line in ./.deepspeed_env or
# ~/.deepspeed_env. On a SLURM cluster launch/slurm.sbatch (torchrun, no ssh) is the simpler route, with
# train.strategy=deepspeed among its arguments.
#
# Stopping: on SIGTERM or Ctrl-C the launcher has every host's workers sent SIGTERM (pkill over pdsh for the
# other hosts); each worker finishes its step, writes a checkpoint and exits 143, but DeepSpeed 0.19.8 SIGKILLs
# any worker still running 30 s later, a limit it does not let you change. A checkpoint that takes longer is
# lost; periodic ones (train.ckpt_every) and train.resume=auto bound what a stop costs. torchrun's limit can be
# raised (torchrun.sh --shutdown-timeout).
set -euo pipefail

LAUNCHER=deepspeed.sh
# shellcheck source=launch/_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"

launch_parse "${BASH_SOURCE[0]}" "hostfile num-nodes num-gpus master-addr master-port" "$@"
set -- "${LAUNCH_REST[@]}"
for option in num-nodes num-gpus master-port; do
    if [[ -n ${LAUNCH_OPTS[$option]:-} ]]; then
        launch_whole_number "--$option" "${LAUNCH_OPTS[$option]}"
        ((LAUNCH_OPTS[$option] >= 1)) || launch_die "--$option must be at least 1"
    fi
done

runner=()
hostfile=${LAUNCH_OPTS[hostfile]:-}
if [[ -n $hostfile ]]; then
    # The launcher itself would only warn and fall back to this machine's GPUs.
    [[ -f $hostfile && -r $hostfile ]] || launch_die "--hostfile $hostfile is not a readable file"
    grep -qE '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$hostfile" ||
        launch_die "--hostfile $hostfile lists no host; write one line per host: HOSTNAME slots=GPUS"
    runner+=(--hostfile="$hostfile")
fi
[[ -z ${LAUNCH_OPTS[num-nodes]:-} ]] || runner+=(--num_nodes="${LAUNCH_OPTS[num-nodes]}")
[[ -z ${LAUNCH_OPTS[num-gpus]:-} ]] || runner+=(--num_gpus="${LAUNCH_OPTS[num-gpus]}")
[[ -z ${LAUNCH_OPTS[master-addr]:-} ]] || runner+=(--master_addr="${LAUNCH_OPTS[master-addr]}")
runner+=(--master_port="${LAUNCH_OPTS[master-port]:-29500}")

launch_python "$LAUNCH_DRY_RUN" "$([[ -n $hostfile ]] && echo 1 || echo 0)" deepspeed
launch_default_override train.strategy=deepspeed "$@"
command=("$LAUNCH_PYTHON" -m deepspeed.launcher.runner "${runner[@]}" --no_local_rank --module scldm_scale train
    "${LAUNCH_ARGS[@]}")
if ((LAUNCH_DRY_RUN)); then
    launch_print "${command[@]}"
    exit 0
fi
exec "${command[@]}"
