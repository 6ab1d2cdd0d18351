"""`scldm-scale profile-kernels` (smoke, under the interpreter) and `profile-step` (both stages, on CPU): the
Chrome traces parse and hold what they claim — every kernel's labels, exactly the traced training steps."""

import json
import os
import subprocess
import sys

from scldm_scale.cli import main
from scldm_scale.config import CONFIG_DIR

QUICKSTART = str(CONFIG_DIR / "quickstart.yaml")


def _h5ad_data(h5ad) -> list[str]:
    # Not conftest.synthetic_vae_args: `from conftest import` resolves to tests/kernels/conftest.py when the
    # whole suite is collected in one run.
    return ["data.source=h5ad", f"data.path={h5ad}", "data.condition_keys=[cell_type]"]


def _events(trace_path) -> list[dict]:
    trace = json.loads(trace_path.read_text())
    assert trace["traceEvents"], trace_path
    return trace["traceEvents"]


def _names(events: list[dict], prefix: str) -> list[str]:
    return [e["name"] for e in events if e.get("name", "").startswith(prefix)]


def test_profile_kernels_smoke_traces_every_kernel_forward_and_backward(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "scldm_scale", "profile-kernels", "--smoke", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SMOKE RUN (--smoke)" in result.stdout and "falls back" not in result.stderr
    events = _events(tmp_path / "kernels_trace.json")
    table = (tmp_path / "kernels_table.txt").read_text()
    for kernel in ("pooling_attention", "unpooling_attention", "nb_nll"):
        for direction in ("forward", "backward"):
            label = f"{kernel} {direction}"
            assert _names(events, label) == [label], label  # one round in smoke mode
            assert label in table and label in result.stdout
    # the autograd.Functions of the kernels ran inside those labels (not the PyTorch references)
    assert {"_PoolingAttention", "_UnpoolingAttention", "NBNLLFunction"} <= {e.get("name") for e in events}


def test_profile_step_traces_exactly_the_requested_vae_steps(tmp_path, synthetic_h5ad, tiny_overrides, capsys):
    out = tmp_path / "profile"
    args = [QUICKSTART, "stage=vae", *_h5ad_data(synthetic_h5ad), *tiny_overrides, f"train.ckpt_dir={tmp_path / 'x'}"]
    assert main(["profile-step", *args, "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    events = _events(out / "step_trace.json")
    # profiler steps count from 0 (ProfilerStep#k is training step k + 1): training step 1 is the --warmup,
    # 2 the profiler's warm-up, 3 and 4 are traced
    assert sorted(set(_names(events, "ProfilerStep#"))) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert len(_names(events, "Optimizer.step")) == 2  # the optimizer of each traced step
    assert any(name.startswith("autograd::engine") for name in _names(events, "autograd"))  # the backward
    printed = capsys.readouterr().out
    assert "stage=vae" in printed and "ProfilerStep*" in printed
    assert "ProfilerStep*" in (out / "step_table.txt").read_text()
    assert not (tmp_path / "x").exists()  # checkpoints went to a temporary folder


def test_profile_step_runs_the_ldm_stage_on_a_trained_vae(tmp_path, synthetic_h5ad, tiny_overrides):
    vae_dir = tmp_path / "vae"
    data = _h5ad_data(synthetic_h5ad)
    train_vae = [QUICKSTART, "stage=vae", *data, *tiny_overrides, "train.max_steps=2", f"train.ckpt_dir={vae_dir}"]
    assert main(["train", *train_vae]) == 0
    args = [QUICKSTART, "stage=ldm", *data, *tiny_overrides, f"train.vae_checkpoint={vae_dir / 'vae-model'}"]
    out = tmp_path / "profile"
    assert main(["profile-step", *args, "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
    events = _events(out / "step_trace.json")
    assert sorted(set(_names(events, "ProfilerStep#"))) == ["ProfilerStep#2"]
    assert len(_names(events, "Optimizer.step")) == 1


def test_profile_step_refuses_zero_steps_at_the_boundary(tmp_path, synthetic_h5ad, tiny_overrides, capsys):
    args = [QUICKSTART, *_h5ad_data(synthetic_h5ad), *tiny_overrides]
    assert main(["profile-step", *args, "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "--steps and --warmup must be >= 1" in capsys.readouterr().err
