"""`scldm-scale profile-kernels` and `scldm-scale profile-step`: torch.profiler traces and per-op time tables.

Both write a Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev) and print, and save next
to it, the `key_averages()` table sorted by self time: device time on CUDA, CPU time otherwise.

- profile-kernels: the fused kernels on one realistic shape — pooling and unpooling attention and the NB
  loss, forward and backward each under its own label — after one untraced call (Triton's autotuning and
  compilation). On the CPU (or with --smoke) tiny shapes under Triton's interpreter, one round: the labels'
  times are the interpreter's, which checks that the path works and says nothing about speed.
- profile-step: a few training steps of the config's stage, built and run by `run_training` itself (the
  same data, model, strategy, autocast and optimizer as `scldm-scale train`, either stage). The trainer's
  `on_step` callback advances the profiler after every optimizer step, so a traced step is the next batch's
  read and copy, forward, backward, clipping, optimizer, scheduler, EMA and logging. Profiler steps count
  from 0 (torch's convention), so `ProfilerStep#k` is training step k + 1. Not traced: the setup (data,
  model, for stage=ldm the VAE encoding the cells), the first `warmup` steps, and one step more, the
  profiler's own warm-up. Checkpoints go to a temporary folder and are discarded.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile, schedule

from scldm_scale.bench.kernels import DTYPES, add_kernel_shape_options, smoke_reason, use_triton_interpreter
from scldm_scale.bench.mcab_attention import SMOKE, attention_inputs
from scldm_scale.bench.nb_loss import nb_loss_inputs
from scldm_scale.config import (
    ConfigError,
    KernelShapeConfig,
    add_config_arguments,
    from_flags,
    load_config,
    split_config_args,
)
from scldm_scale.outputs import add_overwrite, claim_output
from scldm_scale.train.stages import run_training
from scldm_scale.world import get_rank, get_world_size, resolve_device


def _activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def _time_table(prof: profile, device: torch.device, top: int) -> str:
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=top)


def _kernel_cases(cells: int, heads: int, n_latents: int, genes: int, head_dim: int, dtype, device) -> list:
    """(label, forward, differentiable inputs, output gradient) of each kernel, on the benchmarks' inputs."""
    from scldm_kernels.mcab_attention import pooling_attention, unpooling_attention
    from scldm_kernels.nb_loss import nb_nll

    gen = torch.Generator(device=device).manual_seed(0)
    shape = (cells, heads)
    q, k, v, key_mask, pooled_grad = attention_inputs("pooling", *shape, n_latents, genes, head_dim, dtype, device, gen)
    pooling = [t.detach().requires_grad_() for t in (q, k, v)]
    q, k, v, _, unpooled_grad = attention_inputs("unpooling", *shape, genes, n_latents, head_dim, dtype, device, gen)
    unpooling = [t.detach().requires_grad_() for t in (q, k, v)]
    logits, library_size, log_theta, counts = nb_loss_inputs(cells, genes, dtype, device, gen, theta_per_cell=False)
    return [
        ("pooling_attention", lambda q, k, v: pooling_attention(q, k, v, key_mask), pooling, pooled_grad),
        ("unpooling_attention", unpooling_attention, unpooling, unpooled_grad),
        (
            "nb_nll",
            lambda z, t: nb_nll(z, library_size, t, counts),
            [logits, log_theta],
            torch.ones(cells, device=device),
        ),
    ]


def _run_case(label: str, forward: Callable, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> None:
    with record_function(f"{label} forward"):
        out = forward(*inputs)
    with record_function(f"{label} backward"):
        torch.autograd.grad(out, inputs, grad_out)


def profile_kernels(
    out_dir: str | Path,
    *,
    smoke: bool = KernelShapeConfig.smoke,
    cells: int = KernelShapeConfig.cells,
    heads: int = KernelShapeConfig.heads,
    n_latents: int = KernelShapeConfig.n_latents,
    genes: int = 20_000,
    head_dim: int = KernelShapeConfig.head_dim,
    dtype: str = KernelShapeConfig.dtype,
    reps: int = 3,
    top: int = 25,
) -> Path:
    """Trace `reps` rounds of every kernel's forward and backward; print the table; return the trace's path."""
    if dtype not in DTYPES or reps < 1:
        raise ConfigError(f"profile-kernels: dtype must be one of {list(DTYPES)} (got {dtype!r}) and reps >= 1")
    why_smoke = smoke_reason(smoke)
    if why_smoke is not None:
        use_triton_interpreter()
        shape, torch_dtype, device, reps = SMOKE, torch.float32, torch.device("cpu"), 1
    else:
        shape = {"cells": cells, "heads": heads, "n_latents": n_latents, "genes": genes, "head_dim": head_dim}
        torch_dtype, device = DTYPES[dtype], torch.device("cuda")
    from scldm_kernels._triton import kernel_unavailable_reason

    reason = kernel_unavailable_reason(torch.empty(0, device=device))
    if reason is not None:  # the ops would profile their PyTorch references instead
        raise ConfigError(f"profile-kernels: the Triton kernels cannot run here: {reason}")
    cases = _kernel_cases(**shape, dtype=torch_dtype, device=device)
    if why_smoke is None:  # autotuning and compilation stay out of the trace
        for case in cases:
            _run_case(*case)
        torch.cuda.synchronize(device)
    with profile(activities=_activities(device)) as prof:
        for _ in range(reps):
            for case in cases:
                _run_case(*case)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / "kernels_trace.json"
    prof.export_chrome_trace(str(trace))
    table = _time_table(prof, device, top)
    (out / "kernels_table.txt").write_text(table + "\n")
    what = ", ".join(f"{k}={v}" for k, v in shape.items())
    print(f"\nkernel profile on {device} ({what}, {str(torch_dtype).removeprefix('torch.')}, {reps} rounds)")
    if why_smoke is not None:
        print(f"SMOKE RUN ({why_smoke}): Triton kernels under TRITON_INTERPRET=1 on the CPU; times mean nothing")
    print(table)
    print(f"wrote {trace} and {out / 'kernels_table.txt'}")
    return trace


def profile_step(
    config_paths: list[str],
    overrides: list[str],
    out_dir: str | Path,
    *,
    steps: int = 5,
    warmup: int = 3,
    top: int = 25,
) -> Path:
    """Train the config's stage for warmup + steps + 1 steps, tracing `steps` of them; return the trace's path.

    Under torchrun with several processes every rank writes its own trace (step_trace_rank<R>.json); rank 0 prints.
    """
    if steps < 1 or warmup < 1:
        raise ConfigError(f"profile-step: --steps and --warmup must be >= 1 (got {steps}, {warmup})")
    out = Path(out_dir)
    this_rank = get_rank()
    suffix = f"_rank{this_rank}" if get_world_size() > 1 else ""
    trace, table_file = out / f"step_trace{suffix}.json", out / f"step_table{suffix}.txt"
    tables: list[str] = []
    with tempfile.TemporaryDirectory(prefix="scldm_profile_step_") as ckpt_dir:
        run = ["train.ckpt_every=0", "train.resume=never", f"train.ckpt_dir={ckpt_dir}"]
        cfg = load_config(config_paths, [*overrides, *run, f"train.max_steps={warmup + steps + 1}"])
        device = resolve_device(cfg.train.device)

        def save(prof: profile) -> None:
            out.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(trace))
            tables.append(_time_table(prof, device, top))

        # Profiler step 0 is the setup and training step 1, step k training step k + 1.
        plan = schedule(wait=warmup, warmup=1, active=steps, repeat=1)
        with profile(activities=_activities(device), schedule=plan, on_trace_ready=save) as prof:
            run_training(cfg, on_step=lambda step, record: prof.step())
    if not tables:
        raise RuntimeError(f"profile-step: the run ended before step {warmup + steps + 1}, so nothing was traced")
    table_file.write_text(tables[0] + "\n")
    if this_rank == 0:
        print(f"\ntraining-step profile: stage={cfg.stage} on {device}, {steps} steps traced after {warmup} untraced")
        print(tables[0])
        print(f"wrote {trace} and {table_file}")
    return trace


def add_kernels_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale profile-kernels`."""
    add_kernel_shape_options(parser)
    parser.add_argument("--genes", type=int, default=20_000, help="genes G")
    out_help = "folder for kernels_trace.json and kernels_table.txt"
    parser.add_argument("--out", default="profile_kernels", help=out_help)
    parser.add_argument("--reps", type=int, default=3, help="traced rounds of every kernel")
    parser.add_argument("--top", type=int, default=25, help="rows of the time table")
    add_overwrite(parser, "the trace and table in the folder at --out")
    parser.set_defaults(handle=handle_kernels)


def handle_kernels(args: argparse.Namespace) -> None:
    claim_output(args.out, "a kernel profile", "--out", args.overwrite, folder=True)
    shape = asdict(from_flags(KernelShapeConfig, args))
    profile_kernels(args.out, genes=args.genes, reps=args.reps, top=args.top, **shape)


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale profile-step`."""
    add_config_arguments(parser)
    parser.add_argument("--out", default="profile_step", help="folder for step_trace.json and step_table.txt")
    parser.add_argument("--steps", type=int, default=5, help="traced training steps")
    parser.add_argument("--warmup", type=int, default=3, help="untraced training steps before them")
    parser.add_argument("--top", type=int, default=25, help="rows of the time table")
    add_overwrite(parser, "the traces and tables in the folder at --out")
    parser.set_defaults(handle=handle_step)


def handle_step(args: argparse.Namespace) -> None:
    claim_output(args.out, "a training-step profile", "--out", args.overwrite, folder=True)
    paths, overrides = split_config_args(args.configs)
    profile_step(paths, overrides, args.out, steps=args.steps, warmup=args.warmup, top=args.top)
