"""`scldm-scale bench gpu`: the whole GPU check in one call (issue 16), within a few minutes of a lent GPU.

Five steps, each in its own process with its own time budget (a step past it is killed and the next one runs),
each writing its records as they come (a killed step keeps what it finished). In the order they run:

1. `correctness`: the Triton kernels compiled for the GPU (TRITON_INTERPRET=0) against their float64
   PyTorch references (`attention_reference`, `nb_nll_reference`), output and every gradient, fp32 and bf16,
   on the kernel tests' awkward shapes (off every block size, one key, forced splits) and model-sized ones.
   Kernel buffers are NaN-poisoned; a fallback to the reference counts as a failure. Tolerances as in
   tests/kernels: relative error 1e-4 in fp32 (NB loss: or twice eager fp32's error), 1e-2 in bf16.
2. `vae_step`: `bench step`'s `gene_step`, each case in a fresh process: d_model 512, 256 cells, 8,000 genes
   (chunked decoder; one pass too) and 36,000 genes (chunked), attention_backend x nb_loss_backend in
   torch/triton: cells/s, peak memory, MFU.
3. `prior_generation`: DiT prior training steps (cells/s, peak memory, MFU) and generation through
   `generate.Generator.sample` (10,000 cells, 8,000 genes, Heun 50 steps, guidance weight 2) on randomly
   initialised models: the speed of the real path; the counts mean nothing.
4. `train_curves`: the small VAE trained from one seed on the same synthetic batches with the torch and the
   Triton backends; the two loss curves compared (bf16 autocast on a GPU).
5. `kernels`: `bench kernels` (`run_kernel_bench`) at its documented shapes, one gene count at a time, and
   the autotuner's pick for every kernel and key it saw. Last, because compiling FlexAttention is slow: it
   gets whatever the total budget has left.

The output folder gets one JSON per step (`<step>.json`), `results.json` (every step, its status and records),
`report.md` (the tables, the issue's targets first) and `run.log` (everything the steps printed): 8 files.
`--smoke`: Triton's interpreter on the CPU, tiny shapes, every step end to end (tests/bench/test_gpu_check.py);
its times mean nothing. The modules it imports need torch, Triton, numpy, scipy, pandas, omegaconf,
safetensors, torchdiffeq and tqdm, not anndata, scanpy or tiledbsoma (a bare GPU machine; launch/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# In the order they run: `kernels` last, since FlexAttention's compilation makes it the one that can use
# every second left (one gene count at a time, the most telling first).
STEPS = ("correctness", "vae_step", "prior_generation", "train_curves", "kernels")
# Seconds per step on a GPU, at most; the total (--budget-s, default 7 minutes, so that one call with the
# start-up fits the issue's 8) cuts the last steps short.
BUDGET_S = {"correctness": 90, "vae_step": 120, "prior_generation": 60, "train_curves": 50, "kernels": 420}
SMOKE_BUDGET_S = 240
# The VAE of the step benchmark and of generation (d_model 512), and the prior (bench step's prior-M).
VAE_512 = ["model.d_model=512", "model.n_heads=8", "model.n_cross_heads=8", "model.n_layers=4"]
PRIOR_M = ["prior.d_model=512", "prior.n_heads=8", "prior.n_layers=8"]
SMALL_VAE = ["model.d_model=64", "model.n_heads=4", "model.n_cross_heads=4", "model.n_layers=2"]  # bench step's vae-S
TINY = ["model.d_model=16", "model.n_heads=2", "model.n_cross_heads=2", "model.n_layers=1", "model.n_latent_tokens=4"]
TINY += ["model.latent_dim=8", "prior.d_model=32", "prior.n_heads=2", "prior.n_layers=1"]
BACKENDS = {"torch": [], "triton": ["model.attention_backend=triton", "model.nb_loss_backend=triton"]}
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}
# Loss curves of the two backends agree when the median per-step relative difference and that of the mean
# loss over the last fifth of the steps are both below this (bf16 rounds to 2^-8 = 4e-3 relative per op).
CURVE_TOLERANCE = 2e-2
TARGETS = {"attention_speedup": 1.5, "attention_roofline_pct": 60.0, "nb_speedup": 5.0, "nb_memory_ratio": 0.1}
TARGETS |= {"vae_mfu": 0.35, "generation_cells_per_s": 1300.0}


# ---------------------------------------------------------------------------------------------------------
# Records written as they come
# ---------------------------------------------------------------------------------------------------------


class Recorder:
    """A step's records, rewritten whole (atomically) to its JSON file after each one."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.records, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)
        print(f"[{self.path.stem}] {json.dumps(record, default=str)[:400]}", flush=True)


def _device(smoke: bool):
    import torch

    return torch.device("cpu" if smoke else "cuda")


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------
# Step 1: correctness of the compiled kernels against the float64 references
# ---------------------------------------------------------------------------------------------------------

# (op, B, H, Lq, Lk, D, shared q, key mask, num_splits): the kernel tests' awkward cases, then model-sized ones.
ATTENTION_CASES = [
    ("pooling", 3, 2, 5, 37, 6, True, True, None),
    ("pooling", 2, 3, 1, 50, 16, False, True, 3),
    ("pooling", 2, 1, 7, 1, 3, True, False, None),
    ("unpooling", 3, 2, 37, 5, 6, True, True, None),
    ("unpooling", 2, 3, 21, 1, 16, False, False, 2),
    ("unpooling", 3, 1, 40, 3, 8, True, False, 2),
]
# Model-sized: the VAE's and `bench kernels`' head width 64, several thousand genes; autotuned (on a GPU each new
# autotune key compiles and times every config: the costly cases, so few of them). The small cases above run
# with each kernel's first config alone (the smallest block: several blocks per row even at their sizes).
ATTENTION_CASES_GPU = [
    ("pooling", 4, 8, 32, 8191, 64, True, True, None),
    ("unpooling", 4, 8, 8191, 32, 64, True, False, None),
    ("pooling", 3, 4, 17, 3001, 48, False, True, 5),
    ("unpooling", 3, 4, 3001, 17, 48, True, True, 3),
]
# (B, H, Lq, Lk, E): folded pooling (keys and values are the tokens, shared by the heads).
FOLDED_CASES = [(3, 2, 5, 37, 24)]
FOLDED_CASES_GPU = [(4, 8, 16, 4099, 512)]
NB_SHAPES = [(1, 1), (1, 67), (3, 130), (7, 33), (2, 301)]
NB_SHAPES_GPU = [(256, 8000), (37, 36001)]


def _relative_error(out, ref, scale=None) -> float:
    """‖out − ref‖ / ‖ref‖ (or / scale); inf when out holds a NaN or an infinity."""
    import torch

    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    denominator = ref.norm() if scale is None else scale.double()
    return ((out - ref).norm() / denominator.clamp_min(1e-30)).item()


def _attention_case(op: str, case: tuple, dtype, device, seed: int) -> dict:
    import torch
    from scldm_kernels import _triton
    from scldm_kernels import mcab_attention as ma

    gen = torch.Generator().manual_seed(seed)
    if op == "folded":
        bsz, heads, len_q, len_k, width = case
        q = torch.randn(1, len_q, heads, width, generator=gen).to(dtype)
        x = torch.randn(bsz, len_k, width, generator=gen).to(dtype)
        mask = torch.rand(bsz, len_k, generator=gen) < 0.7
        mask[:, 0] = True
        grad_out = torch.randn(bsz, len_q, heads, width, generator=gen).to(dtype)
        inputs, scale, splits = (q, x), (width // heads) ** -0.5, None
    else:
        bsz, heads, len_q, len_k, head_dim, shared_q, masked, splits = case
        q = torch.randn(1 if shared_q else bsz, len_q, heads, head_dim, generator=gen).to(dtype)
        kv = torch.randn(bsz, len_k, 2 * heads * head_dim, generator=gen).to(dtype)
        mask = None
        if masked:
            mask = torch.rand(bsz, len_k, generator=gen) < 0.7
            mask[torch.arange(bsz), torch.randint(0, len_k, (bsz,), generator=gen)] = True
        grad_out = torch.randn(bsz, len_q, heads, head_dim, generator=gen).to(dtype)
        inputs, scale = (kv, q), None
    inputs = tuple(t.to(device) for t in inputs)
    mask = None if mask is None else mask.to(device)
    grad_out = grad_out.to(device)

    def views(leaves):  # k and v as the model has them: the two halves of one fused projection
        if op == "folded":
            q, x = leaves
            return q, ma._tokens_as_heads(x, q.shape[2]), ma._tokens_as_heads(x, q.shape[2])
        kv, q = leaves
        k, v = (t.unflatten(-1, (q.shape[2], q.shape[3])) for t in kv.chunk(2, dim=-1))
        return q, k, v

    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    q, k, v = views(leaves)
    reason = _triton.kernel_unavailable_reason(*leaves)
    if op == "folded":
        out = ma.folded_pooling_attention(leaves[0], leaves[1], mask, scale=scale, num_splits=splits)
    else:
        function = ma.pooling_attention if op == "pooling" else ma.unpooling_attention
        out = function(q, k, v, mask, scale=scale, num_splits=splits)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = ma.attention_reference(*views(ref_leaves), mask, scale)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    names = ("out", "dq", "dx") if op == "folded" else ("out", "dkv", "dq")
    errors = {}
    for name, got, want in zip(names, (out, *grads), (ref, *ref_grads), strict=True):
        # One key: the softmax is constant and dq, dk vanish identically; measured against ‖dO‖ then.
        one_key = op != "folded" and case[3] == 1 and name in ("dq", "dkv")
        errors[name] = _relative_error(got, want, grad_out.norm() if one_key else None)
    tol = TOLERANCE[str(dtype).removeprefix("torch.")]
    worst = max(errors.values())
    return {
        "errors": errors,
        "max_error": worst,
        "tolerance": tol,
        "fallback": reason,
        "ok": worst < tol and not reason,
    }


def _nb_case(n_cells: int, n_genes: int, per_cell_theta: bool, dtype, device, seed: int) -> dict:
    import numpy as np
    import torch
    from scldm_kernels import _triton
    from scldm_kernels.nb_loss import nb_nll, nb_nll_reference

    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((n_cells, n_genes))
    library = rng.uniform(5e2, 5e3, n_cells)
    log_theta = rng.uniform(-2.0, 3.0, (n_cells, n_genes) if per_cell_theta else n_genes)
    noisy = logits + 0.5 * rng.standard_normal((n_cells, n_genes))
    mu = library[:, None] * np.exp(noisy) / np.exp(noisy).sum(-1, keepdims=True)
    theta = np.exp(log_theta)
    counts = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float32)
    logits_t = torch.from_numpy(logits).to(dtype).to(device).requires_grad_()
    log_theta_t = torch.from_numpy(log_theta).to(dtype).to(device).requires_grad_()
    library_t = torch.from_numpy(library).float().to(device)
    counts_t = torch.from_numpy(counts).to(device)
    weights = torch.from_numpy(rng.standard_normal(n_cells)).to(device)  # float64

    reason = _triton.kernel_unavailable_reason(logits_t, library_t, log_theta_t, counts_t)
    out = nb_nll(logits_t, library_t, log_theta_t, counts_t)
    (out * weights.float()).sum().backward()
    leaves64 = [t.detach().double().requires_grad_() for t in (logits_t, log_theta_t)]
    ref = nb_nll_reference(leaves64[0], library_t.double(), leaves64[1], counts_t.double())
    (ref * weights).sum().backward()
    eager_leaves = [t.detach().float().requires_grad_() for t in (logits_t, log_theta_t)]
    eager = nb_nll_reference(eager_leaves[0], library_t, eager_leaves[1], counts_t)
    (eager * weights.float()).sum().backward()
    errors, bounds = {}, {}
    tol = TOLERANCE[str(dtype).removeprefix("torch.")]
    for name, got, want, baseline in (
        ("nll", out, ref, eager),
        ("d logits", logits_t.grad, leaves64[0].grad, eager_leaves[0].grad),
        ("d log theta", log_theta_t.grad, leaves64[1].grad, eager_leaves[1].grad),
    ):
        errors[name] = _relative_error(got, want)
        # fp32: where no fp32 computation gets within 1e-4 (ill-conditioned d log theta), twice eager's error.
        bounds[name] = max(tol, 2 * _relative_error(baseline, want)) if dtype == torch.float32 else tol
    ok = all(errors[n] < bounds[n] for n in errors) and not reason
    return {"errors": errors, "max_error": max(errors.values()), "tolerance": max(bounds.values()), "fallback": reason,
            "ok": ok}  # fmt: skip


def step_correctness(rec: Recorder, smoke: bool) -> None:
    import torch
    from scldm_kernels import mcab_attention as ma
    from scldm_kernels import nb_loss

    device = _device(smoke)

    def nan_filled(shape, dtype, device):  # an element a kernel forgets to write cannot pass
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    ma._empty = nan_filled
    nb_loss._new_buffer = nan_filled
    small = (
        (ATTENTION_CASES[::2], FOLDED_CASES, NB_SHAPES[2:4]) if smoke else (ATTENTION_CASES, FOLDED_CASES, NB_SHAPES)
    )
    sets = [(False, torch.float32, *small), (False, torch.bfloat16, *small)]  # (autotuned, dtype, cases)
    if not smoke:  # model-sized, bf16 first (what training runs)
        model_sized = (ATTENTION_CASES_GPU, FOLDED_CASES_GPU, NB_SHAPES_GPU)
        sets += [(True, torch.bfloat16, *model_sized), (True, torch.float32, *model_sized)]
    cases: list[tuple[str, Callable[[], dict], dict]] = []
    for seed, (autotuned, dtype, attention, folded, nb_shapes) in enumerate(sets):
        meta = {"dtype": str(dtype).removeprefix("torch."), "autotuned": autotuned}
        for i, case in enumerate(attention):
            _, b, h, lq, lk, d, shared_q, masked, splits = case
            shape = f"B{b} H{h} Lq{lq} Lk{lk} D{d} q{'1' if shared_q else 'B'}{' mask' if masked else ''}"
            shape += f" splits {splits}" if splits else ""
            run = functools.partial(_attention_case, case[0], case[1:], dtype, device, seed * 100 + i)
            cases.append((case[0], run, {**meta, "shape": shape}))
        for i, case in enumerate(folded):
            run = functools.partial(_attention_case, "folded", case, dtype, device, seed * 100 + 50 + i)
            cases.append(("folded_pooling", run, {**meta, "shape": "B{} H{} Lq{} Lk{} E{}".format(*case)}))
        for i, (cells, genes) in enumerate(nb_shapes):
            for per_cell in (False, True):
                run = functools.partial(_nb_case, cells, genes, per_cell, dtype, device, seed * 100 + 70 + i)
                theta = "cell" if per_cell else "gene"
                cases.append(("nb_loss", run, {**meta, "shape": f"B{cells} G{genes} theta/{theta}"}))
    for op, run, meta in cases:
        start = time.perf_counter()
        try:
            with _first_config_only(not meta["autotuned"]):
                result = run()
        except Exception as error:  # a case that raises is a failed case, the others still run
            result = {"ok": False, "error": f"{type(error).__name__}: {str(error).strip()[:300]}"}
        rec.add({"op": op, **meta, **result, "seconds": round(time.perf_counter() - start, 3)})


def _autotuners() -> list:
    """(name, triton Autotuner) of every autotuned kernel of scldm_kernels."""
    from scldm_kernels import mcab_attention, nb_loss

    found = []
    for module in (mcab_attention, nb_loss):
        for name, obj in sorted(vars(module).items()):
            if isinstance(getattr(obj, "cache", None), dict) and hasattr(obj, "configs"):
                found.append((name, obj))
    return found


@contextlib.contextmanager
def _first_config_only(enabled: bool):
    """Within: each autotuned kernel runs its first config, untimed (one compilation per specialization)."""
    saved = [(tuner, tuner.configs) for _, tuner in _autotuners()] if enabled else []
    for tuner, configs in saved:
        tuner.configs = configs[:1]
    try:
        yield
    finally:
        for tuner, configs in saved:
            tuner.configs = configs


# ---------------------------------------------------------------------------------------------------------
# Step 2: bench kernels, and the autotuner's picks
# ---------------------------------------------------------------------------------------------------------

KERNEL_GENES = (8192, 20000, 2048)  # `bench kernels`'s default --genes, the model-sized ones first


def autotune_picks() -> list[dict]:
    """The config each autotuned kernel chose, per autotune key (shape bucket, dtype), as the autotuner cached it
    (none under the interpreter, which is given a single config)."""
    picks = []
    for name, tuner in _autotuners():
        for key, config in tuner.cache.items():
            picks.append({"kernel": name, "key": [str(k) for k in key], "config": str(config)})
    return picks


def step_kernels(rec: Recorder, smoke: bool) -> None:
    from scldm_scale.bench.kernels import run_kernel_bench

    for genes in KERNEL_GENES[:1] if smoke else KERNEL_GENES:
        for record in run_kernel_bench(genes=[genes], smoke=smoke):
            rec.add({"kind": "bench", **record})
        rec.add({"kind": "autotune", "after_genes": genes, "picks": autotune_picks()})


# ---------------------------------------------------------------------------------------------------------
# Step 3: the VAE training step (bench step's gene_step)
# ---------------------------------------------------------------------------------------------------------


def vae_cases(smoke: bool) -> list[dict]:
    """(genes, decoder, attention backend, NB backend) in the order they are worth the lease's seconds."""
    combos = [("torch", "torch"), ("triton", "triton")]
    if smoke:
        return [{"genes": 32, "decoder": "chunked", "attention": a, "nb_loss": n} for a, n in combos]
    cases = [{"genes": 8000, "decoder": "chunked", "attention": a, "nb_loss": n} for a, n in combos]
    cases += [{"genes": 36000, "decoder": "chunked", "attention": a, "nb_loss": n} for a, n in combos]
    cases += [{"genes": 8000, "decoder": "chunked", "attention": a, "nb_loss": n} for a, n in (("triton", "torch"),)]
    cases += [{"genes": 8000, "decoder": "chunked", "attention": "torch", "nb_loss": "triton"}]
    cases += [{"genes": 8000, "decoder": "one pass", "attention": a, "nb_loss": n} for a, n in combos]
    cases += [{"genes": 8000, "decoder": "chunked", "attention": "triton+fold", "nb_loss": "triton"}]
    return cases


def step_vae(rec: Recorder, smoke: bool) -> None:
    from scldm_scale.bench.step import DECODERS, gene_step_in_fresh_process

    cells, steps, warmup = (4, 1, 0) if smoke else (256, 6, 2)
    for case in vae_cases(smoke):
        attention = case["attention"].split("+")[0]
        overrides = [*(TINY if smoke else VAE_512), f"model.attention_backend={attention}"]
        overrides += [
            f"model.nb_loss_backend={case['nb_loss']}",
            f"model.decode_chunk_genes={DECODERS[case['decoder']]}",
        ]
        if case["attention"].endswith("+fold"):
            overrides.append("model.fold_pooling=true")
        run = {"overrides": overrides, "n_genes": case["genes"], "n_cells": cells, "steps": steps, "warmup": warmup}
        run["device"] = "cpu" if smoke else "cuda"
        try:
            measured = gene_step_in_fresh_process(run)
        except Exception as error:  # out of memory, say: a result, the next case still runs
            measured = {"error": str(error).strip().splitlines()[-1][:300]}
        rec.add({**case, "cells": cells, "d_model": 16 if smoke else 512, "steps": steps, "warmup": warmup, **measured})


# ---------------------------------------------------------------------------------------------------------
# Step 4: the DiT prior's training step, and generation
# ---------------------------------------------------------------------------------------------------------


def _timed_steps(loss_fn: Callable[[int], Any], params, steps: int, warmup: int, device, bf16: bool) -> tuple:
    """warmup + steps AdamW steps of loss_fn(step); (per-step losses, median seconds of the timed steps)."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses, seconds = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronizes
        seconds.append(time.perf_counter() - start)
    return losses, statistics.median(seconds[warmup:]) if steps else None


def _generator(cfg, n_genes: int, n_types: int, device):
    """A generate.Generator of randomly initialised models: the real sampling path, meaningless counts."""
    import numpy as np
    import torch

    from scldm_scale.data.batch import LabelEncoder
    from scldm_scale.data.vocab import GeneVocabulary
    from scldm_scale.generate import Generator
    from scldm_scale.models.dit import DiT
    from scldm_scale.models.library_size import LibrarySizeModel
    from scldm_scale.models.vae import SetVAE

    torch.manual_seed(0)
    types = [f"type_{i}" for i in range(n_types)]
    m, latent_dim = cfg.model.n_latent_tokens, cfg.model.latent_dim
    rng = np.random.default_rng(0)
    library = LibrarySizeModel.fit(rng.lognormal(8.0, 0.5, 100 * n_types), {"cell_type": np.repeat(types, 100)})
    return Generator(
        vae=SetVAE(cfg.model, n_genes).to(device).eval(),
        dit=DiT(cfg.prior, m, latent_dim, {"cell_type": n_types}).to(device).eval(),
        encoders={"cell_type": LabelEncoder("cell_type", types)},
        library_size=library,
        latent_mean=torch.zeros(m, latent_dim, device=device),
        latent_std=torch.ones(m, latent_dim, device=device),
        genes=GeneVocabulary([f"gene_{i}" for i in range(n_genes)]),
        guidance_mode="compositional",
        device=device,
    )


def _prior_step(cfg, batch_size: int, n_types: int, device, smoke: bool) -> dict:
    """Training steps of the flow-matching DiT prior on random latents: cells/s, peak memory, MFU."""
    import torch

    from scldm_scale.models.dit import DiT
    from scldm_scale.models.prior import FlowMatchingPrior, LatentBatch
    from scldm_scale.train.flops import TRAIN_FLOPS_FACTOR, dit_forward_flops, mfu, peak_tflops

    m, latent_dim = cfg.model.n_latent_tokens, cfg.model.latent_dim
    flops_per_cell = TRAIN_FLOPS_FACTOR * dit_forward_flops(cfg.prior, m, latent_dim)
    steps, warmup = (1, 1) if smoke else (10, 3)
    torch.manual_seed(0)
    prior = FlowMatchingPrior(DiT(cfg.prior, m, latent_dim, {"cell_type": n_types}), 0.2, "independent").to(device)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch_size, m, latent_dim, generator=gen)
    batch = LatentBatch(latents, {"cell_type": torch.randint(0, n_types, (batch_size,), generator=gen)}).to(device)
    _peak_reset(device)
    try:
        _, step_s = _timed_steps(lambda _: prior(batch)[0], prior.parameters(), steps, warmup, device, not smoke)
    except Exception as error:  # out of memory, say
        return {"error": f"{type(error).__name__}: {str(error).strip()[:300]}"}
    cells_per_s = batch_size / step_s
    return {
        "cells_per_s": cells_per_s,
        "s_per_step": step_s,
        "peak_mem_gb": _peak_gb(device),
        "train_flops_per_cell": flops_per_cell,
        "mfu": mfu(flops_per_cell * cells_per_s, peak_tflops(device)),
    }


def step_prior_generation(rec: Recorder, smoke: bool) -> None:
    import numpy as np

    from scldm_scale.config import SampleConfig, load_config

    device = _device(smoke)
    cfg = load_config(None, TINY if smoke else [*VAE_512, *PRIOR_M])
    m, latent_dim, n_types = cfg.model.n_latent_tokens, cfg.model.latent_dim, 10
    for batch_size in (8,) if smoke else (256, 4096):
        record = {"what": "prior step", "cells": batch_size, "d_model": cfg.prior.d_model, "layers": cfg.prior.n_layers}
        rec.add({**record, "tokens": f"{m}x{latent_dim}", **_prior_step(cfg, batch_size, n_types, device, smoke)})

    n_genes, n_cells = (64, 16) if smoke else (8000, 10_000)
    sampler = SampleConfig(method="heun", n_steps=2 if smoke else 50)
    generator = _generator(cfg, n_genes, n_types, device)
    labels = np.resize(np.array(generator.encoders["cell_type"].values, dtype=object), n_cells)
    guidance = {"cell_type": 2.0}
    try:
        # Warm-up: kernels compile and cuDNN/cuBLAS pick their algorithms outside the timed run.
        warm = {"cell_type": labels[:256]}
        generator.sample(min(n_cells, 256), warm, guidance, SampleConfig(n_steps=1), progress=False)
        _peak_reset(device)
        start = time.perf_counter()
        counts = generator.sample(n_cells, {"cell_type": labels}, guidance, sampler, seed=0, progress=False)
        _sync(device)
        seconds = time.perf_counter() - start
        measured = {"cells_per_s": n_cells / seconds, "seconds": seconds, "peak_mem_gb": _peak_gb(device)}
        measured["nonzero_fraction"] = counts.nnz / (n_cells * n_genes)
    except Exception as error:
        measured = {"error": f"{type(error).__name__}: {str(error).strip()[:300]}"}
    rec.add(
        {"what": "generation", "cells": n_cells, "genes": n_genes, "method": sampler.method, "n_steps": sampler.n_steps,
         "guidance": guidance, "ode_batch": sampler.batch_size, "vae_d_model": cfg.model.d_model,
         "prior_d_model": cfg.prior.d_model, "attention_backend": cfg.model.attention_backend, **measured}
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Step 5: the small VAE trained with both backends from one seed
# ---------------------------------------------------------------------------------------------------------


def _synthetic_batches(n_batches: int, cells: int, genes: int, n_types: int, device) -> list:
    """Seeded NB-like counts with a mean profile per cell type, collated as the loaders collate them."""
    import numpy as np
    import scipy.sparse as sp

    from scldm_scale.data.batch import collate

    rng = np.random.default_rng(0)
    profiles = rng.gamma(0.3, 2.0, (n_types, genes))  # (T, G) mean counts, uneven as real genes
    batches = []
    for _ in range(n_batches):
        types = rng.integers(0, n_types, cells)
        mu = profiles[types] * rng.lognormal(0.0, 0.3, (cells, 1))  # (B, G)
        counts = rng.poisson(rng.gamma(2.0, mu / 2.0)).astype(np.float32)  # gamma-Poisson: NB with theta 2
        counts[counts.sum(1) == 0, 0] = 1
        batches.append(collate(sp.csr_matrix(counts), {}).to(device))
    return batches


def curve_agreement(a: list[float], b: list[float]) -> dict:
    """Per-step relative differences of two loss curves, and of their means over the last fifth of the steps."""
    diffs = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True)]
    tail = max(1, len(a) // 5)
    mean_a, mean_b = statistics.fmean(a[-tail:]), statistics.fmean(b[-tail:])
    tail_diff = abs(mean_a - mean_b) / max(abs(mean_a), 1e-12)
    median = statistics.median(diffs)
    return {
        "median_step_rel_diff": median,
        "max_step_rel_diff": max(diffs),
        "final_mean_rel_diff": tail_diff,
        "tolerance": CURVE_TOLERANCE,
        "agree": median < CURVE_TOLERANCE and tail_diff < CURVE_TOLERANCE,
    }


def step_train_curves(rec: Recorder, smoke: bool) -> None:
    import torch

    from scldm_scale.config import load_config
    from scldm_scale.models.vae import SetVAE

    device = _device(smoke)
    steps, cells, genes = (3, 4, 32) if smoke else (150, 256, 2000)
    batches = _synthetic_batches(min(steps, 30), cells, genes, 6, device)
    curves = {}
    for name, overrides in BACKENDS.items():
        cfg = load_config(None, [*(TINY if smoke else SMALL_VAE), *overrides])
        torch.manual_seed(0)
        model = SetVAE(cfg.model, genes).to(device)
        _peak_reset(device)
        losses, step_s = _timed_steps(
            lambda step, model=model: model(batches[step % len(batches)])[0], model.parameters(), steps, 0, device,
            not smoke,
        )  # fmt: skip
        curves[name] = losses
        rec.add({"what": "curve", "backend": name, "steps": steps, "cells": cells, "genes": genes,
                 "d_model": cfg.model.d_model, "bf16": not smoke, "s_per_step": step_s, "peak_mem_gb": _peak_gb(device),
                 "losses": losses})  # fmt: skip
    rec.add({"what": "agreement", "backends": list(curves), **curve_agreement(*curves.values())})


STEP_FUNCTIONS = {
    "correctness": step_correctness,
    "kernels": step_kernels,
    "vae_step": step_vae,
    "prior_generation": step_prior_generation,
    "train_curves": step_train_curves,
}


def _child(step: str, out_dir: str, smoke: bool) -> None:
    """One step in this (fresh) process; the orchestrator set TRITON_INTERPRET in its environment."""
    if smoke:
        import torch

        torch.set_num_threads(1)
    STEP_FUNCTIONS[step](Recorder(Path(out_dir) / f"{step}.json"), smoke)


# ---------------------------------------------------------------------------------------------------------
# The orchestrator: steps in processes with budgets, results.json and report.md after each
# ---------------------------------------------------------------------------------------------------------


def environment(smoke: bool) -> dict:
    import torch

    from scldm_scale.bench.records import machine

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    on_gpu = not smoke and torch.cuda.is_available()
    return {
        **machine(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "device_name": torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter)",
        "smoke": smoke,
        "argv": sys.argv,
    }


def _run_step(step: str, out_dir: Path, smoke: bool, budget: float, log) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1" if smoke else "0", "PYTHONUNBUFFERED": "1"}
    code = "import sys; from scldm_scale.bench.gpu import _child; _child(sys.argv[1], sys.argv[2], sys.argv[3] == '1')"
    command = [sys.executable, "-c", code, step, str(out_dir), "1" if smoke else "0"]
    log.write(f"\n===== {step} (budget {budget:.0f} s) =====\n")
    log.flush()
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the step and the processes it started (gene_step's)
        proc.wait()
        status = f"stopped at its budget ({budget:.0f} s)"
    path = out_dir / f"{step}.json"
    path.with_suffix(".tmp").unlink(missing_ok=True)  # a write the kill interrupted
    records = json.loads(path.read_text()) if path.exists() else []
    return {"status": status, "seconds": round(time.perf_counter() - start, 1), "budget_s": budget, "records": records}


def run_gpu_check(
    out_dir: str | Path, smoke: bool, budget_s: float, steps: tuple[str, ...] = STEPS, overwrite: bool = False
) -> dict:
    """Run the steps, each in a fresh process within its budget and the total; write results.json and report.md
    after each step; print the report. The results' `ok` is False when a step failed or a check did not pass.

    The folder follows outputs.py's rule 2 (a non-empty one is refused unless `overwrite`, and then only an
    earlier check's, which holds results.json), not rule 3: its files are written in place as the steps go, so
    that a run stopped from outside (the device tool's time limit) still leaves what it measured."""
    from scldm_scale.config import ConfigError
    from scldm_scale.outputs import claim_output

    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ConfigError(f"bench gpu --steps: unknown {unknown}; choose among {','.join(STEPS)}")
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "bench gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine "
                "(launch/gpu_check.sh), or add --smoke for the CPU run under Triton's interpreter"
            )
    claim_output(out_dir, "the GPU check's folder", "--out", overwrite, folder=True, marker="results.json")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for step in STEPS:  # a previous run's files would pass for this one's
        (out_dir / f"{step}.json").unlink(missing_ok=True)
    deadline = time.monotonic() + budget_s
    results: dict[str, Any] = {"environment": environment(smoke), "budget_s": budget_s, "steps": {}}
    with open(out_dir / "run.log", "w") as log:
        for step in steps:
            left = deadline - time.monotonic()
            budget = min(SMOKE_BUDGET_S if smoke else BUDGET_S[step], left)
            if budget < 10:
                results["steps"][step] = {"status": "skipped: the total budget is spent", "records": []}
            else:
                print(f"bench gpu: {step} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
                results["steps"][step] = _run_step(step, out_dir, smoke, budget, log)
            print(f"bench gpu: {step}: {results['steps'][step]['status']}", file=sys.stderr, flush=True)
            results["ok"] = _all_ok(results)
            (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
            (out_dir / "report.md").write_text(format_report(results))
    print(format_report(results))
    print(f"bench gpu: wrote {out_dir}/results.json, report.md, run.log and one JSON per step", file=sys.stderr)
    return results


def _all_ok(results: dict) -> bool:
    steps = results["steps"].values()
    checks = [r["ok"] for r in results["steps"].get("correctness", {}).get("records", [])]
    checks += [r["agree"] for r in results["steps"].get("train_curves", {}).get("records", []) if "agree" in r]
    return all(s["status"] == "ok" for s in steps) and all(checks)


# ---------------------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------------------


def _f(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _records(results: dict, step: str) -> list[dict]:
    return results["steps"].get(step, {}).get("records", [])


def target_rows(results: dict) -> list[list]:
    """The issue's targets against what this run measured (ratios within this run)."""
    rows = []
    bench = [r for r in _records(results, "kernels") if r.get("kind") == "bench" and r["backend"] == "triton"]
    for r in bench:
        if r["pass"] != "forward+backward" or r["ms"] is None:
            continue
        if r["op"] in ("pooling", "unpooling"):
            speed, roof = r["speedup_vs_reference"], r["pct_of_roofline"]
            met = speed is not None and speed >= TARGETS["attention_speedup"]
            met = met and roof is not None and roof >= TARGETS["attention_roofline_pct"]
            got = f"{_f(speed, '.2f')}x {r['reference']}, {_f(roof, '.0f')}% of roofline"
            rows.append([f"{r['op']} fwd+bwd {r['shape']}", "≥ 1.5x fastest SDPA, ≥ 60% roofline", got, met])
        else:
            speed, mem = r["speedup_vs_reference"], r["peak_vs_reference"]
            met = speed is not None and speed >= TARGETS["nb_speedup"] and mem is not None
            met = met and mem < TARGETS["nb_memory_ratio"]
            got = f"{_f(speed, '.2f')}x eager, {_f(mem, '.3f')} of eager's peak memory"
            rows.append([f"NB loss fwd+bwd {r['shape']}", "≥ 5x eager at < 10% of its peak memory", got, met])
    for r in _records(results, "vae_step"):
        if r.get("mfu") is not None or "error" in r:
            what = f"VAE step d{r['d_model']} {r['genes']:,} genes {r['decoder']}"
            what += f", attention {r['attention']}, NB {r['nb_loss']}"
            got = f"{_f(r.get('mfu') and 100 * r['mfu'], '.1f')}% MFU" if "error" not in r else r["error"][:80]
            rows.append([what, "MFU ≥ 35%", got, r.get("mfu") is not None and r["mfu"] >= TARGETS["vae_mfu"]])
    for r in _records(results, "prior_generation"):
        if r["what"] == "generation":
            got = f"{_f(r.get('cells_per_s'), ',.0f')} cells/s" if "error" not in r else r["error"][:80]
            what = f"generation {r['cells']:,} cells, {r['genes']:,} genes, {r['method']} {r['n_steps']}, guidance"
            rows.append(
                [what, "≥ 1,300 cells/s", got, (r.get("cells_per_s") or 0) >= TARGETS["generation_cells_per_s"]]
            )
    for r in _records(results, "train_curves"):
        if "agree" in r:
            got = f"median step diff {r['median_step_rel_diff']:.2e}, final mean diff {r['final_mean_rel_diff']:.2e}"
            rows.append(["loss curves torch vs triton", f"within {CURVE_TOLERANCE:g} (bf16 noise)", got, r["agree"]])
    return [[what, target, got, "yes" if met else "**no**"] for what, target, got, met in rows]


def format_report(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"# scldm-scale bench gpu: {env['device_name']}",
        "",
        f"{env['date']}; torch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton']}, Python {env['python']}, "
        f"{env['cpu_count']} CPUs; total budget {results['budget_s']:.0f} s."
        + (
            " SMOKE RUN: Triton's interpreter on the CPU, tiny shapes; the numbers mean nothing."
            if env["smoke"]
            else ""
        ),
        "",
        "## Steps",
        "",
    ]
    lines += _table(
        ["step", "status", "seconds", "records"],
        [[s, r["status"], _f(r.get("seconds"), ".1f"), len(r["records"])] for s, r in results["steps"].items()],
    )
    lines += ["", "## Targets (issue 16)", ""]
    lines += _table(["what", "target", "measured", "met"], target_rows(results))

    correctness = _records(results, "correctness")
    if correctness:
        passed = sum(r["ok"] for r in correctness)
        lines += ["", f"## 1. Kernel correctness vs float64 references: {passed} of {len(correctness)} cases pass", ""]
        rows = []
        for r in correctness:
            errors = ", ".join(f"{k} {v:.1e}" for k, v in r.get("errors", {}).items()) or r.get("error", "")
            note = f"FALLBACK: {r['fallback']}" if r.get("fallback") else ""
            rows.append([r["op"], r["dtype"], r["shape"], errors, _f(r.get("tolerance"), ".0e"), r["ok"], note])
        lines += _table(["op", "dtype", "shape", "relative errors", "tolerance", "pass", "note"], rows)

    kernels = [r for r in _records(results, "kernels") if r.get("kind") == "bench"]
    if kernels:
        lines += ["", "## 2. bench kernels", ""]
        rows = []
        for r in kernels:
            note = (r.get("error") or "").split(". ")[0][:70]
            rows.append([r["op"], r["pass"], r["backend"], r["shape"], _f(r["ms"], ".3f"), _f(r["tflops"], ".1f"),
                         _f(r["gb_per_s"], ",.0f"), _f(r["pct_of_roofline"], ".0f"), _f(r["peak_mib"], ",.1f"),
                         _f(r["speedup_vs_reference"], ".2f"), _f(r["peak_vs_reference"], ".2f"), note])  # fmt: skip
        header = ["op", "pass", "backend", "shape", "ms", "TFLOP/s", "GB/s", "% roof", "peak MiB", "x ref", "mem/ref"]
        lines += _table([*header, "note"], rows)
        picks = [r for r in _records(results, "kernels") if r.get("kind") == "autotune"]
        last = picks[-1]["picks"] if picks else []
        lines += ["", "Autotune picks (kernel, key, config):", ""]
        lines += [f"- {p['kernel']} {p['key']}: {p['config']}" for p in last] or ["- none (interpreter: one config)"]

    vae = _records(results, "vae_step")
    if vae:
        lines += ["", "## 3. VAE training step (bench step's gene_step; bf16 autocast on a GPU)", ""]
        rows = [[r["d_model"], r["cells"], f"{r['genes']:,}", r["decoder"], r.get("decode_chunk", "-"), r["attention"],
                 r["nb_loss"], _f(r.get("cells_per_s"), ",.0f"), _f(r.get("s_per_step"), ".4f"),
                 _f(r.get("peak_mem_gb"), ".2f"), _f(r.get("mfu") and 100 * r["mfu"], ".1f"), r.get("error", "")]
                for r in vae]  # fmt: skip
        header = ["d_model", "cells", "genes", "decoder", "chunk", "attention", "NB loss", "cells/s", "s/step"]
        lines += _table([*header, "peak GB", "MFU %", "error"], rows)

    prior = _records(results, "prior_generation")
    if prior:
        lines += ["", "## 3. DiT prior step and generation (random weights)", ""]
        rows = []
        for r in prior:
            if r["what"] == "prior step":
                what = f"prior step, d{r['d_model']} x {r['layers']} layers, {r['tokens']} tokens"
            else:
                what = (f"generation, {r['genes']:,} genes, {r['method']} {r['n_steps']} steps, guidance "
                        f"{r['guidance']}, ODE batch {r['ode_batch']}, VAE d{r['vae_d_model']}")  # fmt: skip
            mfu = r.get("mfu")
            rows.append([what, f"{r['cells']:,}", _f(r.get("cells_per_s"), ",.0f"), _f(r.get("peak_mem_gb"), ".2f"),
                         _f(mfu and 100 * mfu, ".1f"), r.get("error", "")])  # fmt: skip
        lines += _table(["what", "cells", "cells/s", "peak GB", "MFU %", "error"], rows)

    curves = _records(results, "train_curves")
    if curves:
        lines += ["", "## 4. Small VAE, torch vs triton backends, same seed and batches", ""]
        rows = []
        for r in curves:
            if r["what"] == "curve":
                losses = r["losses"]
                rows.append([r["backend"], r["steps"], r["cells"], r["genes"], f"{losses[0]:.4g}", f"{losses[-1]:.4g}",
                             _f(r["s_per_step"], ".4f"), _f(r["peak_mem_gb"], ".2f")])  # fmt: skip
        lines += _table(["backend", "steps", "cells", "genes", "first loss", "last loss", "s/step", "peak GB"], rows)
        for r in curves:
            if r["what"] == "agreement":
                verdict = "agree" if r["agree"] else "DO NOT AGREE"
                lines += [
                    "",
                    f"Agreement: median per-step relative difference {r['median_step_rel_diff']:.2e}, max "
                    f"{r['max_step_rel_diff']:.2e}, mean of the last fifth {r['final_mean_rel_diff']:.2e} "
                    f"(tolerance {r['tolerance']:g}): {verdict}",
                ]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale bench gpu`."""
    from scldm_scale.outputs import add_overwrite

    parser.add_argument("--out", default="gpu_check", help="output folder: one JSON per step, results.json, report.md")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes (times mean nothing)"
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for all steps together")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of the steps, run in order")
    add_overwrite(parser, "an earlier check's --out folder")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    from scldm_scale.config import comma_separated

    results = run_gpu_check(args.out, args.smoke, args.budget_s, tuple(comma_separated(args.steps)), args.overwrite)
    if not results.get("ok", False):
        raise SystemExit(1)
