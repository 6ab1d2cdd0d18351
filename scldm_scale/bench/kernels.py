"""`scldm-scale bench kernels`: the fused Triton kernels against their PyTorch alternatives, one table.

Per op and pass (forward, forward+backward): the MCAB pooling and unpooling kernels against every SDPA
backend (flash, memory-efficient, cuDNN, math) and compiled FlexAttention (`bench.mcab_attention`), the
fused NB loss against the eager PyTorch one (`bench.nb_loss`), both timed by `bench.timing`. A backend that
cannot run (flash takes no mask, cuDNN and FlexAttention's backward want a GPU, ...) is a row with its
reason, never left out.

Columns: ms per call; TFLOP/s and GB/s over the *minimal* FLOPs and bytes of the op (what any implementation
must do, not what it does), counted by `attention_cost` and `bench_nb_loss`; ms is the median call:
    attention FLOPs  forward 4·B·H·Lq·Lk·D, backward 8·B·H·Lq·Lk·D (a multiply-add counts 2)
    attention bytes  forward e·(n_q + 2·n_kv + n_o), backward e·(2·n_q + 4·n_kv + 2·n_o), + B·Lk for a mask
                     (n_q = Lq·H·D: the queries are shared by every cell; n_kv = B·Lk·H·D; n_o = B·Lq·H·D)
    NB loss bytes    forward B·G·(e + 4) + |θ|·e + 8·B, backward B·G·e + |θ|·e + 4·B; FLOPs not counted
                     (elementwise special functions: the loss is bound by memory)
"% roof" is the roofline floor over the measured time: floor = max(bytes / peak bandwidth, FLOPs / peak
FLOP/s), the time the minimal work takes at the device's peaks. The FLOP peak is the dense bf16 tensor-core
rate of `scldm_scale.hardware.PEAKS`, used for 16-bit inputs only (fp32 rows are floored by memory alone);
the bandwidth is the same table's. Unknown devices and the CPU get no "% roof".
"x ref" is the speed-up over the op's reference in the same run: the fastest SDPA backend for attention,
eager PyTorch for the NB loss; "mem/ref" is the peak CUDA memory of the call over the reference's.

On the CPU (or with --smoke) the benchmark runs tiny fp32 shapes under Triton's interpreter, once each,
so CI keeps every path alive: those times mean nothing. TRITON_INTERPRET=1 is set here before Triton is
first imported (Triton reads it when its functions are defined); FlexAttention is not compiled then.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from typing import Any

import torch

from scldm_scale.bench.mcab_attention import bench_mcab_attention
from scldm_scale.bench.nb_loss import bench_nb_loss
from scldm_scale.bench.records import claim_records, machine, write_records
from scldm_scale.config import ConfigError, KernelShapeConfig, add_options, comma_separated, from_flags, parse_ints
from scldm_scale.hardware import lookup_peak_memory_tbs, lookup_peak_tflops
from scldm_scale.outputs import add_overwrite

OPS = ("pooling", "unpooling", "nb_loss")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = ("sdpa_flash_attention", "sdpa_efficient_attention", "sdpa_cudnn_attention", "sdpa_math")
SMOKE_NB_SHAPE = (3, 37)  # cells x genes: off every block size, a few interpreter launches
FLEX_SMOKE_NOTE = "skipped (smoke): compiling it on the CPU takes minutes, and it has no CPU backward"


def use_triton_interpreter() -> None:
    """Make the Triton kernels run on the CPU: TRITON_INTERPRET=1 before Triton (and scldm_kernels) is imported.

    Raises when it is too late (Triton already imported without it): its functions would be compiled for a GPU.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            raise RuntimeError(
                "Triton was imported before TRITON_INTERPRET=1 could be set, so its kernels cannot run on the CPU; "
                "set TRITON_INTERPRET=1 in the environment of this process"
            )
        os.environ["TRITON_INTERPRET"] = "1"
    from scldm_kernels._triton import HAS_TRITON, INTERPRETING

    if HAS_TRITON and not INTERPRETING:
        raise RuntimeError("scldm_kernels was imported before TRITON_INTERPRET=1 was set; run in a fresh process")


def smoke_reason(smoke: bool) -> str | None:
    """Why the run is a smoke run (tiny shapes, interpreter), or None for a real measurement on CUDA."""
    if smoke:
        return "--smoke"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def device_peaks(smoke: bool) -> dict[str, Any]:
    """The device the benchmark runs on and its peak FLOP/s and bandwidth (None where unknown or on the CPU)."""
    if smoke:
        return {"device_name": "cpu (Triton interpreter)", "peak_tflops": None, "peak_tbs": None}
    name = torch.cuda.get_device_name()
    return {"device_name": name, "peak_tflops": lookup_peak_tflops(name), "peak_tbs": lookup_peak_memory_tbs(name)}


def roofline(flops: float | None, n_bytes: float, dtype: torch.dtype, peaks: dict) -> tuple[float | None, str | None]:
    """(floor ms, what bounds it): the minimal work at the device's peaks; (None, None) without a bandwidth."""
    if not peaks["peak_tbs"]:
        return None, None
    floors = {"memory": n_bytes / (peaks["peak_tbs"] * 1e12) * 1e3}
    if flops and peaks["peak_tflops"] and dtype in (torch.bfloat16, torch.float16):
        floors["compute"] = flops / (peaks["peak_tflops"] * 1e12) * 1e3
    bound = max(floors, key=floors.get)
    return floors[bound], bound


def attention_records(
    kind: str,
    smoke: bool,
    cells: int,
    heads: int,
    n_latents: int,
    genes: int,
    head_dim: int,
    dtype: torch.dtype,
    warmup: int,
    reps: int,
) -> list[dict[str, Any]]:
    """bench_mcab_attention's rows for one op and shape, as this benchmark's records."""
    n_queries, n_keys = (n_latents, genes) if kind == "pooling" else (genes, n_latents)
    backends = ("triton", *SDPA_BACKENDS) if smoke else None
    rows = bench_mcab_attention(
        kind,
        cells=cells,
        heads=heads,
        n_queries=n_queries,
        n_keys=n_keys,
        head_dim=head_dim,
        dtype=dtype,
        warmup=warmup,
        reps=reps,
        smoke=smoke,
        backends=backends,
    )
    if smoke:  # as bench_mcab_attention would have listed it, with the reason it did not run
        untimed = [{k: v for k, v in row.items() if k not in ("ms", "peak_mib")} for row in rows[:2]]
        rows += [{**row, "backend": "flex_compiled", "error": FLEX_SMOKE_NOTE} for row in untimed]
    same = ("pass", "backend", "cells", "heads", "n_queries", "n_keys", "head_dim", "dtype", "flops", "bytes")
    same += ("ms", "peak_mib")
    records = []
    for row in rows:
        shape = f"B{row['cells']} H{row['heads']} Lq{row['n_queries']} Lk{row['n_keys']} D{row['head_dim']}"
        kept = {key: row.get(key) for key in same}
        records.append({"op": kind, "shape": shape, **kept, "error": row.get("error")})
    return records


def nb_loss_records(smoke: bool, cells: int, genes: int, dtype: torch.dtype, warmup: int, reps: int) -> list[dict]:
    """bench_nb_loss's rows for one shape (per-gene θ, as the benchmark shape), as this benchmark's records."""
    shape = SMOKE_NB_SHAPE if smoke else (cells, genes)
    device = "cpu" if smoke else "cuda"
    rows = bench_nb_loss((shape,), dtype=dtype, device=device, warmup=warmup, reps=reps)
    return [
        {
            "op": "nb_loss",
            "pass": row["passes"],
            "backend": "triton" if row["impl"] == "fused" else "eager",
            "shape": f"B{row['cells']} G{row['genes']} theta/{row['theta']}",
            "cells": row["cells"],
            "genes": row["genes"],
            "dtype": row["dtype"],
            "flops": None,
            "bytes": row["min_bytes"],
            "ms": row.get("ms"),
            "peak_mib": row.get("peak_mib"),
            "error": row.get("note"),
        }
        for row in rows
    ]


def add_derived(records: list[dict], peaks: dict, dtype: torch.dtype) -> None:
    """Throughput, % of the roofline floor and the ratios to the reference of the same op, shape and pass."""
    for r in records:
        timed = r["ms"] is not None
        r["tflops"] = r["flops"] / r["ms"] / 1e9 if timed and r["flops"] else None
        r["gb_per_s"] = r["bytes"] / r["ms"] / 1e6 if timed else None
        floor_ms, r["bound"] = roofline(r["flops"], r["bytes"], dtype, peaks)
        r["roofline_floor_ms"] = floor_ms
        r["pct_of_roofline"] = 100 * floor_ms / r["ms"] if timed and floor_ms else None
    for r in records:
        same = [o for o in records if (o["op"], o["shape"], o["pass"]) == (r["op"], r["shape"], r["pass"])]
        candidates = [o for o in same if o["ms"] is not None and o["backend"] in (*SDPA_BACKENDS, "eager")]
        ref = min(candidates, key=lambda o: o["ms"], default=None)
        r["reference"] = ref["backend"] if ref else None
        r["speedup_vs_reference"] = ref["ms"] / r["ms"] if ref and r["ms"] else None
        both_peaks = ref and r["peak_mib"] is not None and ref["peak_mib"]
        r["peak_vs_reference"] = r["peak_mib"] / ref["peak_mib"] if both_peaks else None


def run_kernel_bench(
    *,
    genes: list[int],
    cells: int = KernelShapeConfig.cells,
    heads: int = KernelShapeConfig.heads,
    n_latents: int = KernelShapeConfig.n_latents,
    head_dim: int = KernelShapeConfig.head_dim,
    dtype: str = KernelShapeConfig.dtype,
    ops: tuple[str, ...] = OPS,
    smoke: bool = KernelShapeConfig.smoke,
    warmup: int = 5,
    reps: int = 20,
    json_path: str | None = None,
) -> list[dict[str, Any]]:
    """Run the benchmark (a smoke run on the CPU), print the table, write the records to json_path."""
    unknown = sorted(set(ops) - set(OPS))
    if unknown or dtype not in DTYPES or not genes:
        raise ConfigError(
            f"bench kernels: ops must be among {list(OPS)} (got {unknown}), dtype among {list(DTYPES)} "
            f"(got {dtype!r}), and at least one gene count given"
        )
    why_smoke = smoke_reason(smoke)
    if why_smoke is not None:
        use_triton_interpreter()
        # one shape (bench_mcab_attention's smoke shapes, SMOKE_NB_SHAPE), one call each
        genes, torch_dtype, warmup, reps = genes[:1], torch.float32, 0, 1
    else:
        torch_dtype = DTYPES[dtype]
    peaks = device_peaks(why_smoke is not None)
    records: list[dict[str, Any]] = []
    for n_genes in genes:
        for kind in ("pooling", "unpooling"):
            if kind in ops:
                records += attention_records(
                    kind, why_smoke is not None, cells, heads, n_latents, n_genes, head_dim, torch_dtype, warmup, reps
                )
        if "nb_loss" in ops:
            records += nb_loss_records(why_smoke is not None, cells, n_genes, torch_dtype, warmup, reps)
    add_derived(records, peaks, torch_dtype)
    context = {
        **machine(),
        **peaks,
        "smoke": why_smoke is not None,
        "torch": torch.__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    for r in records:
        r.update(context)
    print(_header(context, why_smoke, str(torch_dtype).removeprefix("torch."), warmup, reps))
    print(format_table(records))
    write_records(records, json_path)
    return records


def _header(context: dict, why_smoke: str | None, dtype: str, warmup: int, reps: int) -> str:
    def peak(value, unit):
        return "unknown" if value is None else f"{value:g} {unit}"

    lines = [
        f"\nkernel benchmark on {context['device_name']}, {dtype}, {warmup} warm-up + {reps} timed calls, "
        f"torch {context['torch']}, {context['date']}",
        f"peaks: {peak(context['peak_tflops'], 'TFLOP/s (bf16 dense)')}, {peak(context['peak_tbs'], 'TB/s')}",
        "TFLOP/s, GB/s over the minimal FLOPs and bytes; % roof = roofline floor / time; "
        "x ref = speed-up over the fastest SDPA backend (attention) or eager (NB loss); mem/ref = peak memory ratio",
    ]
    if why_smoke is not None:
        lines.append(
            f"SMOKE RUN ({why_smoke}): tiny fp32 shapes on the CPU, Triton kernels under TRITON_INTERPRET=1, one call "
            "each: checks that every path runs, the times mean nothing. FlexAttention is not compiled."
        )
    return "\n".join(lines) + "\n"


def format_table(records: list[dict]) -> str:
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = (
        f"{'op':<10} {'pass':<8} {'backend':<25} {'shape':<28} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} "
        f"{'% roof':>6} {'peak MiB':>9} {'x ref':>6} {'mem/ref':>7}  note"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        note = "" if r["error"] is None else r["error"].split(". ")[0][:100]
        lines.append(
            f"{r['op']:<10} {r['pass'].replace('forward', 'fwd').replace('backward', 'bwd'):<8} {r['backend']:<25} "
            f"{r['shape']:<28} {fmt(r['ms'], '.3f'):>9} {fmt(r['tflops'], '.2f'):>8} {fmt(r['gb_per_s'], '.1f'):>8} "
            f"{fmt(r['pct_of_roofline'], '.0f'):>6} {fmt(r['peak_mib'], ',.1f'):>9} "
            f"{fmt(r['speedup_vs_reference'], '.2f'):>6} {fmt(r['peak_vs_reference'], '.2f'):>7}  {note}"
        )
    return "\n".join(lines)


def add_kernel_shape_options(parser: argparse.ArgumentParser) -> None:
    """The flags of `KernelShapeConfig`, shared by `bench kernels` and `profile-kernels`."""
    add_options(parser, KernelShapeConfig, n_latents="--latents")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale bench kernels`."""
    add_kernel_shape_options(parser)
    genes_help = "comma-separated gene counts G: keys of pooling, queries of unpooling, the NB loss's width"
    parser.add_argument("--genes", default="2048,8192,20000", help=genes_help)
    parser.add_argument("--ops", type=comma_separated, default=",".join(OPS), help="comma-separated subset")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before the timed ones")
    parser.add_argument("--reps", type=int, default=20, help="timed calls")
    json_help = "also write the records to this JSON file (default: only print the table)"
    parser.add_argument("--json", default=None, metavar="OUT", help=json_help)
    add_overwrite(parser, "the records file at --json")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    claim_records(args.json, args.overwrite)
    genes = parse_ints(args.genes, "--genes")
    shape = asdict(from_flags(KernelShapeConfig, args))
    run_kernel_bench(genes=genes, ops=tuple(args.ops), warmup=args.warmup, reps=args.reps, json_path=args.json, **shape)
