"""Distributed training with 2 gloo processes on the CPU, each run a real `torchrun ... -m scldm_scale train`.

One loss curve for single, DDP, FSDP and ZeRO 1/2/3; exact resume after SIGKILL (between and during a save)
and after SIGTERM to torchrun; an FSDP checkpoint resumed on 1 process and under DDP; export -> generate;
two nodes on localhost; W&B offline; bad checkpoints refused with exit 2; a failing rank stops the job; the
1B preset built under FSDP without any rank holding the full weights. One-process strategy=single runs call
the CLI in this process. Runs several tests read are module fixtures.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from scldm_test_helpers import NO_TOKEN_DROPOUT, synthetic_vae_args

from scldm_scale import artifact
from scldm_scale.cli import main
from scldm_scale.config import CONFIG_DIR, REPO_ROOT
from scldm_scale.train.checkpoint import COMPLETE, RunCheckpoints

pytestmark = [
    pytest.mark.multiproc,
    # DCP in one process (strategy=single, export) is intended; strategies.py silences this outside pytest.
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

STEPS = 12
CKPT_EVERY = 2
BATCH = 32  # per rank; one process takes 2 x BATCH, so both see the same global batches
METRICS = "metrics.jsonl"
QUICKSTART = str(CONFIG_DIR / "quickstart.yaml")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Across strategies and rank counts only the order of fp32 sums differs (one batch of 64 vs two of 32
# averaged by an all-reduce, shards reduced by reduce-scatter, other padding per rank): at most 1.2e-7
# (loss) and 3e-7 (grad norm) relative over the 12 steps here. Adam can amplify such rounding over longer
# runs; 1e-4 leaves that room and still catches a wrong data slice (the loss moves in the third digit) or
# a gradient averaged wrongly over ranks (the grad norm moves by a factor).
CURVE_RTOL = 1e-4


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return env


def _torchrun(nproc: int = 2, script: Path | None = None) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, str(script)] if script else [*launcher, "-m", "scldm_scale"]


@contextlib.contextmanager
def _started(argv: list[str], log: Path, **env: str):
    """Popen in a new session (torchrun and its workers in one process group); the group is killed if still up."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, env={**_env(), **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# Generous: a first DeepSpeed run on a fresh machine JIT-builds a C++ op, and a loaded 2-core machine can
# take minutes for a few torchrun steps. A hang still ends here, with the log in the failure message.
RUN_TIMEOUT_S = 400


def _run(argv: list[str], log: Path, expect: int = 0, timeout: float = RUN_TIMEOUT_S, **env: str) -> str:
    with _started(argv, log, **env) as proc:
        proc.wait(timeout)
    output = log.read_text()
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}:\n{output[-4000:]}"
    return output


def _kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_for(condition, proc: subprocess.Popen, timeout: float = RUN_TIMEOUT_S, poll_s: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the awaited moment"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll_s)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS).read_text().splitlines()]


def _assert_exact(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in ("step", "loss", "lr", "grad_norm"):
        assert [r[key] for r in got] == [r[key] for r in want], key


def _assert_close(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    for key in ("loss", "grad_norm"):  # grad_norm: the global norm before clipping (it is > train.grad_clip)
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in want], rtol=CURVE_RTOL, err_msg=key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def train_args(tiny_overrides, synthetic_h5ad):
    """`scldm-scale train` arguments of a tiny run into `run` (the VAE stage unless `extra` says stage=ldm)."""

    def args(run: Path, *extra: str) -> list[str]:
        vae = synthetic_vae_args(synthetic_h5ad, run, run / METRICS)
        return ["train", QUICKSTART, *tiny_overrides, *vae, NO_TOKEN_DROPOUT, f"train.max_steps={STEPS}", *extra]

    return args


def _single(train_args, run: Path, *extra: str) -> None:
    """One process, strategy=single, global batch 2 x BATCH, in this process."""
    assert main(train_args(run, f"train.batch_size={2 * BATCH}", *extra)) == 0


@pytest.fixture(scope="module")
def single_ref(train_args, tmp_path_factory) -> list[dict]:
    run = tmp_path_factory.mktemp("single")
    _single(train_args, run)
    return _records(run)


@pytest.fixture(scope="module")
def fsdp_ref(train_args, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank FSDP run, a step folder every CKPT_EVERY steps (all kept)."""
    run = tmp_path_factory.mktemp("fsdp")
    argv = [
        *_torchrun(),
        *train_args(run, "train.strategy=fsdp", f"train.ckpt_every={CKPT_EVERY}", "train.keep_last=99"),
    ]
    _run(argv, run / "log.txt")
    return run


# --- one loss curve ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy",
    [
        ("train.strategy=ddp",),
        ("train.strategy=fsdp",),
        ("train.strategy=deepspeed", "train.zero_stage=1"),
        ("train.strategy=deepspeed", "train.zero_stage=2"),
        ("train.strategy=deepspeed", "train.zero_stage=3"),
    ],
    ids=["ddp", "fsdp", "zero1", "zero2", "zero3"],
)
def test_two_ranks_give_the_single_process_loss_curve(strategy, single_ref, fsdp_ref, train_args, tmp_path):
    if strategy == ("train.strategy=fsdp",):
        run = fsdp_ref  # the shared FSDP run (its checkpoints do not change the losses)
    else:
        run = tmp_path
        _run([*_torchrun(), *train_args(run, *strategy)], tmp_path / "log.txt")
    _assert_close(_records(run), single_ref)


# --- SIGKILL during a save and between saves, then resume -------------------------------------------------


def test_sigkill_during_and_between_saves_then_resume_is_exact(fsdp_ref, train_args, tmp_path):
    run = tmp_path / "run"
    ckpt = run / "vae"
    argv = [*_torchrun(), *train_args(run, "train.strategy=fsdp", f"train.ckpt_every={CKPT_EVERY}")]

    # Killed while step 4 is being saved: a save keeps `.step-4.tmp` for ~0.2-0.5 s here (barriers, DCP
    # files of both ranks, fsync), and this loop looks every 2 ms, so the kill lands inside it.
    with _started(argv, tmp_path / "log1.txt") as proc:
        _wait_for(lambda: (ckpt / ".step-4.tmp").exists(), proc)
        _kill_group(proc)
    assert (ckpt / ".step-4.tmp").exists() and not (ckpt / "step-4").exists(), "the kill missed the save"
    assert RunCheckpoints(ckpt).latest().name == "step-2"

    # Resumed from step 2, killed between saves once step 6 is complete (the log then runs past step 6).
    with _started([*argv, "train.resume=auto"], tmp_path / "log2.txt") as proc:
        _wait_for(lambda: (ckpt / "step-6").exists(), proc)
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert RunCheckpoints(ckpt).latest().name == "step-6"

    _run([*argv, "train.resume=auto"], tmp_path / "log3.txt")
    # Bit-identical: same data order, RNG, optimizer, schedule; the log was rewritten from the checkpoint.
    _assert_exact(_records(run), _records(fsdp_ref))
    final, want = (artifact.load(r / "vae-model").weights for r in (run, fsdp_ref))
    assert all(torch.equal(final[k], want[k]) for k in want)


# --- SIGTERM to torchrun ----------------------------------------------------------------------------------


def test_sigterm_to_torchrun_checkpoints_and_resume_is_exact(fsdp_ref, train_args, tmp_path):
    run = tmp_path / "run"
    argv = [*_torchrun(), *train_args(run, "train.strategy=fsdp")]  # no periodic checkpoints: the stop writes one
    with _started(argv, tmp_path / "log1.txt") as proc:
        _wait_for(lambda: (run / METRICS).exists() and (run / METRICS).read_text().count("\n") >= 2, proc)
        os.kill(proc.pid, signal.SIGTERM)  # torchrun forwards it to its workers
        proc.wait(60)
    output = (tmp_path / "log1.txt").read_text()
    assert proc.returncode == 1  # torchrun's own exit after it forwarded the signal (workers exit 143)
    stopped = RunCheckpoints(run / "vae").latest()
    assert stopped is not None and 2 <= int(stopped.name.split("-")[1]) < STEPS
    assert f"stopped by SIGTERM after step {stopped.name.split('-')[1]}" in output
    assert "Resume with the same command plus train.resume=auto" in output

    _run([*argv, "train.resume=auto"], tmp_path / "log2.txt")
    _assert_exact(_records(run), _records(fsdp_ref))


# --- resharding: an FSDP checkpoint of 2 ranks resumed on 1 process and under DDP -------------------------

RESHARD_STEP = 4


def test_a_two_rank_fsdp_checkpoint_resumes_on_one_process(fsdp_ref, train_args, tmp_path, caplog):
    _single(train_args, tmp_path, f"train.resume={fsdp_ref / 'vae' / f'step-{RESHARD_STEP}'}")
    assert "1 ranks now, 2 in" in caplog.text  # RNG streams restart: no effect on the deterministic VAE
    got, want = _records(tmp_path), _records(fsdp_ref)
    assert got[:RESHARD_STEP] == want[:RESHARD_STEP]  # the history comes from the checkpoint
    _assert_close(got, want)


def test_an_fsdp_checkpoint_resumes_under_ddp(fsdp_ref, train_args, tmp_path):
    resume = f"train.resume={fsdp_ref / 'vae' / f'step-{RESHARD_STEP}'}"
    _run([*_torchrun(), *train_args(tmp_path, "train.strategy=ddp", resume)], tmp_path / "log.txt")
    got, want = _records(tmp_path), _records(fsdp_ref)
    assert got[:RESHARD_STEP] == want[:RESHARD_STEP]
    _assert_close(got, want)


# --- export -> generate -----------------------------------------------------------------------------------

LDM_STEPS = 4


def _ldm(vae_run: Path) -> list[str]:
    return ["stage=ldm", f"train.vae_checkpoint={vae_run / 'vae-model'}", f"train.max_steps={LDM_STEPS}"]


@pytest.fixture(scope="module")
def zero3_ldm(fsdp_ref, train_args, tmp_path_factory) -> Path:
    """A 2-rank DeepSpeed ZeRO-3 prior on the FSDP VAE, with step folders 2 and 4 (the last)."""
    run = tmp_path_factory.mktemp("zero3_ldm")
    zero3 = ("train.strategy=deepspeed", "train.zero_stage=3", f"train.ckpt_every={CKPT_EVERY}")
    _run([*_torchrun(), *train_args(run, *_ldm(fsdp_ref), *zero3)], run / "log.txt")
    return run


def _load(path: Path):
    return artifact.load(path)


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_consolidates_step_folders_and_generate_reads_the_file(fsdp_ref, zero3_ldm, tmp_path):
    # The last step folder of each stage holds the final weights: DCP shards of 2 FSDP ranks, ZeRO-3 partitions.
    assert main(["export", str(fsdp_ref / "vae" / f"step-{STEPS}"), "--out", str(tmp_path / "vae-model")]) == 0
    vae, final_vae = _load(tmp_path / "vae-model"), _load(fsdp_ref / "vae-model")
    assert vae.provenance.steps == STEPS and _same_tensors(vae.weights, final_vae.weights)
    assert vae.provenance.strategy == "fsdp" and vae.training["history"] == final_vae.training["history"]

    ldm_dir = tmp_path / "ldm-model"
    assert main(["export", str(zero3_ldm / "ldm" / f"step-{LDM_STEPS}"), "--out", str(ldm_dir)]) == 0
    ldm, final_ldm = _load(ldm_dir), _load(zero3_ldm / "ldm-model")
    assert ldm.provenance.steps == LDM_STEPS and ldm.prior_weights
    assert _same_tensors(ldm.prior_weights, final_ldm.prior_weights)
    assert _same_tensors(ldm.prior_ema_weights, final_ldm.prior_ema_weights)
    assert _same_tensors(ldm.vae.weights, final_ldm.vae.weights)
    assert torch.equal(ldm.latent_mean, final_ldm.latent_mean)
    # An earlier step exports that step's weights, not the final ones (by default beside the step folders).
    assert main(["export", str(zero3_ldm / "ldm" / "step-2")]) == 0
    assert not _same_tensors(_load(zero3_ldm / "ldm-model-step-2").prior_weights, final_ldm.prior_weights)
    assert not torch.distributed.is_initialized()  # export consolidated in one plain process

    out = tmp_path / "cells.h5ad"
    generate = ["generate", str(ldm_dir), "--n-cells", "7", "--sampler", "euler", "--steps", "4"]
    assert main([*generate, "--out", str(out)]) == 0
    cells = ad.read_h5ad(out)
    assert cells.shape == (7, len(final_ldm.vae.genes))
    assert list(cells.var_names) == final_ldm.vae.genes.ids


def test_a_bf16_zero_vae_exports_its_fp32_masters_with_the_tied_embedding(train_args, tmp_path):
    # Under bf16 the engine holds bf16 weights: the final file must carry the fp32 master weights (what
    # export reads from the ZeRO files), and the decoder's gene embedding, which DeepSpeed's consolidation
    # keeps under the encoder's name only (model.share_gene_embedding), must be there for the loader.
    run = tmp_path / "run"
    run.mkdir()
    zero = ("train.strategy=deepspeed", "train.zero_stage=3", "train.precision=bf16", f"train.ckpt_every={STEPS}")
    _run([*_torchrun(), *train_args(run, *zero)], run / "log.txt")
    assert main(["export", str(run / "vae" / f"step-{STEPS}"), "--out", str(tmp_path / "vae-model")]) == 0
    exported, final = _load(tmp_path / "vae-model").weights, _load(run / "vae-model").weights
    assert "decoder_gene_embedding.weight" in exported
    assert _same_tensors(exported, final)
    assert any((v.float() != v.bfloat16().float()).any() for v in final.values() if v.is_floating_point())


# --- bad checkpoints --------------------------------------------------------------------------------------


def _refused(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"scldm-scale {argv[0]}: error:" in err and message in err, err


def test_corrupt_partial_or_foreign_checkpoints_exit_2(fsdp_ref, train_args, tmp_path, capsys):
    step = fsdp_ref / "vae" / f"step-{STEPS}"

    truncated = tmp_path / "truncated" / "vae" / step.name
    shutil.copytree(step, truncated)
    shard = truncated / "weights" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _refused(train_args(tmp_path / "truncated", "train.resume=auto"), "cannot be loaded into this model", capsys)
    _refused(["export", str(truncated)], "cannot be read", capsys)

    partial = tmp_path / "partial" / step.name
    shutil.copytree(step, partial)
    (partial / COMPLETE).unlink()
    _refused(train_args(tmp_path / "run", f"train.resume={partial}"), "is not a complete checkpoint", capsys)

    other_model = train_args(tmp_path / "run", "model.d_model=32", f"train.resume={step}")
    _refused(other_model, "does not match this run (model: checkpoint", capsys)
    vae_step_for_ldm = train_args(tmp_path / "run", *_ldm(fsdp_ref), f"train.resume={step}")
    _refused(vae_step_for_ldm, "stage: checkpoint 'vae' vs now 'ldm'", capsys)


def test_a_zero_checkpoint_resumes_only_under_deepspeed_on_its_rank_count(zero3_ldm, fsdp_ref, train_args, tmp_path):
    resume = f"train.resume={zero3_ldm / 'ldm' / f'step-{LDM_STEPS}'}"
    argv = train_args(tmp_path / "run", *_ldm(fsdp_ref), resume)

    output = _run([*_torchrun(), *argv, "train.strategy=fsdp"], tmp_path / "fsdp.txt", expect=1)
    # Both ranks print the error and exit 2 (torchrun's summary shows the exit code; torchrun itself exits 1).
    assert "scldm-scale train: [rank 0] error:" in output and "exitcode  : 2" in output
    assert "was written by train.strategy=deepspeed, which train.strategy=fsdp cannot read" in output

    one_rank = [sys.executable, "-m", "scldm_scale", *argv, "train.strategy=deepspeed", "train.zero_stage=3"]
    output = _run(one_rank, tmp_path / "one.txt", expect=2)
    assert "scldm-scale train: error:" in output
    assert "is a DeepSpeed checkpoint of 2 ranks; it resumes on 2 ranks only (now 1)" in output


# --- two nodes on localhost -------------------------------------------------------------------------------


def test_two_nodes_on_localhost_train_the_single_process_curve(single_ref, train_args, tmp_path):
    run = tmp_path / "run"
    args = train_args(run, "train.strategy=ddp", f"train.ckpt_every={STEPS}")[1:]  # torchrun.sh adds `train`
    endpoint = f"127.0.0.1:{_free_port()}"
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes"]
    torchrun_sh = ["bash", str(REPO_ROOT / "launch" / "torchrun.sh"), *rendezvous]
    with contextlib.ExitStack() as stack:
        nodes = [
            stack.enter_context(
                _started(
                    [*torchrun_sh, "--node-rank", str(node), "--", *args],
                    tmp_path / f"node{node}.txt",
                    SCLDM_PYTHON=sys.executable,  # the interpreter running the tests, as it is
                )
            )
            for node in (0, 1)
        ]
        for proc in nodes:
            proc.wait(120)
    for node, proc in enumerate(nodes):
        assert proc.returncode == 0, (tmp_path / f"node{node}.txt").read_text()[-4000:]
    assert (run / "vae" / f"step-{STEPS}" / COMPLETE).exists() and (run / "vae-model").exists()
    _assert_close(_records(run), single_ref)


# --- W&B offline ------------------------------------------------------------------------------------------


def _without_network() -> list[str]:
    """`unshare -rn` (a network namespace with no interfaces up) where user namespaces are allowed."""
    try:
        isolated = subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        isolated = False
    return ["unshare", "-rn"] if isolated else []


def test_wandb_offline_run_is_written_and_resume_keeps_its_id(train_args, tmp_path):
    run = tmp_path / "run"
    argv = [*_without_network(), sys.executable, "-m", "scldm_scale"]
    argv += train_args(run, "logging.wandb.mode=offline", "train.max_steps=4", f"train.ckpt_every={CKPT_EVERY}")
    _run(argv, tmp_path / "log1.txt")
    run_id = (run / "vae" / "wandb_run_id").read_text().strip()
    (first,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
    data = (first / f"run-{run_id}.wandb").read_bytes()
    assert b"d_model" in data  # the resolved config
    assert all(repr(r["loss"]).encode() in data for r in _records(run))  # every logged loss

    _run([*argv, "train.max_steps=6", "train.resume=auto"], tmp_path / "log2.txt")
    assert (run / "vae" / "wandb_run_id").read_text().strip() == run_id
    first_again, second = sorted((run / "wandb").glob("offline-run-*"))  # named by start time, then run id
    assert first_again == first and second.name.endswith(f"-{run_id}")
    data = (second / f"run-{run_id}.wandb").read_bytes()
    assert all(repr(r["loss"]).encode() in data for r in _records(run)[4:])  # steps 5 and 6


# --- an exception on one rank -----------------------------------------------------------------------------

FAILING_RANK = """
import os
import sys

from scldm_scale.cli import main
from scldm_scale.models.vae import SetVAE

forward, calls = SetVAE.forward, []


def forward_failing_on_rank_1(self, batch):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        raise RuntimeError("boom on rank 1")
    return forward(self, batch)


SetVAE.forward = forward_failing_on_rank_1
sys.exit(main(sys.argv[1:]))
"""


def test_an_exception_on_one_rank_stops_every_rank(train_args, tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    argv = [*_torchrun(script=script), *train_args(tmp_path / "run", "train.strategy=ddp")]
    with _started(argv, tmp_path / "log.txt") as proc:
        proc.wait(60)  # no rank hangs in a collective the failed rank never joins
    output = (tmp_path / "log.txt").read_text()
    assert proc.returncode != 0 and "boom on rank 1" in output
    assert [r["step"] for r in _records(tmp_path / "run")] == [1]


END_PROCESS = """
import atexit
import logging
import sys
from pathlib import Path

import torch

from scldm_scale.config import TrainConfig
from scldm_scale.train import distributed

out = Path(sys.argv[1])
distributed.setup(TrainConfig(strategy="ddp", device="cpu"), torch.device("cpu"))  # a group of one
atexit.register(lambda: (out / "finalized").write_text("atexit ran"))
logging.basicConfig(filename=out / "log.txt", level=logging.INFO)
logging.getLogger("check").info("logged")
print("printed", end="")  # stdout is a pipe: block-buffered until flushed
distributed.teardown(True)
distributed.end_process(3)
"""


def test_a_process_that_ran_a_group_ends_flushed_with_its_code_and_without_finalizing(tmp_path):
    """What the CLI does after a run under a process group: nothing said is lost, the exit status is the
    command's, and interpreter finalization (where gloo's threads can abort the process) never starts."""
    script = tmp_path / "end.py"
    script.write_text(END_PROCESS)
    argv = [sys.executable, str(script), str(tmp_path)]
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "printed"
    assert "logged" in (tmp_path / "log.txt").read_text()
    assert not (tmp_path / "finalized").exists()


# --- the 1B preset under FSDP meta-device initialisation --------------------------------------------------

# 100 genes keep the preset above 1e9 parameters (1,007,653,029; the gene embedding is 2048 per gene).
N_GENES_1B = 100

META_BUILD = """
import json
import sys

import torch

from scldm_scale.config import CONFIG_DIR, load_config, stage_optim
from scldm_scale.models.vae import SetVAE
from scldm_scale.train import distributed
from scldm_scale.train.strategies import build_strategy

n_genes, out = int(sys.argv[1]), sys.argv[2]
files = [CONFIG_DIR / "quickstart.yaml", CONFIG_DIR / "model" / "vae_1b.yaml"]
cfg = load_config(files, ["train.strategy=fsdp", "train.init_on_meta=true", "train.device=cpu"])
dist_info = distributed.setup(cfg.train, torch.device("cpu"))
with torch.device("meta"):
    model = SetVAE(cfg.model, n_genes)
strategy = build_strategy(model, stage_optim(cfg, "vae"), cfg.train, dist_info=dist_info, amp_dtype=None, use_ema=False)
shards = [p.to_local() for p in strategy.model.parameters()]
peak_rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
report = {
    "n_params": sum(p.numel() for p in strategy.model.parameters()),
    "local_numel": sum(s.numel() for s in shards),
    "on_meta": any(s.is_meta for s in shards),
    "finite": all(bool(torch.isfinite(s).all()) for s in shards),
    "peak_rss": peak_rss,
}
with open(f"{out}/rank{dist_info.rank}.json", "w") as f:
    json.dump(report, f)
distributed.teardown(True)
distributed.end_process(0)  # as the CLI ends a process that ran a group
"""


def test_the_1b_preset_builds_sharded_without_full_weights_on_any_rank(tmp_path):
    script = tmp_path / "meta_build.py"
    script.write_text(META_BUILD)
    _run([*_torchrun(script=script), str(N_GENES_1B), str(tmp_path)], tmp_path / "log.txt")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    n_params = ranks[0]["n_params"]
    assert n_params > 1e9 and all(r["n_params"] == n_params for r in ranks)
    assert sum(r["local_numel"] for r in ranks) == n_params  # every parameter on exactly one rank
    assert not any(r["on_meta"] for r in ranks) and all(r["finite"] for r in ranks)  # allocated and initialised
    # A rank holding the full fp32 weights would peak above 4 bytes x n_params (4.0 GB); a half shard plus
    # torch and the interpreter is ~0.6 of that here.
    full_bytes = 4 * n_params
    assert all(r["peak_rss"] < 0.75 * full_bytes for r in ranks), [r["peak_rss"] / full_bytes for r in ranks]


# --- the EMA, partitioned like the weights ----------------------------------------------------------------

EMA_PARTITION = """
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

from scldm_scale.config import OptimConfig, TrainConfig
from scldm_scale.train import distributed
from scldm_scale.train.strategies import build_strategy, ema_from_files

out = Path(sys.argv[1])
torch.manual_seed(0)
initial = nn.Sequential(nn.Linear(37, 96), nn.LayerNorm(96), nn.GELU(), nn.Linear(96, 96), nn.Linear(96, 29))
train_cfgs = {
    "fsdp": TrainConfig(strategy="fsdp", device="cpu", batch_size=8, ema_decay=0.9),
    "zero3": TrainConfig(strategy="deepspeed", zero_stage=3, device="cpu", batch_size=8, ema_decay=0.9),
}
dist_info = distributed.setup(train_cfgs["fsdp"], torch.device("cpu"))


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def strategy_for(name):
    model, optim_cfg = copy.deepcopy(initial), OptimConfig(lr=1e-2)
    return build_strategy(model, optim_cfg, train_cfgs[name], dist_info=dist_info, amp_dtype=None, use_ema=True)


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(local(a[k]), local(v)) for k, v in b.items())


report = {}
for name in train_cfgs:
    strategy = strategy_for(name)
    # The reference: an EMA of the whole weights (gathered every step, as before), lerp by lerp.
    weights = strategy.full_state_dict()  # a collective
    reference = {k: v.float().clone() for k, v in weights.items()} if dist_info.is_main else None
    generator = torch.Generator().manual_seed(1 + dist_info.rank)
    for n in range(1, 5):
        x = torch.randn(8, 37, generator=generator)
        strategy.zero_grad()
        with strategy.no_sync(True):
            strategy.backward(strategy.module(x).pow(2).mean())
        strategy.step()
        weights = strategy.full_state_dict()  # a collective
        if dist_info.is_main:
            decay = min(0.9, (1 + n) / (10 + n))
            for k, v in weights.items():
                reference[k].lerp_(v.float(), 1 - decay) if v.is_floating_point() else reference[k].copy_(v)
    full_ema = strategy.full_ema_state_dict()  # a collective
    folder = out / name
    folder.mkdir(exist_ok=True)
    distributed.barrier()
    strategy.save(folder)
    distributed.barrier()
    resumed = strategy_for(name)
    resumed.load(folder)
    row = {
        "ema_bytes": sum(local(v).nbytes for v in strategy.ema.shadow.values()),
        "resumed_equal": same(resumed.ema.shadow, strategy.ema.shadow),
    }
    if dist_info.is_main:
        row["full_bytes"] = sum(v.nbytes for v in reference.values())
        row["equals_reference"] = same(full_ema, reference)
        if name == "zero3":
            row["files_equal"] = same(ema_from_files(folder), full_ema)  # what `scldm-scale export` reads
    report[name] = row
(out / f"rank{dist_info.rank}.json").write_text(json.dumps(report))
distributed.teardown(True)
distributed.end_process(0)  # as the CLI ends a process that ran a group
"""


def test_the_ema_is_partitioned_like_the_weights_under_fsdp_and_zero3(tmp_path):
    script = tmp_path / "ema_partition.py"
    script.write_text(EMA_PARTITION)
    _run([*_torchrun(script=script), str(tmp_path)], tmp_path / "log.txt")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in ("fsdp", "zero3"):
        main_rank = ranks[0][name]
        # Partitions of the whole-model EMA, updated in place: exactly the EMA of the gathered weights.
        assert main_rank["equals_reference"], name
        assert all(r[name]["resumed_equal"] for r in ranks), name
        # Each rank holds half (ZeRO-3 pads each parameter to a multiple of 2 elements).
        for r in ranks:
            assert 0.45 < r[name]["ema_bytes"] / main_rank["full_bytes"] < 0.55, (name, r[name]["ema_bytes"])
    assert ranks[0]["zero3"]["files_equal"]
