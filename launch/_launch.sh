#!/usr/bin/env bash
# Shared helpers of the multi-process launchers (torchrun.sh, deepspeed.sh, slurm.sbatch); source it after
# setting LAUNCHER to the script's name, which prefixes every message.
#
# Which Python runs the job: SCLDM_PYTHON=/path/to/python as it is (a conda environment, the Docker image), or
# else the repository's .venv (launch/_venv.sh), built on first use on a single node and required complete
# beforehand on several, so that nodes sharing a filesystem never pip-install into it at the same time.

# shellcheck source=launch/_venv.sh
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"

launch_die() {
    echo "$LAUNCHER: $*" >&2
    exit 2
}

# The comment block at the top of FILE, after the shebang, is the script's usage text.
launch_usage() {
    awk 'NR > 1 && /^#/ && !/^#SBATCH/ { sub(/^# ?/, ""); print; next } NR > 1 && !/^#/ { exit }' "$1"
}

launch_whole_number() {
    [[ $2 =~ ^[0-9]+$ ]] || launch_die "$1 expects a whole number, got '$2'"
}

# launch_parse SCRIPT "NAME ..." ARG ...: the options before the first non-option argument or `--`. Each NAME
# takes a value (--NAME V or --NAME=V; torchrun-style underscores work too) stored in LAUNCH_OPTS[NAME];
# --dry-run sets LAUNCH_DRY_RUN=1; -h/--help prints SCRIPT's usage and exits. LAUNCH_REST gets the rest.
# shellcheck disable=SC2034  # the three are read by the scripts that source this file
declare -A LAUNCH_OPTS=()
LAUNCH_DRY_RUN=0
LAUNCH_REST=()
# shellcheck disable=SC2034
launch_parse() {
    local script=$1 names=" $2 " name value
    shift 2
    while (($#)); do
        case "$1" in
            -h | --help)
                launch_usage "$script"
                exit 0
                ;;
            --dry-run | --dry_run)
                LAUNCH_DRY_RUN=1
                shift
                ;;
            --)
                shift
                break
                ;;
            -*)
                name=${1%%=*}
                name=${name#--}
                name=${name//_/-}
                [[ $names == *" $name "* ]] ||
                    launch_die "unknown option '$1' (see --help); put the arguments of 'scldm-scale train' after --"
                if [[ $1 == *=* ]]; then
                    value=${1#*=}
                    shift
                else
                    (($# >= 2)) || launch_die "$1 needs a value"
                    value=$2
                    shift 2
                fi
                LAUNCH_OPTS[$name]=$value
                ;;
            *) break ;;
        esac
    done
    LAUNCH_REST=("$@")
    ((${#LAUNCH_REST[@]})) || launch_die "no arguments for 'scldm-scale train'; give at least the config, e.g." \
        "bash launch/$LAUNCHER -- configs/quickstart.yaml stage=vae"
}

# launch_default_override KEY=VALUE ARG ...: LAUNCH_ARGS = the train arguments ARG ... with KEY=VALUE placed
# after the leading config files, or unchanged when one of them sets KEY already: the user's choice stands.
launch_default_override() {
    local override=$1 arg i=0
    shift
    LAUNCH_ARGS=("$@")
    for arg in "$@"; do
        [[ $arg != "${override%%=*}="* ]] || return 0
    done
    while ((i < ${#LAUNCH_ARGS[@]})) && [[ ${LAUNCH_ARGS[i]} =~ \.ya?ml$ && ${LAUNCH_ARGS[i]} != *=* ]]; do
        i=$((i + 1))
    done
    LAUNCH_ARGS=("${LAUNCH_ARGS[@]:0:i}" "$override" "${LAUNCH_ARGS[@]:i}")
}

# The command, quoted so that it can be pasted back into a shell.
launch_print() {
    printf '%q' "$1"
    shift
    printf ' %q' "$@"
    echo
}

# launch_python DRY_RUN MULTI_NODE [MODULE ...]: set LAUNCH_PYTHON and check that it imports scldm_scale and
# each MODULE (nothing is checked or built for a dry run).
launch_python() {
    local dry_run=$1 multi_node=$2 module
    shift 2
    if [[ -n ${SCLDM_PYTHON:-} ]]; then
        LAUNCH_PYTHON=$SCLDM_PYTHON
        ((dry_run)) && return 0
        command -v "$LAUNCH_PYTHON" >/dev/null || launch_die "SCLDM_PYTHON=$LAUNCH_PYTHON is not an executable"
    else
        LAUNCH_PYTHON=$VENV_PY
        ((dry_run)) && return 0
        if ((multi_node)); then
            _venv_is_fresh || launch_die "$VENV is missing or stale; build it once before a multi-node job:" \
                "bash launch/_venv.sh (or point SCLDM_PYTHON at an interpreter that has scldm-scale)"
        else
            ensure_venv
        fi
    fi
    for module in scldm_scale "$@"; do
        "$LAUNCH_PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' \
            "$module" || launch_die "$LAUNCH_PYTHON cannot import $module; install it there" \
            "(for the project's extras: $LAUNCH_PYTHON -m pip install -e '${ROOT}[dist]')"
    done
}
