"""The launch scripts: syntax, usage, and the exact commands they build (checked against torchrun's own parser).

Everything runs the scripts' dry-run modes, or slurm.sbatch with stub srun/scancel/scontrol on PATH, so no
process group is started and nothing is installed; the whole file takes about a second after torch is imported.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TRAIN_ARGS = ["configs/quickstart.yaml", "stage=vae", "data.uri=/data/cells.soma", "data.condition_keys=[cell type]"]


def run(script: str, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SCLDM_", "CUDA_VISIBLE"))}
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args], env=full_env, capture_output=True, text=True, timeout=30, **kwargs
    )


def dry_run(script: str, *args: str, env: dict | None = None) -> list[str]:
    result = run(script, *args, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return shlex.split(lines[0])


def torchrun_args(command: list[str]):
    """Parse a torchrun.sh command line with torch's own torchrun parser."""
    assert command[1:3] == ["-m", "torch.distributed.run"], command
    return get_args_parser().parse_args(command[3:])


def test_every_launch_script_parses():
    scripts = sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
    assert {"torchrun.sh", "slurm.sbatch", "deepspeed.sh", "_launch.sh", "_venv.sh"} <= set(scripts)
    for name in scripts:
        result = subprocess.run(["bash", "-n", str(LAUNCH / name)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"


@pytest.mark.parametrize("script", ["torchrun.sh", "deepspeed.sh"])
def test_help_prints_the_header_and_exits_zero(script):
    result = run(script, "-h")
    assert result.returncode == 0
    assert result.stdout.startswith("`scldm-scale train`")
    assert "--dry-run" in result.stdout and "set -euo" not in result.stdout
    assert result.stdout == run(script, "--help").stdout


def test_torchrun_single_node_uses_one_process_per_visible_gpu():
    command = dry_run("torchrun.sh", "--dry-run", "--", *TRAIN_ARGS, env={"CUDA_VISIBLE_DEVICES": "0,1,3"})
    assert command[0] == str(ROOT / ".venv/bin/python")
    args = torchrun_args(command)
    assert args.standalone and args.nnodes == "1:1"
    assert args.nproc_per_node == "3"
    assert args.shutdown_timeout == 120
    assert args.module and args.training_script == "scldm_scale"
    assert args.training_script_args == ["train", *TRAIN_ARGS]  # passed through, spaces and brackets intact


def test_torchrun_process_count_flag_python_override_and_cpu_default():
    command = dry_run(
        "torchrun.sh", "--nproc_per_node=4", "--dry-run", *TRAIN_ARGS[:2], env={"SCLDM_PYTHON": "/opt/py/bin/python"}
    )
    assert command[0] == "/opt/py/bin/python"
    assert torchrun_args(command).nproc_per_node == "4"
    # No GPU visible (and no nvidia-smi consulted): one CPU process.
    command = dry_run("torchrun.sh", "--dry-run", *TRAIN_ARGS[:2], env={"CUDA_VISIBLE_DEVICES": ""})
    assert torchrun_args(command).nproc_per_node == "1"


@pytest.mark.parametrize("node_rank, is_host", [("0", "true"), ("1", "false")])
def test_torchrun_multi_node_rendezvous(node_rank, is_host):
    command = dry_run(
        "torchrun.sh",
        *("--nnodes", "2", "--node-rank", node_rank, "--nproc-per-node", "8"),
        *("--rdzv-endpoint", "node0.cluster:29400", "--rdzv-id", "job7", "--dry-run", "--"),
        *TRAIN_ARGS,
    )
    args = torchrun_args(command)
    assert not args.standalone
    assert (args.nnodes, args.nproc_per_node) == ("2", "8")
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("c10d", "node0.cluster:29400", "job7")
    # c10d numbers the nodes itself; the node rank only decides which node hosts the rendezvous store.
    assert args.rdzv_conf == f"is_host={is_host}"
    assert args.training_script == "scldm_scale" and args.training_script_args == ["train", *TRAIN_ARGS]


def test_torchrun_multi_node_defaults():
    command = dry_run(
        "torchrun.sh", "--nnodes=2", "--rdzv-endpoint=node0", "--dry-run", *TRAIN_ARGS[:1], env={"SLURM_JOB_ID": "99"}
    )
    args = torchrun_args(command)
    assert (args.rdzv_endpoint, args.rdzv_id, args.rdzv_conf) == ("node0:29500", "99", "")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nnodes", "2", "cfg.yaml"], "--rdzv-endpoint"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1", "cfg.yaml"], "outside 0..1"),
        (["--node-rank", "0", "cfg.yaml"], "--nnodes > 1"),
        (["--nnodes", "two", "cfg.yaml"], "whole number"),
        (["--nnodes", "2", "--rdzv-endpoint", "h:99999", "cfg.yaml"], "between 1 and 65535"),
        (["--nproc-per-node"], "needs a value"),
        (["--gpus", "8", "cfg.yaml"], "unknown option '--gpus'"),
        (["--dry-run"], "give at least the config"),
    ],
)
def test_torchrun_refuses_bad_options(args, message):
    result = run("torchrun.sh", *args)
    assert result.returncode == 2
    assert result.stderr.startswith("torchrun.sh: ") and message in result.stderr
    assert result.stdout == ""


SLURM_ENV = {
    "DRY_RUN": "1",
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NODELIST": "gpu[001-002]",
    "SLURM_GPUS_ON_NODE": "4",
    "SLURM_CPUS_PER_TASK": "16",
}


@pytest.fixture
def slurm_stubs(tmp_path):
    """srun, scancel and scontrol stubs that log their arguments; srun waits until scancel has been called."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stubs = {
        "scontrol": f"""echo "scontrol $*" >> {log}
[ "$1 $2 $3" = "show hostnames gpu[001-002]" ] && printf 'gpu001\\ngpu002\\n'
exit 0""",
        "scancel": f"""echo "scancel $*" >> {log}; touch {tmp_path}/cancelled""",
        "srun": f"""echo "srun $*" >> {log}
trap 'echo "srun got TERM" >> {log}' TERM
touch {tmp_path}/started
for _ in $(seq "${{SRUN_LOOPS:-400}}"); do [ -e {tmp_path}/cancelled ] && exit 143; sleep 0.05; done
exit "${{SRUN_STATUS:-0}}\"""",
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, log, tmp_path


def test_slurm_builds_one_torchrun_per_node_from_the_slurm_environment(slurm_stubs):
    path_env, log, _ = slurm_stubs
    command = dry_run("slurm.sbatch", *TRAIN_ARGS, env={**SLURM_ENV, **path_env})
    assert "scontrol show hostnames gpu[001-002]" in log.read_text()
    split = command.index(str(LAUNCH / "torchrun.sh"))
    assert command[: split - 1] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16"]
    assert command[split - 1] == "bash"
    port = 29500 + 4242 % 10000
    expected = [
        "--nnodes=2",
        f"--rdzv-endpoint=gpu001:{port}",
        "--rdzv-id=4242",
        "--shutdown-timeout=150",
        "--nproc-per-node=4",
        "--",
        TRAIN_ARGS[0],
        "train.resume=auto",  # after the config files, so that the user's own overrides come later and win
        *TRAIN_ARGS[1:],
    ]
    assert command[split + 1 :] == expected
    # What each node then runs: torchrun.sh's own dry run of that line.
    node_command = dry_run("torchrun.sh", "--dry-run", *command[split + 1 :], env={"SLURM_JOB_ID": "4242"})
    args = torchrun_args(node_command)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "4", "c10d")
    assert (args.rdzv_endpoint, args.rdzv_id, args.shutdown_timeout) == (f"gpu001:{port}", "4242", 150)
    assert args.training_script_args == ["train", TRAIN_ARGS[0], "train.resume=auto", *TRAIN_ARGS[1:]]


def test_slurm_keeps_the_users_resume_and_places_the_default_after_every_config(slurm_stubs):
    path_env, _, _ = slurm_stubs
    env = {**SLURM_ENV, **path_env}
    command = dry_run("slurm.sbatch", "configs/quickstart.yaml", "train.resume=never", env=env)
    assert command[-2:] == ["configs/quickstart.yaml", "train.resume=never"]
    assert "train.resume=auto" not in command
    command = dry_run("slurm.sbatch", "configs/quickstart.yaml", "configs/model/vae_base.yaml", "stage=vae", env=env)
    assert command[-4:] == ["configs/quickstart.yaml", "configs/model/vae_base.yaml", "train.resume=auto", "stage=vae"]


@pytest.mark.skipif(shutil.which("scontrol") is not None, reason="a real scontrol is on PATH")
def test_slurm_without_scontrol_reads_only_a_plain_node_list():
    env = {**SLURM_ENV, "SLURM_JOB_NODELIST": "n7,n8", "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "a100:2"}
    command = dry_run("slurm.sbatch", *TRAIN_ARGS[:1], env=env)
    assert "--rdzv-endpoint=n7:33742" in command and "--nproc-per-node=2" in command
    result = run("slurm.sbatch", *TRAIN_ARGS[:1], env=SLURM_ENV)
    assert result.returncode == 2 and "cannot expand the node list 'gpu[001-002]' without scontrol" in result.stderr
    result = run("slurm.sbatch", *TRAIN_ARGS[:1], env={"DRY_RUN": "1"})
    assert result.returncode == 2 and "not inside a SLURM job" in result.stderr


def test_slurm_forwards_sigterm_to_the_step_not_to_srun_then_requeues(slurm_stubs):
    path_env, log, tmp_path = slurm_stubs
    env = {**SLURM_ENV, **path_env, "DRY_RUN": "0", "SCLDM_PYTHON": sys.executable}
    env = {k: v for k, v in {**os.environ, **env}.items() if not k.startswith("CUDA_VISIBLE")}
    batch = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm.sbatch"), *TRAIN_ARGS], env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 20
    while not (tmp_path / "started").exists():
        assert batch.poll() is None and time.monotonic() < deadline, batch.stderr.read() if batch.stderr else ""
        time.sleep(0.02)
    batch.send_signal(signal.SIGTERM)  # what --signal=B:TERM@180 does before the time limit
    _, stderr = batch.communicate(timeout=20)
    calls = log.read_text().splitlines()
    assert "scancel --signal=TERM 4242" in calls
    assert "srun got TERM" not in calls  # srun would turn it into SIGKILL of every rank
    assert "scontrol requeue 4242" in calls
    assert batch.returncode == 143, stderr  # the step's status
    assert "requeueing job 4242" in stderr


def test_slurm_does_not_requeue_a_job_that_was_not_signalled(slurm_stubs):
    path_env, log, _ = slurm_stubs
    env = {**SLURM_ENV, **path_env, "DRY_RUN": "0", "SCLDM_PYTHON": sys.executable}
    env.update(SRUN_STATUS="1", SRUN_LOOPS="1")
    # The stub srun gives up waiting for a scancel that never comes and fails like a crashed step.
    result = run("slurm.sbatch", *TRAIN_ARGS[:1], env=env)
    assert result.returncode == 1
    assert not any(line.startswith(("scancel", "scontrol requeue")) for line in log.read_text().splitlines())


def test_deepspeed_launcher_command(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode0 slots=8\nnode1 slots=8\n")
    command = dry_run(
        "deepspeed.sh",
        *("--hostfile", str(hostfile), "--num-nodes", "2", "--num_gpus=8", "--master-addr", "node0", "--dry-run"),
        *TRAIN_ARGS,
    )
    assert command[1:3] == ["-m", "deepspeed.launcher.runner"]
    launcher = command[3 : command.index("--module")]
    assert launcher == [
        f"--hostfile={hostfile}",
        "--num_nodes=2",
        "--num_gpus=8",
        "--master_addr=node0",
        "--master_port=29500",
        "--no_local_rank",
    ]
    rest = command[command.index("--module") + 1 :]
    assert rest == ["scldm_scale", "train", TRAIN_ARGS[0], "train.strategy=deepspeed", *TRAIN_ARGS[1:]]
    try:
        from deepspeed.launcher.runner import parse_args
    except ImportError:
        return  # the `dist` extra is not installed; the flags above were checked against deepspeed 0.19.8's runner
    args = parse_args(command[3:])
    assert args.module and args.no_local_rank and (args.num_nodes, args.num_gpus) == (2, 8)
    assert args.user_script == "scldm_scale" and args.user_args[0] == "train"


def test_deepspeed_keeps_the_users_strategy_and_refuses_a_bad_hostfile(tmp_path):
    command = dry_run("deepspeed.sh", "--dry-run", "c.yaml", "train.strategy=fsdp")
    assert command[-2:] == ["c.yaml", "train.strategy=fsdp"] and "--hostfile" not in " ".join(command)
    result = run("deepspeed.sh", "--hostfile", str(tmp_path / "missing"), "c.yaml")
    assert result.returncode == 2 and "is not a readable file" in result.stderr
    (tmp_path / "empty").write_text("# no hosts yet\n")
    result = run("deepspeed.sh", "--hostfile", str(tmp_path / "empty"), "c.yaml")
    assert result.returncode == 2 and "HOSTNAME slots=GPUS" in result.stderr


def test_venv_without_pip_from_an_interrupted_creation_is_created_again(tmp_path):
    """A .venv with an interpreter but no pip (Ctrl-C during `python -m venv`) is rebuilt, not reused: its bin/ is
    removed and PYTHON is asked to create it again (a stub here that records the call and fails)."""
    (tmp_path / "launch").mkdir()
    shutil.copy(LAUNCH / "_venv.sh", tmp_path / "launch")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    broken = tmp_path / ".venv" / "bin"
    broken.mkdir(parents=True)
    (broken / "python").write_text("#!/bin/sh\necho 'No module named pip' >&2\nexit 1\n")
    (broken / "python").chmod(0o755)
    calls = tmp_path / "calls"
    stub = tmp_path / "python3.11"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n[ "$1" = -c ] && exit 0\nexit 1\n')
    stub.chmod(0o755)
    script = f"source {tmp_path}/launch/_venv.sh && ensure_venv"
    result = subprocess.run(
        ["bash", "-c", script], env={**os.environ, "PYTHON": str(stub)}, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "has no working pip" in result.stderr, result.stderr
    assert not (broken / "python").exists()
    assert f"-m venv {tmp_path}/.venv" in calls.read_text().splitlines()
    assert not (tmp_path / ".venv" / ".scldm-install-stamp").exists()  # whatever the caller's `set -e`
