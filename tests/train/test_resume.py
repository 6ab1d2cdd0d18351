"""Training checkpoints: exact resume after SIGTERM (in process) and after SIGKILL (a real subprocess),
atomic step folders with keep-last-K, and refusal of a checkpoint from another stage or architecture."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scldm_scale import artifact
from scldm_scale.artifact import CheckpointError
from scldm_scale.config import CONFIG_DIR, load_config
from scldm_scale.train.checkpoint import COMPLETE, RunCheckpoints
from scldm_scale.train.stages import run_training
from scldm_scale.train.trainer import TrainingInterrupted

STEPS = 12


def _cfg(tiny_overrides, data_path, ckpt_dir, *extra):
    return load_config(
        None,
        [
            "stage=vae",
            *tiny_overrides,
            "data.source=h5ad",
            f"data.path={data_path}",
            "data.condition_keys=[cell_type]",
            f"train.ckpt_dir={ckpt_dir}",
            f"train.max_steps={STEPS}",
            "train.ckpt_every=4",
            *extra,
        ],
    )


def _losses(path: Path) -> dict[int, float]:
    """Loss per step from a model artifact's training history (the last record of a step wins)."""
    return {h["step"]: h["loss"] for h in artifact.load(path).training["history"]}


def _signal_during_forward(monkeypatch, module_class, call: int, signum: int) -> None:
    """Make module_class.forward raise `signum` in the process during its `call`-th call."""
    forward = module_class.forward
    calls = {"n": 0}

    def forward_with_signal(self, batch):
        calls["n"] += 1
        if calls["n"] == call:
            signal.raise_signal(signum)
        return forward(self, batch)

    monkeypatch.setattr(module_class, "forward", forward_with_signal)


def test_sigterm_checkpoints_and_resume_gives_the_same_losses(tiny_overrides, synthetic_h5ad, tmp_path, monkeypatch):
    reference = _losses(run_training(_cfg(tiny_overrides, synthetic_h5ad, tmp_path / "ref")))
    assert sorted(reference) == list(range(1, STEPS + 1))

    # Deliver SIGTERM in the middle of step 6: the step finishes, a checkpoint is written, the run stops.
    from scldm_scale.models.vae import SetVAE

    _signal_during_forward(monkeypatch, SetVAE, 6, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="SIGTERM after step 6.*train.resume=auto") as stop:
        run_training(_cfg(tiny_overrides, synthetic_h5ad, tmp_path / "run"))
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert RunCheckpoints(tmp_path / "run" / "vae").latest().name == "step-6"
    monkeypatch.undo()

    resumed = _losses(run_training(_cfg(tiny_overrides, synthetic_h5ad, tmp_path / "run", "train.resume=auto")))
    assert resumed == reference  # bit-identical: same data order, RNG, optimizer and schedule state


def test_resume_refuses_another_architecture_and_keeps_the_last_k(tiny_overrides, synthetic_h5ad, tmp_path):
    run_training(_cfg(tiny_overrides, synthetic_h5ad, tmp_path, "train.keep_last=2"))
    steps = sorted(p.name for p in (tmp_path / "vae").glob("step-*"))
    assert steps == ["step-12", "step-8"]
    assert not list((tmp_path / "vae").glob(".step-*"))
    with pytest.raises(CheckpointError, match="does not match this run.*model"):
        run_training(_cfg(tiny_overrides, synthetic_h5ad, tmp_path, "train.resume=auto", "model.n_layers=2"))


def test_latest_skips_an_incomplete_folder_and_a_corrupt_state_is_refused(tmp_path):
    checkpoints = RunCheckpoints(tmp_path, keep_last=3)
    checkpoints.save(2, {"step": 2})
    checkpoints.save(4, {"step": 4})
    (tmp_path / "step-4" / COMPLETE).unlink()  # as if killed before the marker
    assert checkpoints.latest().name == "step-2"
    (tmp_path / "step-2" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoints.load(checkpoints.latest())
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        checkpoints.load(tmp_path / "step-4")


def test_ldm_resume_after_sigterm_is_exact(tiny_overrides, synthetic_h5ad, tmp_path, monkeypatch):
    vae_path = run_training(_cfg(tiny_overrides, synthetic_h5ad, tmp_path / "vae_run", "train.ckpt_every=0"))
    ldm = ["stage=ldm", f"train.vae_checkpoint={vae_path}"]
    reference = _losses(run_training(_cfg(tiny_overrides, synthetic_h5ad, tmp_path / "ref", *ldm)))

    from scldm_scale.models.prior import FlowMatchingPrior

    _signal_during_forward(monkeypatch, FlowMatchingPrior, 7, signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="SIGINT after step 7"):
        run_training(_cfg(tiny_overrides, synthetic_h5ad, tmp_path / "run", *ldm))
    monkeypatch.undo()
    resumed = _losses(run_training(_cfg(tiny_overrides, synthetic_h5ad, tmp_path / "run", *ldm, "train.resume=auto")))
    assert resumed == reference  # the EMA, condition dropout RNG and latent order all resume exactly


@pytest.mark.multiproc
def test_sigkill_during_training_then_resume_matches_an_uninterrupted_run(tiny_overrides, synthetic_h5ad, tmp_path):
    steps = 40
    argv = [
        sys.executable,
        "-m",
        "scldm_scale",
        "train",
        str(CONFIG_DIR / "quickstart.yaml"),
        *tiny_overrides,
        "data.source=h5ad",
        f"data.path={synthetic_h5ad}",
        "data.condition_keys=[cell_type]",
        f"train.max_steps={steps}",
        "train.ckpt_every=3",
        "train.num_threads=1",
    ]
    subprocess.run([*argv, f"train.ckpt_dir={tmp_path / 'ref'}"], check=True, capture_output=True)
    reference = _losses(tmp_path / "ref" / "vae-model")

    run = [*argv, f"train.ckpt_dir={tmp_path / 'run'}", f"train.metrics_file={tmp_path / 'run' / 'm.jsonl'}"]
    proc = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "vae" / "step-9").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    subprocess.run([*run, "train.resume=auto"], check=True, capture_output=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "m.jsonl").read_text().splitlines()]
    # The resumed run rewrote the log up to its checkpoint, so steps replayed after the kill appear once.
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert {r["step"]: r["loss"] for r in records} == reference
    assert _losses(tmp_path / "run" / "vae-model") == reference
