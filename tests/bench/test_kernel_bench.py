"""`scldm-scale bench kernels`: the smoke run end to end (records, table, the interpreter really on) and the
roofline and ratio arithmetic (no timings are judged)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from scldm_scale.bench.kernels import SDPA_BACKENDS, add_derived, roofline, use_triton_interpreter
from scldm_scale.hardware import lookup_peak_memory_tbs

ATTENTION_BACKENDS = {"triton", *SDPA_BACKENDS, "flex_compiled"}
H100 = {"device_name": "NVIDIA H100 80GB HBM3", "peak_tflops": 989.0, "peak_tbs": 3.35}


def test_smoke_bench_runs_every_op_under_the_interpreter_and_lists_every_backend(tmp_path):
    json_path = tmp_path / "kernels.json"
    # Without TRITON_INTERPRET in its environment: the command must set it before Triton is imported.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "scldm_scale", "bench", "kernels", "--smoke", "--json", str(json_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SMOKE RUN (--smoke)" in result.stdout
    assert "falls back" not in result.stderr  # the kernels ran, not their PyTorch references
    records = json.loads(json_path.read_text())
    assert {r["op"] for r in records} == {"pooling", "unpooling", "nb_loss"}
    assert all(r["triton_interpret"] and r["smoke"] for r in records)

    for op in ("pooling", "unpooling", "nb_loss"):
        rows = [r for r in records if r["op"] == op]
        expected = ATTENTION_BACKENDS if op != "nb_loss" else {"triton", "eager"}
        for pass_name in ("forward", "forward+backward"):
            by_backend = {r["backend"]: r for r in rows if r["pass"] == pass_name}
            assert set(by_backend) == expected, (op, pass_name)
            for row in by_backend.values():  # timed, or the reason it is not: never neither, never both
                assert (row["ms"] is None) != (row["error"] is None), row
            kernel = by_backend["triton"]
            assert kernel["ms"] > 0 and kernel["gb_per_s"] == pytest.approx(kernel["bytes"] / kernel["ms"] / 1e6)
            references = [r for b, r in by_backend.items() if b in (*SDPA_BACKENDS, "eager") and r["ms"] is not None]
            assert references and all(r["ms"] > 0 for r in references)
            fastest = min(references, key=lambda r: r["ms"])
            assert kernel["reference"] == fastest["backend"]
            assert kernel["speedup_vs_reference"] == pytest.approx(fastest["ms"] / kernel["ms"])
        if op != "nb_loss":
            assert "skipped (smoke)" in by_backend["flex_compiled"]["error"]
            assert all(r["tflops"] == pytest.approx(r["flops"] / r["ms"] / 1e9) for r in rows if r["ms"])

    table = result.stdout
    assert "op" in table and "x ref" in table and "% roof" in table
    # one table line per record, naming its op, backend and pass
    lines = [line for line in table.splitlines() if line.split()[:1] in (["pooling"], ["unpooling"], ["nb_loss"])]
    assert len(lines) == len(records)
    assert any("triton" in line and "fwd+bwd" in line for line in lines)


@pytest.mark.parametrize(
    "name, tbs",
    [
        ("NVIDIA H100 80GB HBM3", 3.35),
        ("NVIDIA H100 PCIe", 2.0),
        ("NVIDIA H100 NVL", 3.9),
        ("NVIDIA H200", 4.8),
        ("NVIDIA A100-SXM4-80GB", 2.039),
        ("NVIDIA A100 80GB PCIe", 1.935),
        ("NVIDIA A100-SXM4-40GB", 1.555),
        ("NVIDIA L40S", 0.864),
        ("NVIDIA L4", 0.3),
        ("NVIDIA GH200 480GB", None),  # not H200: its memory differs by model, so unknown
        ("Some Future GPU", None),
    ],
)
def test_memory_bandwidth_lookup_matches_the_specific_name_first(name, tbs):
    assert lookup_peak_memory_tbs(name) == tbs


def test_roofline_floor_is_the_slower_of_memory_and_compute_at_the_peaks():
    # 3.35 GB at 3.35 TB/s: 1 ms; 98.9 GFLOP at 989 TFLOP/s: 0.1 ms -> memory bound
    assert roofline(98.9e9, 3.35e9, torch.bfloat16, H100) == (pytest.approx(1.0), "memory")
    assert roofline(98.9e12, 3.35e9, torch.bfloat16, H100) == (pytest.approx(100.0), "compute")
    # fp32 rows: the bf16 tensor-core peak does not apply, memory alone floors them
    assert roofline(98.9e12, 3.35e9, torch.float32, H100) == (pytest.approx(1.0), "memory")
    assert roofline(None, 3.35e9, torch.bfloat16, H100) == (pytest.approx(1.0), "memory")
    assert roofline(1e9, 1e9, torch.bfloat16, {"peak_tflops": 989.0, "peak_tbs": None}) == (None, None)


def _record(op, backend, ms, peak=None, flops=1e9, n_bytes=3.35e9):
    return {
        "op": op,
        "pass": "forward",
        "shape": "s",
        "backend": backend,
        "ms": ms,
        "flops": flops,
        "bytes": n_bytes,
        "peak_mib": peak,
        "error": None if ms is not None else "unavailable",
    }


def test_ratios_are_against_the_fastest_timed_reference_of_the_same_case():
    records = [
        _record("pooling", "triton", 2.0, peak=10.0),
        _record("pooling", "sdpa_math", 8.0, peak=100.0),
        _record("pooling", "sdpa_efficient_attention", 4.0, peak=40.0),
        _record("pooling", "sdpa_flash_attention", None),
        _record("pooling", "flex_compiled", 1.0, peak=5.0),  # not a reference
        _record("nb_loss", "triton", 1.0, flops=None),
        _record("nb_loss", "eager", 10.0, flops=None),
    ]
    add_derived(records, H100, torch.bfloat16)
    kernel, math, efficient, flash, flex, nb_kernel, nb_eager = records
    assert kernel["reference"] == "sdpa_efficient_attention"
    assert kernel["speedup_vs_reference"] == pytest.approx(2.0) and kernel["peak_vs_reference"] == pytest.approx(0.25)
    assert math["speedup_vs_reference"] == pytest.approx(0.5) and flex["speedup_vs_reference"] == pytest.approx(4.0)
    assert flash["speedup_vs_reference"] is None and flash["pct_of_roofline"] is None and flash["gb_per_s"] is None
    # floor 1 ms (memory) over 2 ms measured
    assert kernel["pct_of_roofline"] == pytest.approx(50.0) and kernel["bound"] == "memory"
    assert kernel["tflops"] == pytest.approx(0.5) and kernel["gb_per_s"] == pytest.approx(1675.0)
    assert nb_kernel["reference"] == "eager" and nb_kernel["speedup_vs_reference"] == pytest.approx(10.0)
    assert nb_kernel["tflops"] is None and nb_kernel["pct_of_roofline"] == pytest.approx(100.0)
    assert nb_eager["pct_of_roofline"] == pytest.approx(10.0)


def test_interpreter_cannot_be_switched_on_after_triton_was_imported(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(sys.modules, "triton", object())
    with pytest.raises(RuntimeError, match="imported before TRITON_INTERPRET=1"):
        use_triton_interpreter()
    assert "TRITON_INTERPRET" not in os.environ
