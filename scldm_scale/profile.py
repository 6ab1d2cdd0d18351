"""`scldm-scale profile-kernels` and `scldm-scale profile-step`: torch.profiler traces and per-op time tables.

Both write a Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev) and print, and save next
to it, the `key_averages()` table sorted by self time: device time on CUDA, CPU time otherwise.

- profile-kernels: the fused kernels on one realistic shape — pooling and unpooling attention and the NB
  loss, forward and backward each under its own label — after one untraced call (Triton's autotuning and
  compilation). On the CPU (or with --smoke) tiny shapes under Triton's interpreter, one round: the labels'
  times are the interpreter's, which checks that the path works and says nothing about speed.
- profile-step: a few training steps of the config's stage, built and run by `run_training` itself (the
  same data, model, strategy, autocast and optimizer as `scldm-scale train`, either stage). Steps are cut
  where the model's forward starts, so a traced step is forward, backward, clipping, optimizer, scheduler,
  EMA, logging and the next batch's read and copy. The first `warmup` steps are not traced, nor is the
  setup before them (data, model, for stage=ldm the VAE encoding the cells); one step more runs after the
  traced ones, to close the last. Checkpoints go to a temporary folder and are discarded.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile, schedule

from scldm_scale.bench.kernels import DTYPES, smoke_reason, use_triton_interpreter
from scldm_scale.config import load_config
from scldm_scale.models.prior import FlowMatchingPrior
from scldm_scale.models.vae import SetVAE
from scldm_scale.train.stages import run_training
from scldm_scale.train.trainer import resolve_device
from scldm_scale.world import get_rank, get_world_size

# cells, heads, latent tokens, genes, head dim: a few interpreter launches per op
SMOKE_SHAPE = {"cells": 2, "heads": 2, "n_latents": 4, "genes": 40, "head_dim": 16}


def _activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def _time_table(prof: profile, device: torch.device, top: int) -> str:
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=top)


def _kernel_cases(cells: int, heads: int, n_latents: int, genes: int, head_dim: int, dtype, device) -> list:
    """(label, forward, differentiable inputs, output gradient) of each kernel, on random inputs."""
    from scldm_kernels.mcab_attention import pooling_attention, unpooling_attention
    from scldm_kernels.nb_loss import nb_nll

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    def heads_of(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (heads, head_dim))  # (..., L, H, D)

    def key_value(n_cells: int, length: int) -> list[torch.Tensor]:
        kv = randn(n_cells, length, 2 * heads * head_dim)  # the fused K/V projection's output
        return [heads_of(t).requires_grad_() for t in kv.chunk(2, dim=-1)]  # (B, L, H, D) views

    lengths = torch.randint(genes // 2, genes + 1, (cells, 1), generator=gen, device=device)
    key_mask = torch.arange(genes, device=device)[None] < lengths  # (B, G): cells express different genes
    latent_queries = heads_of(randn(1, n_latents, heads * head_dim)).requires_grad_()  # (1, M, H, D), shared
    gene_queries = heads_of(randn(1, genes, heads * head_dim)).requires_grad_()  # (1, G, H, D), shared
    logits = randn(cells, genes).requires_grad_()  # (B, G)
    log_theta = randn(genes).requires_grad_()  # (G,)
    library_size = torch.full((cells,), 1e4, device=device)  # (B,)
    counts = torch.poisson(torch.rand(cells, genes, generator=gen, device=device) * 2.0, generator=gen)  # (B, G)
    pooled_grad = randn(cells, n_latents, heads, head_dim)  # (B, M, H, D)
    unpooled_grad = randn(cells, genes, heads, head_dim)  # (B, G, H, D)
    pooling_kv, unpooling_kv = key_value(cells, genes), key_value(cells, n_latents)
    return [
        (
            "pooling_attention",
            lambda q, k, v: pooling_attention(q, k, v, key_mask),
            [latent_queries, *pooling_kv],
            pooled_grad,
        ),
        ("unpooling_attention", unpooling_attention, [gene_queries, *unpooling_kv], unpooled_grad),
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
    smoke: bool = False,
    cells: int = 256,
    heads: int = 8,
    n_latents: int = 32,
    genes: int = 20_000,
    head_dim: int = 64,
    dtype: str = "bf16",
    reps: int = 3,
    top: int = 25,
) -> Path:
    """Trace `reps` rounds of every kernel's forward and backward; print the table; return the trace's path."""
    if dtype not in DTYPES or reps < 1:
        raise ValueError(f"profile-kernels: dtype must be one of {list(DTYPES)} (got {dtype!r}) and reps >= 1")
    why_smoke = smoke_reason(smoke)
    if why_smoke is not None:
        use_triton_interpreter()
        shape, torch_dtype, device, reps = SMOKE_SHAPE, torch.float32, torch.device("cpu"), 1
    else:
        shape = {"cells": cells, "heads": heads, "n_latents": n_latents, "genes": genes, "head_dim": head_dim}
        torch_dtype, device = DTYPES[dtype], torch.device("cuda")
    from scldm_kernels._triton import kernel_unavailable_reason

    reason = kernel_unavailable_reason(torch.empty(0, device=device))
    if reason is not None:  # the ops would profile their PyTorch references instead
        raise ValueError(f"profile-kernels: the Triton kernels cannot run here: {reason}")
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
        raise ValueError(f"profile-step: --steps and --warmup must be >= 1 (got {steps}, {warmup})")
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

        # Profiler step 0 is the setup, step k the training step that starts with the k-th forward.
        plan = schedule(wait=warmup, warmup=1, active=steps, repeat=1)
        model_type = SetVAE if cfg.stage == "vae" else FlowMatchingPrior
        with profile(activities=_activities(device), schedule=plan, on_trace_ready=save) as prof:
            with _StepAtEachForward(prof, model_type, cfg.train.grad_accum_steps):
                run_training(cfg)
    if not tables:
        raise RuntimeError(f"profile-step: no {model_type.__name__} forward ran, so nothing was traced")
    table_file.write_text(tables[0] + "\n")
    if this_rank == 0:
        print(f"\ntraining-step profile: stage={cfg.stage} on {device}, {steps} steps traced after {warmup} untraced")
        print(tables[0])
        print(f"wrote {trace} and {table_file}")
    return trace


class _StepAtEachForward:
    """Calls prof.step() where the stage's model starts its forward, once per optimizer step (every
    grad_accum_steps forwards). A global forward pre-hook finds the model's first call and hands over to a
    hook on that module alone, so no other module (compiled blocks included) runs ours."""

    def __init__(self, prof: profile, model_type: type, grad_accum_steps: int):
        self.prof, self.model_type, self.every = prof, model_type, grad_accum_steps
        self.forwards = 0
        self.handles: list = []

    def _on_forward(self, module, args) -> None:
        if self.forwards % self.every == 0:
            self.prof.step()
        self.forwards += 1

    def _find_model(self, module, args) -> None:
        # Module.__call__ iterates over a copy of the hooks: removing this one here is safe, and the module's
        # own hook starts with its next call, so this call is counted by hand.
        if isinstance(module, self.model_type) and self.forwards == 0:
            self.handles.pop().remove()
            self.handles.append(module.register_forward_pre_hook(self._on_forward))
            self._on_forward(module, args)

    def __enter__(self) -> _StepAtEachForward:
        self.handles.append(torch.nn.modules.module.register_module_forward_pre_hook(self._find_model))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
