"""`scldm-scale bench step`: training throughput and memory per rank of each strategy, same global batch.

Every case is a real `scldm-scale train` run in its own process group (torchrun for 2+ ranks), on the
built-in PBMC data, with a fixed global batch: `single` runs 1 process with the whole batch, the others
`nproc` processes with an equal share. cells/s is the job's (all ranks), averaged over the logged steps
after `warmup` steps. On the CPU each case gets all cores (OMP_NUM_THREADS = cores / processes). Memory
is each rank's peak: CUDA memory allocated on a GPU, the process RSS on the CPU (which includes ~0.5-1 GB
of Python and torch). The ratio column is cells/s over the `single` row of the same model. The prior
(stage=ldm) needs a VAE checkpoint: a tiny one is trained first and not timed.

`--genes 2000,8000,36000` sweeps the gene count instead (`run_gene_sweep`): for each VAE size and G, one
training step (forward, backward, AdamW) on synthetic cells expressing 10% of G genes, with the decoder in
chunks (model.decode_chunk_genes=0, automatic) and in one pass (-1), each case in a fresh process so that its
peak memory is its own: the process's peak RSS on the CPU, CUDA max allocated on a GPU (bf16 autocast there).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scldm_scale.bench.records import claim_records, machine, write_records
from scldm_scale.config import CONFIG_DIR, ConfigError, comma_separated, parse_ints
from scldm_scale.outputs import add_overwrite

SIZES = {
    # name: overrides of the stage's model section
    "vae-S": ["model.d_model=64", "model.n_heads=4", "model.n_cross_heads=4", "model.n_layers=2"],
    "vae-M": ["model.d_model=256", "model.n_heads=8", "model.n_cross_heads=8", "model.n_layers=4"],
    "prior-S": ["prior.d_model=128", "prior.n_heads=4", "prior.n_layers=4"],
    "prior-M": ["prior.d_model=512", "prior.n_heads=8", "prior.n_layers=8"],
}
# The gene sweep's decoder settings: model.decode_chunk_genes.
DECODERS = {"chunked": 0, "one pass": -1}
EXPRESSED_FRACTION = 0.1
STRATEGIES = {
    "single": [],
    "ddp": ["train.strategy=ddp"],
    "fsdp": ["train.strategy=fsdp"],
    "deepspeed-zero3": ["train.strategy=deepspeed", "train.zero_stage=3"],
}


def _run(argv: list[str], nproc: int, env: dict) -> None:
    if "train.device=cpu" in argv:  # every case uses all cores: one process all of them, N processes 1/N each
        env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        command += ["-m", "scldm_scale", *argv]
    else:
        command = [sys.executable, "-m", "scldm_scale", *argv]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")


def run_step_bench(
    sizes: list[str],
    strategies: list[str],
    nproc: int,
    global_batch: int,
    steps: int,
    warmup: int,
    json_path: str | None,
    work_dir: str | None,
    device: str,
) -> list[dict]:
    unknown = [s for s in sizes if s not in SIZES] + [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"unknown sizes/strategies {unknown}; sizes: {list(SIZES)}, strategies: {list(STRATEGIES)}")
    if min(nproc, global_batch, steps) < 1 or not 0 <= warmup < steps:
        raise ConfigError(
            f"--nproc, --global-batch and --steps must be >= 1 and 0 <= --warmup < --steps; got {nproc}, "
            f"{global_batch}, {steps} and {warmup}"
        )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
    root = Path(work_dir or tempfile.mkdtemp(prefix="scldm_bench_step_"))
    common = [
        str(CONFIG_DIR / "quickstart.yaml"),
        "data.source=h5ad",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.progress=false",
        "train.ckpt_every=0",
        f"train.device={device}",
        "logging.wandb.mode=disabled",
    ]
    vae_ckpt = None
    if any(s.startswith("prior") for s in sizes):
        vae_dir = root / "vae-for-prior"
        _run(["train", *common, "stage=vae", "train.max_steps=2", f"train.ckpt_dir={vae_dir}"], 1, env)
        vae_ckpt = vae_dir / "vae-model"
    records = []
    host = machine()
    for size in sizes:
        stage = "vae" if size.startswith("vae") else "ldm"
        for strategy in strategies:
            ranks = 1 if strategy == "single" else nproc
            run_dir = root / f"{size}-{strategy}"
            metrics = run_dir / "metrics.jsonl"
            argv = ["train", *common, f"stage={stage}", *SIZES[size], *STRATEGIES[strategy]]
            argv += [f"train.batch_size={global_batch // ranks}", f"train.ckpt_dir={run_dir}"]
            argv += [f"train.metrics_file={metrics}"]
            if vae_ckpt is not None and stage == "ldm":
                argv.append(f"train.vae_checkpoint={vae_ckpt}")
            print(f"bench step: {size} {strategy} on {ranks} process(es)", file=sys.stderr, flush=True)
            _run(argv, ranks, env)
            logged = [json.loads(line) for line in metrics.read_text().splitlines()]
            measured = [r for r in logged if r["step"] > warmup]
            records.append(
                {
                    "model": size,
                    "strategy": strategy,
                    "ranks": ranks,
                    "global_batch": global_batch,
                    "cells_per_s": sum(r["cells_per_s"] for r in measured) / len(measured),
                    "peak_mem_gb_per_rank": max(r["max_mem_gb"] for r in measured),
                    "steps_measured": len(measured),
                    "device": device,
                    **host,
                }
            )
    for r in records:
        base = next((b for b in records if b["model"] == r["model"] and b["strategy"] == "single"), None)
        r["ratio_vs_single"] = r["cells_per_s"] / base["cells_per_s"] if base else None
    print(_format(records, host, nproc, global_batch, steps, warmup, device))
    write_records(records, json_path)
    return records


def _format(records, host, nproc, global_batch, steps, warmup, device) -> str:
    lines = [
        f"\nstep benchmark: built-in PBMC data, global batch {global_batch}, {steps} steps ({warmup} warm-up), "
        f"{nproc} processes for the sharded strategies, device {device}; {host['platform']}, "
        f"{host['cpu_count']} CPUs, {host['date']}",
        "cells/s = the whole job's; mem = peak per rank (GB; process RSS on CPU); x single = cells/s ratio\n",
    ]
    header = f"{'model':<8} {'strategy':<16} {'ranks':>5} {'cells/s':>9} {'x single':>8} {'mem GB/rank':>11}"
    lines += [header, "-" * len(header)]
    for r in records:
        ratio = "-" if r["ratio_vs_single"] is None else f"{r['ratio_vs_single']:.2f}"
        lines.append(
            f"{r['model']:<8} {r['strategy']:<16} {r['ranks']:>5} {r['cells_per_s']:>9,.0f} {ratio:>8} "
            f"{r['peak_mem_gb_per_rank']:>11.2f}"
        )
    return "\n".join(lines)


def gene_step(
    overrides: list[str], n_genes: int, n_cells: int, steps: int, warmup: int, device: str
) -> dict[str, float]:
    """Train a SetVAE for warmup + steps steps on one synthetic batch; the median step time and peak memory.

    Runs in the process that measures it (run_gene_sweep starts a fresh one per case), where the decoder sets
    host memory up as it does under `scldm-scale train` (host_memory.py).
    """
    import numpy as np
    import scipy.sparse as sp
    import torch

    from scldm_scale.config import load_config
    from scldm_scale.data.batch import collate
    from scldm_scale.models.vae import SetVAE
    from scldm_scale.train.flops import TRAIN_FLOPS_FACTOR, mfu, peak_tflops

    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    counts = sp.random(n_cells, n_genes, density=EXPRESSED_FRACTION, format="csr", random_state=rng, dtype=np.float32)
    counts.data = rng.integers(1, 20, counts.nnz).astype(np.float32)
    on_gpu = device.startswith("cuda")
    batch = collate(counts, {}).to(device)
    model = SetVAE(cfg.model, n_genes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu and cfg.train.precision != "fp32")
    seconds = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        with autocast:
            loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step_s = statistics.median(seconds[warmup:])
    chunk = model.decode_chunk(n_cells, n_genes)
    # MFU as the trainer counts it (train/flops.py): 3x the forward FLOPs of the batch's padded token count.
    flops_per_cell = TRAIN_FLOPS_FACTOR * model.forward_flops(batch.gene_ids.shape[1], n_genes, n_cells)
    return {
        "decode_chunk": chunk,
        "s_per_step": step_s,
        "cells_per_s": n_cells / step_s,
        "peak_mem_gb": peak / 1e9,
        "train_flops_per_cell": flops_per_cell,
        "mfu": mfu(flops_per_cell * n_cells / step_s, peak_tflops(device)),
    }


def gene_step_in_fresh_process(case: dict) -> dict[str, float]:
    """gene_step(**case) in a new Python process, so that its peak memory is its own; raises with its stderr."""
    code = "import json, sys; from scldm_scale.bench.step import gene_step; "
    code += "print(json.dumps(gene_step(**json.loads(sys.argv[1]))))"
    result = subprocess.run([sys.executable, "-c", code, json.dumps(case)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"gene step {case} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def run_gene_sweep(
    sizes: list[str],
    genes: list[int],
    n_cells: int,
    steps: int,
    warmup: int,
    json_path: str | None,
    device: str,
    overrides: list[str] = (),
) -> list[dict]:
    """gene_step for each VAE size, gene count and decoder setting (DECODERS), each in a fresh process."""
    unknown = [s for s in sizes if not s.startswith("vae") or s not in SIZES]
    if unknown or not genes or min(genes) < 1:
        raise ConfigError(
            f"the gene sweep takes VAE sizes ({[s for s in SIZES if s.startswith('vae')]}), got "
            f"{sizes}, and positive gene counts, got {genes}"
        )
    host = machine()
    records = []
    for size in sizes:
        for n_genes in genes:
            for decoder, setting in DECODERS.items():
                print(f"bench step: {size}, {n_genes:,} genes, decoder {decoder}", file=sys.stderr, flush=True)
                case = {
                    "overrides": [*SIZES[size], *overrides, f"model.decode_chunk_genes={setting}"],
                    "n_genes": n_genes,
                    "n_cells": n_cells,
                    "steps": steps,
                    "warmup": warmup,
                    "device": device,
                }
                measured = gene_step_in_fresh_process(case)
                record = {"model": size, "n_genes": n_genes, "decoder": decoder, "cells": n_cells, **measured}
                records.append({**record, "steps_measured": steps, "device": device, **host})
    print(_format_genes(records, host, n_cells, steps, warmup, device))
    write_records(records, json_path)
    return records


def _format_genes(records, host, n_cells, steps, warmup, device) -> str:
    memory = "process peak RSS" if device == "cpu" else "CUDA max allocated"
    lines = [
        f"\ngene sweep: one VAE training step on {n_cells} synthetic cells ({EXPRESSED_FRACTION:.0%} of the genes "
        f"expressed), median of {steps} steps after {warmup} warm-up, device {device}; {host['platform']}, "
        f"{host['cpu_count']} CPUs, load {host['load_avg_1m']:.1f}, {host['date']}",
        f"mem = {memory} (GB) of a fresh process per case; x first G = mem over the same decoder's smallest G\n",
    ]
    header = f"{'model':<6} {'genes':>7} {'decoder':<9} {'chunk':>6} {'cells/s':>9} {'s/step':>8} {'mem GB':>7} "
    header += f"{'x first G':>9}"
    lines += [header, "-" * len(header)]
    for r in records:
        first = next(b for b in records if b["model"] == r["model"] and b["decoder"] == r["decoder"])
        lines.append(
            f"{r['model']:<6} {r['n_genes']:>7,} {r['decoder']:<9} {r['decode_chunk']:>6,} {r['cells_per_s']:>9,.1f} "
            f"{r['s_per_step']:>8.3f} {r['peak_mem_gb']:>7.2f} {r['peak_mem_gb'] / first['peak_mem_gb']:>9.2f}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale bench step`."""
    models_help = f"comma-separated, of {','.join(SIZES)}"
    parser.add_argument("--models", type=comma_separated, default="vae-S,vae-M,prior-S,prior-M", help=models_help)
    strategies_help = f"comma-separated, of {','.join(STRATEGIES)}"
    parser.add_argument(
        "--strategies", type=comma_separated, default="single,fsdp,deepspeed-zero3", help=strategies_help
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes for the sharded strategies")
    parser.add_argument("--global-batch", type=int, default=128, help="cells per optimizer step, over all processes")
    parser.add_argument("--steps", type=int, default=12, help="training steps per case")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the averages")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    json_help = "also write the records to this JSON file (default: only print the table)"
    parser.add_argument("--json", default=None, help=json_help)
    parser.add_argument("--dir", default=None, help="run folders (default: a temp dir)")
    set_help = "config override of the gene sweep's model (repeatable; default: none)"
    genes_help = (
        "sweep these gene counts instead, e.g. 2000,8000,36000 (synthetic cells, chunked vs one-pass decoder; "
        "default: no sweep, the --models x --strategies grid)"
    )
    parser.add_argument("--genes", default=None, metavar="G,G", help=genes_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    add_overwrite(parser, "the records file at --json")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    claim_records(args.json, args.overwrite)
    if args.genes is not None:
        genes = parse_ints(args.genes, "--genes")
        sizes = [s for s in args.models if s.startswith("vae")]
        run_gene_sweep(sizes, genes, args.global_batch, args.steps, args.warmup, args.json, args.device, args.set)
        return
    run_step_bench(
        sizes=args.models,
        strategies=args.strategies,
        nproc=args.nproc,
        global_batch=args.global_batch,
        steps=args.steps,
        warmup=args.warmup,
        json_path=args.json,
        work_dir=args.dir,
        device=args.device,
    )
