"""`scldm-scale bench gpu` / launch/gpu_check.sh: the smoke run end to end, as the GPU machine would run it.

The GPU machine has torch, Triton, numpy, scipy, pandas, PyYAML, safetensors, torchdiffeq and tqdm, but not
anndata, scanpy or tiledbsoma (the device tool's KINDS.md): the smoke run here has those imports refused
(a sitecustomize on PYTHONPATH), so a module of the check that still imports one fails this test. No timing
is judged; the report's arithmetic is checked on hand-made records shaped like a GPU run's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scldm_scale.bench.gpu import STEPS, _run_step, curve_agreement, format_report, run_gpu_check, target_rows
from scldm_scale.cli import main
from scldm_scale.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
ABSENT_ON_THE_GPU_MACHINE = ("anndata", "scanpy", "tiledbsoma", "tiledbsoma_ml", "cellxgene_census", "skmisc")
ABSENT_ON_THE_GPU_MACHINE += ("umap", "ot", "deepspeed", "wandb")
BLOCKER = f"""import sys
ABSENT = {ABSENT_ON_THE_GPU_MACHINE!r}
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)")
        return None
sys.meta_path.insert(0, _Absent())
"""


@pytest.fixture
def device_like_env(tmp_path) -> dict:
    """This environment with the GPU machine's missing packages refused in every Python process."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pythonpath = os.pathsep.join(filter(None, [str(blocker), env.get("PYTHONPATH")]))
    return env | {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def test_smoke_run_exercises_every_step_without_the_packages_the_gpu_machine_lacks(tmp_path, device_like_env):
    refused = subprocess.run([sys.executable, "-c", "import anndata"], env=device_like_env, capture_output=True)
    assert refused.returncode != 0 and b"absent on the GPU machine" in refused.stderr  # the blocker is active

    out = tmp_path / "out"
    env = device_like_env | {"OUT": str(out), "GPU_CHECK_SITE": str(tmp_path / "site")}
    result = subprocess.run(
        ["bash", str(ROOT / "launch" / "gpu_check.sh"), "--smoke"], env=env, capture_output=True, text=True, timeout=600
    )
    log = (out / "run.log").read_text() if (out / "run.log").exists() else ""
    assert result.returncode == 0, result.stderr[-3000:] + log[-3000:]
    # What the device tool brings back: at most 8 files, flat.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"{s}.json" for s in STEPS), "results.json", "report.md", "run.log"]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["ok"] and results["environment"]["smoke"]
    assert {s: r["status"] for s, r in results["steps"].items()} == dict.fromkeys(STEPS, "ok")
    assert "falls back" not in log and "absent on the GPU machine" not in log  # the kernels ran, nothing was missed

    steps = {s: r["records"] for s, r in results["steps"].items()}
    for step, records in steps.items():  # each step's own file holds the same records
        assert json.loads((out / f"{step}.json").read_text()) == records
    correctness = steps["correctness"]
    assert all(r["ok"] and r["fallback"] is None for r in correctness)
    kinds = {(r["op"], r["dtype"]) for r in correctness}
    assert kinds == {
        (op, d) for op in ("pooling", "unpooling", "folded_pooling", "nb_loss") for d in ("float32", "bfloat16")
    }
    assert all(r["max_error"] < r["tolerance"] for r in correctness)

    bench = [r for r in steps["kernels"] if r["kind"] == "bench"]
    assert {r["op"] for r in bench} == {"pooling", "unpooling", "nb_loss"}
    assert all(r["triton_interpret"] for r in bench)
    assert any(r["kind"] == "autotune" for r in steps["kernels"])
    assert [(r["attention"], r["nb_loss"]) for r in steps["vae_step"]] == [("torch", "torch"), ("triton", "triton")]
    assert all("error" not in r and r["cells_per_s"] > 0 and r["train_flops_per_cell"] > 0 for r in steps["vae_step"])
    prior, generation = steps["prior_generation"]
    assert prior["what"] == "prior step" and prior["cells_per_s"] > 0 and "error" not in prior
    assert generation["what"] == "generation" and generation["cells_per_s"] > 0 and generation["n_steps"] == 2
    torch_curve, triton_curve, agreement = steps["train_curves"]
    assert (torch_curve["backend"], triton_curve["backend"]) == ("torch", "triton")
    assert len(torch_curve["losses"]) == len(triton_curve["losses"]) == torch_curve["steps"]
    assert agreement["agree"] and agreement["median_step_rel_diff"] < 1e-4  # fp32 on the CPU: rounding only

    report = (out / "report.md").read_text()
    assert "SMOKE RUN" in report and "## Targets (issue 16)" in report and "## 4. Small VAE" in report
    assert report in result.stdout  # printed last, where the device tool's output tail keeps it


def test_curve_agreement_is_relative_per_step_and_over_the_last_fifth():
    same = curve_agreement([10.0, 8.0, 6.0, 5.0, 4.0], [10.0, 8.0, 6.0, 5.0, 4.0])
    assert same["agree"] and same["max_step_rel_diff"] == 0.0
    off = curve_agreement([10.0] * 10, [10.0] * 9 + [11.0])
    assert off["median_step_rel_diff"] == 0.0 and off["max_step_rel_diff"] == pytest.approx(0.1)
    assert off["final_mean_rel_diff"] == pytest.approx(0.05) and not off["agree"]  # last fifth: 2 steps


def _gpu_like_results() -> dict:
    kernel = {"kind": "bench", "op": "pooling", "pass": "forward+backward", "backend": "triton", "shape": "B256 H8"}
    kernel |= {"ms": 0.5, "tflops": 300.0, "gb_per_s": 2000.0, "pct_of_roofline": 70.0, "peak_mib": 10.0}
    kernel |= {
        "speedup_vs_reference": 1.6,
        "peak_vs_reference": 0.5,
        "reference": "sdpa_flash_attention",
        "error": None,
    }
    nb = {**kernel, "op": "nb_loss", "shape": "B256 G8192", "speedup_vs_reference": 6.0, "peak_vs_reference": 0.2}
    skipped = {**kernel, "backend": "flex_compiled", "ms": None, "tflops": None, "gb_per_s": None, "error": "failed"}
    vae = {
        "genes": 36000,
        "decoder": "chunked",
        "attention": "triton",
        "nb_loss": "triton",
        "cells": 256,
        "d_model": 512,
    }
    return {
        "environment": {
            "device_name": "NVIDIA H100 80GB HBM3",
            "date": "2026-12-07",
            "torch": "2.11.0",
            "cuda": "13.0",
            "triton": "3.6.0",
            "python": "3.12.3",
            "cpu_count": 16,
            "smoke": False,
        },  # fmt: skip
        "budget_s": 420,
        "steps": {
            "vae_step": {
                "status": "ok",
                "seconds": 90.0,
                "records": [{**vae, "mfu": 0.4, "cells_per_s": 900.0}, {**vae, "error": "CUDA out of memory"}],
            },  # fmt: skip
            "prior_generation": {
                "status": "stopped at its budget (60 s)",
                "seconds": 60.0,
                "records": [
                    {
                        "what": "generation",
                        "cells": 10000,
                        "genes": 8000,
                        "method": "heun",
                        "n_steps": 50,
                        "guidance": {"cell_type": 2.0},
                        "ode_batch": 1024,
                        "vae_d_model": 512,
                        "cells_per_s": 1000.0,
                    }
                ],
            },  # fmt: skip
            "train_curves": {"status": "skipped: the total budget is spent", "records": []},
            "kernels": {"status": "ok", "seconds": 100.0, "records": [kernel, nb, skipped]},
        },
    }


def test_report_of_a_gpu_run_states_each_target_and_what_was_cut_short():
    results = _gpu_like_results()
    table = target_rows(results)
    rows = {row[0]: row for row in table}
    assert rows["pooling fwd+bwd B256 H8"][3] == "yes"  # 1.6x and 70% of the roofline
    assert rows["NB loss fwd+bwd B256 G8192"][3] == "**no**"  # 6x, but 0.2 of eager's memory (target < 0.1)
    vae = [row for row in table if row[0].startswith("VAE step")]
    assert [row[3] for row in vae] == ["yes", "**no**"] and "out of memory" in vae[1][2]
    assert rows["generation 10,000 cells, 8,000 genes, heun 50, guidance"][2:] == ["1,000 cells/s", "**no**"]
    report = format_report(results)
    assert "NVIDIA H100 80GB HBM3" in report and "SMOKE" not in report
    assert "stopped at its budget (60 s)" in report and "skipped: the total budget is spent" in report
    assert "| pooling | forward+backward | flex_compiled | B256 H8 | - |" in report


def test_a_step_past_its_budget_is_stopped_and_a_spent_total_skips_the_rest(tmp_path, capsys):
    with open(tmp_path / "run.log", "w") as log:
        stopped = _run_step("train_curves", tmp_path, smoke=True, budget=0.3, log=log)
    assert stopped["status"] == "stopped at its budget (0 s)" and stopped["records"] == []
    results = run_gpu_check(tmp_path / "out", smoke=True, budget_s=5, steps=("correctness", "kernels"))
    assert not results["ok"]
    again = run_gpu_check(tmp_path / "out", smoke=True, budget_s=5, steps=("kernels",), overwrite=True)
    assert list(again["steps"]) == ["kernels"]
    assert {s: r["status"] for s, r in results["steps"].items()} == dict.fromkeys(
        ("correctness", "kernels"), "skipped: the total budget is spent"
    )
    assert "skipped: the total budget is spent" in capsys.readouterr().out


def test_refusals_name_the_fix(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="--steps: unknown"):
        run_gpu_check(tmp_path, smoke=True, budget_s=10, steps=("warp",))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="pass --overwrite"):
        run_gpu_check(tmp_path, smoke=True, budget_s=1)
    with pytest.raises(ConfigError, match="no results.json"):  # --overwrite replaces only an earlier check
        run_gpu_check(tmp_path, smoke=True, budget_s=1, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["bench", "gpu", "--out", str(tmp_path / "o")]) == 2
    assert "add --smoke" in capsys.readouterr().err
