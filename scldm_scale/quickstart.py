"""`scldm-scale quickstart`: the whole pipeline on a built-in dataset or on your own cells, end to end.

prepare (the cells into SOMA, fixed stratified split) -> train VAE -> train DiT prior -> generate as many
cells of each condition combination as the real cells hold -> `evaluate` them beside the baselines ->
report.json, metrics.json, report.md and the figures. `--draws N` generates N draws (seeds seed, seed + 1, ...)
and scores them together: metrics.json holds the means, metrics_draws.json each draw.

`--data cells.h5ad [--labels cell_type,donor]`: your raw counts (any input `prepare` reads), every gene
kept; the labels become the conditions (none: an unconditional prior). The run is sized to the data and
the machine (`size_run`: batch sizes from the memory a step needs, decoded genes and steps from the
measured time of a step and a time budget) and prints what it chose and why; dot-list overrides still win.

The real cells are the test split plus every cell of a held-out combination (`data.holdout_combinations`,
never trained on); the training cells are the rest. configs/quickstart.yaml is the PBMC default;
configs/perturbation.yaml is the unseen-combination demo.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scldm_scale.artifact import record_evaluation
from scldm_scale.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    EvalConfig,
    HoldoutConfig,
    comma_separated,
    load_config,
)
from scldm_scale.data.counts import load_builtin
from scldm_scale.data.prepare import MEASUREMENT, X_LAYER, prepare
from scldm_scale.data.soma import read_anndata
from scldm_scale.data.source import soma_spec
from scldm_scale.evaluate.run import evaluate, split_real
from scldm_scale.generate import generate
from scldm_scale.host_memory import choose_policy
from scldm_scale.outputs import add_overwrite, claim_output
from scldm_scale.train.stages import run_training

log = logging.getLogger(__name__)
QUICKSTART_CONFIG = CONFIG_DIR / "quickstart.yaml"

# --data: the minutes of training both stages are sized for, VAE_SHARE of them for the VAE, the rest for the prior.
DEFAULT_MINUTES = 8.0
VAE_SHARE = 0.7
# The machine's speed is measured, not assumed: a few forward and backward passes of each model at the sizes
# the run will train (random inputs), PROBE_STEPS timed after a warm-up, the median taken (another process
# may share the cores). A VAE step is timed decoding two numbers of genes, for its time as a line in them.
PROBE_STEPS = 2
# A training step's activations may take this share of the machine's memory, at most MAX_ACTIVATIONS.
ACTIVATION_SHARE = 0.25
MAX_ACTIVATIONS = 1.5 * 2**30
# Cells per VAE step: on a CPU a larger batch is no faster per cell, and more steps train a small model better.
BATCH_RANGE = (8, 32)
# The fewest steps that train anything; the most are the config's optim.<stage>.max_steps.
MIN_STEPS = 50
# Gene-subset training (model.decode_genes) decodes a multiple of DECODE_GENES_STEP genes, never fewer than
# MIN_SUBSET_GENES (or the vocabulary): on a slow machine, fewer steps of 4,096 genes rather than more of 1,024.
DECODE_GENES_STEP = 1024
MIN_SUBSET_GENES = 4096
# --data trains the VAE for up to OWN_DATA_VAE_STEPS steps (configs/quickstart.yaml's 600 are for the built-in
# 765 genes, every gene each step). On two 33,000-gene synthetic datasets (3 generation draws each), 1,200 steps
# of 4,096 genes against 600 of 8,192-12,288 at about the same time: DE log-fold-change Pearson 0.91 vs 0.72 and
# 0.76 vs 0.69, C2ST 0.54 vs 0.60 and 0.54 vs 0.57, MMD 0.0135 vs 0.0133 and 0.0160 vs 0.0146 (README, "Your
# own cells").
OWN_DATA_VAE_STEPS = 1200
# A run that decodes a subset of the genes a step (whole-transcriptome data) starts the per-gene offsets from the
# data (train.init_gene_bias=auto), and its decoder then never learned to use the latent (the latent collapsed to
# one point). Such a run pools the encoder's tokens by count, adds the latent's linear path to each gene's logit
# and freezes the encoder for the first ENCODER_WARMUP_SHARE of its steps (models/vae.py). On two 33,000-gene
# synthetic datasets a warm-up of 11-16% of ~590 steps gave reconstruction-ceiling MMD 0.014 / 0.025, half of
# 260-364 steps 0.031 / 0.036 (README, "Your own cells").
WIDE_VAE_OVERRIDES = ("model.pooling_weights=count", "model.attention_backend=torch", "model.latent_gene_path=true")
ENCODER_WARMUP_SHARE = 0.15
# The built-in PBMC config balances the prior's epochs over cell types and guides the noise half of the ODE at 1.15
# (measured on PBMC only); `--data` runs keep plain shuffling and conditioning, the settings their sizing and
# quality were measured with (README, "Your own cells").
OWN_DATA_PRIOR_CHOICES = (
    "train.balance_conditions=0",
    "sample.guidance=1.0",
    "sample.guidance_interval=[0.0,1.0]",
)
# Freed decoder blocks stay in the heap (train.host_memory): 30 VAE steps of a 33,000-gene sample, 9,216 genes a
# step, took 23 s instead of 44 s, at 1.48 instead of 1.09 GB peak RSS (the limit is 4 GB).
OWN_DATA_HOST_MEMORY = "keep"
# Generation decodes every gene of the cells of one ODE solve at once (forward only: a few (cells, genes,
# width) tensors at a time).
SAMPLE_BATCH_RANGE = (16, 1024)
# The padded encoder length of a batch is its cell with the most expressed genes, about twice the mean.
PADDED_TOKENS_PER_EXPRESSED = 2.0
GIB = 2**30


@dataclass(frozen=True)
class DataShape:
    """What sizing needs to know of the cells: how many, over how many genes, how many non-zero counts."""

    n_cells: int
    n_genes: int
    nnz: int

    @classmethod
    def of_experiment(cls, uri: str | Path) -> DataShape:
        import tiledbsoma

        with tiledbsoma.Experiment.open(str(uri)) as exp:
            ms = exp.ms[MEASUREMENT]
            return cls(int(exp.obs.count), int(ms.var.count), int(ms.X[X_LAYER].nnz))

    @property
    def expressed_per_cell(self) -> float:
        return self.nnz / self.n_cells


@dataclass(frozen=True)
class Machine:
    cores: int
    memory_bytes: int

    @classmethod
    def this_one(cls) -> Machine:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cls(cores, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass
class Sizing:
    """Overrides per stage ("vae"; "ldm", which generation reads too) and the reasons they were chosen."""

    overrides: dict[str, list[str]]
    reasons: list[str]

    def describe(self) -> str:
        return "\n".join(f"  {line}" for line in self.reasons)


@dataclass(frozen=True)
class StepTimes:
    """Seconds of one training step: the VAE's as fixed + per_gene x decoded genes, and the prior's."""

    vae_fixed: float
    vae_per_gene: float
    prior: float

    def vae(self, n_decoded: int) -> float:
        return self.vae_fixed + self.vae_per_gene * n_decoded


def _timed(loss: Callable[[], torch.Tensor]) -> float:
    """Median seconds of a forward and backward pass over PROBE_STEPS, after one untimed warm-up."""
    loss().backward()
    seconds = []
    for _ in range(PROBE_STEPS):
        start = time.perf_counter()
        loss().backward()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def measure_steps(cfg: Config, n_genes: int, tokens: int, vae_batch: int, ldm_batch: int) -> StepTimes:
    """StepTimes of the config's models on this machine, now: VAE steps of vae_batch cells with `tokens` encoder
    tokens each, decoding min(n_genes, 1,024) and min(n_genes, 4,096) genes; prior steps of ldm_batch cells."""
    from scldm_scale.data.batch import CellBatch
    from scldm_scale.models.dit import DiT
    from scldm_scale.models.prior import FlowMatchingPrior, LatentBatch
    from scldm_scale.models.vae import SetVAE

    torch.manual_seed(0)
    vae = SetVAE(cfg.model, n_genes)

    def vae_step(n_decoded: int) -> float:
        shape = (vae_batch, tokens)
        batch = CellBatch(
            gene_ids=torch.randint(0, n_genes, shape),
            counts=torch.ones(shape),
            mask=torch.ones(shape, dtype=torch.bool),
            target=torch.ones(vae_batch, n_decoded),
            decode_gene_ids=torch.arange(n_decoded),
            library_size=torch.full((vae_batch,), float(n_decoded)),
            conditions={},
        )
        return _timed(lambda: vae(batch)[0])

    few, more = min(n_genes, DECODE_GENES_STEP), min(n_genes, 4 * DECODE_GENES_STEP)
    t_few = vae_step(few)
    per_gene = max(0.0, (vae_step(more) - t_few) / (more - few)) if more > few else t_few / few
    m, latent_dim = cfg.model.n_latent_tokens, cfg.model.latent_dim
    n_classes = {key: 2 for key in cfg.data.condition_keys}
    prior = FlowMatchingPrior(
        DiT(cfg.prior, m, latent_dim, n_classes), cfg.prior.cond_drop_prob, cfg.prior.cond_dropout
    )
    latents = LatentBatch(
        torch.randn(ldm_batch, m, latent_dim), {k: torch.zeros(ldm_batch, dtype=torch.long) for k in n_classes}
    )
    prior_s = _timed(lambda: prior(latents)[0])
    return StepTimes(vae_fixed=max(0.0, t_few - per_gene * few), vae_per_gene=per_gene, prior=prior_s)


def _clamp(value: float, low: int, high: int) -> int:
    return int(max(low, min(high, value + 1e-6)))  # 1199.9999999 steps of a time that fits 1,200 are 1,200


def size_run(
    cfg: Config, data: DataShape, machine: Machine, minutes: float = DEFAULT_MINUTES, times: StepTimes | None = None
) -> Sizing:
    """Batch sizes from the memory a step needs; the VAE's decoded genes per step and both stages' steps from
    the time a step takes on `machine` (`times`, measured by `measure_steps` unless given) and `minutes` of
    training.

    The VAE trains with the config's optim.vae.max_steps when decoding every gene fits the time; otherwise
    each step decodes a subset of genes (model.decode_genes), as many as keep those steps within the time,
    and fewer steps only when the smallest subset (MIN_SUBSET_GENES) still does not fit. The VAE counts its
    own saved activations (models/cost.py); its decoder runs in automatic chunks (model.decode_chunk_genes),
    so no step holds a (cells, genes, width) tensor.
    """
    from scldm_scale.plan import build_vae

    n_train = max(1, round(data.n_cells * (1.0 - cfg.data.test_fraction)))
    tokens = _clamp(PADDED_TOKENS_PER_EXPRESSED * data.expressed_per_cell, 1, data.n_genes)
    budget = min(ACTIVATION_SHARE * machine.memory_bytes, MAX_ACTIVATIONS)
    vae_seconds, ldm_seconds = 60.0 * minutes * VAE_SHARE, 60.0 * minutes * (1.0 - VAE_SHARE)
    reasons = [
        f"data: {data.n_cells:,} cells ({n_train:,} to train on) x {data.n_genes:,} genes, "
        f"{data.nnz / (data.n_cells * data.n_genes):.1%} non-zero ({data.expressed_per_cell:,.0f} genes a cell)",
        f"machine: {machine.cores} cores, {machine.memory_bytes / GIB:.1f} GiB; activations up to "
        f"{budget / GIB:.2f} GiB a step; {minutes:g} minutes of training",
    ]

    vae = build_vae(cfg, data.n_genes)
    vae_batch = min(BATCH_RANGE[1], n_train)
    while True:  # the decoder's chunk, and so the memory a cell needs, depends on the batch
        per_cell = vae.activation_profile(tokens, data.n_genes, vae_batch).bytes_per_cell(4, checkpointing=False)
        if vae_batch * per_cell <= budget or vae_batch <= BATCH_RANGE[0]:
            break
        vae_batch = max(BATCH_RANGE[0], min(vae_batch // 2, int(budget // per_cell)))

    ldm_batch = min(cfg.train.batch_size, n_train)
    times = times or measure_steps(cfg, data.n_genes, tokens, vae_batch, ldm_batch)
    target = cfg.optim.vae.max_steps
    per_step = vae_seconds / target
    fitting = (per_step - times.vae_fixed) / times.vae_per_gene if times.vae_per_gene > 0 else data.n_genes
    n_decoded = min(data.n_genes, max(MIN_SUBSET_GENES, int(fitting // DECODE_GENES_STEP * DECODE_GENES_STEP)))
    vae_steps = _clamp(vae_seconds / times.vae(n_decoded), min(MIN_STEPS, target), target)
    decode = "all" if n_decoded == data.n_genes else str(n_decoded)
    decoded = f"all {data.n_genes:,} genes" if decode == "all" else f"{n_decoded:,} of the {data.n_genes:,} genes"
    reasons.append(
        f"VAE: batch {vae_batch} ({per_cell / 2**20:,.1f} MiB of activations a cell), {vae_steps} steps "
        f"(optim.vae.max_steps={target}) decoding {decoded} a step (model.decode_genes={decode}), "
        f"{times.vae(n_decoded):.2f} s a step (measured)"
    )
    wide = []
    if decode != "all":
        wide = [*WIDE_VAE_OVERRIDES, f"model.encoder_warmup_steps={round(ENCODER_WARMUP_SHARE * vae_steps)}"]
        reasons.append(f"VAE on a gene subset a step, so that its latent stays in use: {' '.join(wide)}")

    ldm_steps = _clamp(ldm_seconds / times.prior, min(MIN_STEPS, cfg.optim.ldm.max_steps), cfg.optim.ldm.max_steps)
    reasons.append(
        f"prior: batch {ldm_batch}, {ldm_steps} steps (optim.ldm.max_steps={cfg.optim.ldm.max_steps}), "
        f"{times.prior:.2f} s a step (measured)"
    )

    # Forward only: the unpooling's (cells, genes, width) output and its MLP's hidden layer, fp32.
    decode_bytes = data.n_genes * cfg.model.d_model * (2.0 + cfg.model.mlp_ratio) * 4
    sample_batch = _clamp(budget // decode_bytes, *SAMPLE_BATCH_RANGE)
    reasons.append(f"generation: {sample_batch} cells per ODE solve ({decode_bytes / 2**20:,.1f} MiB a cell to decode)")
    vae_overrides = [
        f"train.batch_size={vae_batch}",
        f"optim.vae.max_steps={vae_steps}",
        *wide,
        f"model.decode_genes={decode}",
    ]
    ldm_overrides = [f"train.batch_size={ldm_batch}", f"optim.ldm.max_steps={ldm_steps}"]
    return Sizing({"vae": vae_overrides, "ldm": [*ldm_overrides, f"sample.batch_size={sample_batch}"]}, reasons)


def prepare_builtin(out_dir: Path, overrides: list[str], config: Path = QUICKSTART_CONFIG) -> Path:
    """Ingest the config's built-in dataset into a SOMA experiment with the fixed stratified split."""
    cfg = load_config(config, overrides)
    path = out_dir / "data" / f"{cfg.data.builtin}_counts.h5ad"
    path.parent.mkdir(parents=True, exist_ok=True)
    load_builtin(cfg.data.builtin).write_h5ad(path)
    return prepare(
        path,
        out_dir / "data" / f"{cfg.data.builtin}.soma",
        labels=list(cfg.data.condition_keys),
        test_fraction=cfg.data.test_fraction,
        val_fraction=0.0,
        seed=cfg.data.split_seed,
        overwrite=True,
    )


def prepare_own(data: str | Path, out_dir: Path, labels: list[str], cfg: Config) -> Path:
    """Ingest the user's cells (every gene) with the quickstart's stratified split (by the first label)."""
    return prepare(
        data,
        out_dir / "data" / "cells.soma",
        labels=labels,
        test_fraction=cfg.data.test_fraction,
        val_fraction=0.0,
        seed=cfg.data.split_seed,
        overwrite=True,
    )


def own_data_choices(labels: list[str]) -> list[str]:
    """The overrides `--data` starts from, before the sizing and the user's own (which win over both)."""
    return [
        f"data.condition_keys={json.dumps(list(labels))}",
        f"train.host_memory={OWN_DATA_HOST_MEMORY}",
        f"optim.vae.max_steps={OWN_DATA_VAE_STEPS}",
        *OWN_DATA_PRIOR_CHOICES,
    ]


def run_quickstart(
    out_dir: str | Path,
    overrides: list[str] = (),
    config: str | Path | None = None,
    data: str | Path | None = None,
    labels: list[str] = (),
    minutes: float = DEFAULT_MINUTES,
    draws: int = 1,
) -> dict:
    """The built-in dataset of `config`, or with `data` the user's cells conditioned on `labels` (none: an
    unconditional prior), sized by `size_run` for `minutes` of training; `overrides` win over everything.

    `draws` generation draws of the trained models are scored: draw d generated and evaluated with seed + d
    (`evaluate`'s convention), metrics.json their means, metrics_draws.json each; generated.h5ad is draw 0."""
    if draws < 1:
        raise ConfigError(f"--draws must be at least 1, got {draws}")
    config = Path(config) if config else QUICKSTART_CONFIG
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sizing = None
    if data is None:
        data_uri = prepare_builtin(out, list(overrides), config)
        chosen: list[str] = []
        sized: dict[str, list[str]] = {"vae": [], "ldm": []}
    else:
        # The chunked decoder's default "release" memory policy faulted in every block of every step: half of a
        # 33,000-gene VAE step's time (host_memory.py). Set before the step times are measured for the sizing.
        chosen = own_data_choices(labels)
        base = load_config(config, [*chosen, *overrides])
        log.info(
            "decoder memory: train.host_memory=%s (process policy: %s)",
            base.train.host_memory,
            choose_policy(base.train.host_memory),
        )
        data_uri = prepare_own(data, out, list(labels), base)
        sizing = size_run(base, DataShape.of_experiment(data_uri), Machine.this_one(), minutes)
        log.info("quickstart sized to the data and the machine (dot-list overrides win):\n%s", sizing.describe())
        sized = sizing.overrides
    timings["prepare_s"] = time.perf_counter() - t0

    def stage_config(stage: str, *extra: str) -> Config:
        run = [f"data.uri={data_uri}", f"train.ckpt_dir={out / 'checkpoints'}", *chosen, *sized[stage]]
        metrics = f"train.metrics_file={out / f'{stage}_metrics.jsonl'}"
        return load_config(config, [f"stage={stage}", *run, metrics, *extra, *overrides])

    t = time.perf_counter()
    vae_path = run_training(stage_config("vae"))
    timings["train_vae_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ldm_cfg = stage_config("ldm", f"train.vae_checkpoint={vae_path}")
    ldm_path = run_training(ldm_cfg)
    timings["train_ldm_s"] = time.perf_counter() - t

    t = time.perf_counter()
    train, real = _evaluation_cells(ldm_cfg)
    keys = list(ldm_cfg.data.condition_keys)
    requests = _requests(real, keys)
    generated = [
        generate(
            str(ldm_path),
            requests,
            guidance=_guidance(ldm_cfg),
            sampler=ldm_cfg.sample,
            seed=ldm_cfg.seed + d,
            progress=ldm_cfg.train.progress,
        )
        for d in range(draws)
    ]
    for d, cells in enumerate(generated):
        cells.write_h5ad(out / generated_file(d))
    timings["generate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    opts = EvalConfig(
        condition_keys=keys,
        holdout=HoldoutConfig([dict(c) for c in ldm_cfg.data.holdout_combinations]),
        seed=ldm_cfg.seed,
        vae_checkpoint=str(vae_path),
    )
    records = evaluate(real, generated, out, opts, train=train)
    dataset = ldm_cfg.data.builtin if data is None else Path(data).name
    _record_on_model_cards(records, vae_path, ldm_path, dataset, int(real.n_obs), draws)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    report = {
        "dataset": dataset,
        "condition_keys": keys,
        "holdout_combinations": opts.holdout.combinations,
        "n_train_cells": int(train.n_obs),
        "n_real_cells": int(real.n_obs),
        "n_genes": int(real.n_vars),
        "draws": draws,
        "metrics": records,
        "timings": timings,
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "checkpoints": {"vae": str(vae_path), "ldm": str(ldm_path)},
    }
    if sizing is not None:
        report["sizing"] = {"overrides": sizing.overrides, "reasons": sizing.reasons}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    with open(out / "report.md", "a") as md:
        md.write(_timing_markdown(timings))
        if sizing is not None:
            md.write("\n## Sizing\n" + "".join(f"- {line}\n" for line in sizing.reasons))
    return report


def generated_file(draw: int) -> str:
    """The quickstart's file of generation draw `draw`: generated.h5ad, then generated_draw1.h5ad, ..."""
    return "generated.h5ad" if draw == 0 else f"generated_draw{draw}.h5ad"


def _record_on_model_cards(
    records: list[dict], vae_path: Path, ldm_path: Path, dataset: str, n_real: int, draws: int
) -> None:
    """The headline numbers of this run into the two artifacts' config.json and model cards."""
    where = f"{dataset}, {n_real} held-out test cells"
    split = {"evaluated on": where + (f", mean of {draws} generation draws" if draws > 1 else "")}
    overall = {r["metric"]: r["value"] for r in records if r["condition"] == "all" and r["method"] == "generated"}
    reconstruction = {r["metric"]: r["value"] for r in records if r["method"] == "reconstruction"}
    record_evaluation(ldm_path, {**split, **overall})
    record_evaluation(vae_path, {**split, **reconstruction})


def _labels(adata, keys: list[str]) -> pd.DataFrame:
    return pd.DataFrame({k: adata.obs[k].astype(str).to_numpy() for k in keys})


def _evaluation_cells(cfg) -> tuple[ad.AnnData, ad.AnnData]:
    """(train, real): the train split without held-out cells; the test split plus every held-out cell."""
    cells = read_anndata(soma_spec(cfg.data, None))
    return split_real(cells, cfg.data.split_key, [dict(c) for c in cfg.data.holdout_combinations])


def _requests(real: ad.AnnData, keys: list[str]) -> list[tuple[dict[str, str], int]]:
    """As many cells of each condition combination as the real cells hold (unconditional: as many cells)."""
    if not keys:
        return [({}, int(real.n_obs))]
    table = _labels(real, keys).value_counts(sort=False).sort_index()
    return [(dict(zip(keys, combo, strict=True)), int(n)) for combo, n in table.items()]


def _guidance(cfg) -> dict[str, float]:
    return {k: cfg.sample.guidance for k in cfg.data.condition_keys}


def _timing_markdown(t: dict[str, float]) -> str:
    return (
        f"\n## Time\n{t['total_s']:.0f} s in all (prepare {t['prepare_s']:.0f} s, VAE {t['train_vae_s']:.0f} s, "
        f"prior {t['train_ldm_s']:.0f} s, generation {t['generate_s']:.0f} s, evaluation {t['evaluate_s']:.0f} s).\n"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale quickstart`."""
    parser.add_argument("--out", default="quickstart_out", help="folder for everything the run writes")
    config_help = "a demo config (default configs/quickstart.yaml; configs/perturbation.yaml)"
    parser.add_argument("--config", default=None, help=config_help)
    data_help = "your raw counts (.h5ad, 10x .h5, Matrix Market folder, CSV) instead of the built-in dataset (default)"
    parser.add_argument("--data", default=None, help=data_help)
    labels_help = "with --data: comma-separated obs columns to condition on (default: none, an unconditional prior)"
    parser.add_argument("--labels", type=comma_separated, default=[], metavar="A,B", help=labels_help)
    minutes_help = "with --data: minutes of training (both stages) to size the steps for"
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help=minutes_help)
    draws_help = (
        "generation draws to score (draw d generated and evaluated with seed + d): metrics.json holds their means, "
        "metrics_draws.json each draw's, generated_drawD.h5ad the cells; one draw moves the metrics as much as most "
        "config changes do (default 1)"
    )
    parser.add_argument("--draws", type=int, default=1, metavar="N", help=draws_help)
    parser.add_argument("overrides", nargs="*", help="dot-list overrides of the config (they win over the sizing)")
    add_overwrite(parser, "an earlier quickstart's folder at --out")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    if args.data is None and args.labels:
        raise ConfigError("--labels names obs columns of --data; the built-in datasets have theirs in the config")
    if args.minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {args.minutes}")
    if args.draws < 1:  # run_quickstart checks it too, but only after the folder below is cleared
        raise ConfigError(f"--draws must be at least 1, got {args.draws}")
    out = Path(args.out)
    claim_output(out, "a quickstart folder", "--out", args.overwrite, folder=True, marker="checkpoints")
    if out.is_dir():
        shutil.rmtree(out)  # empty, or an earlier quickstart under --overwrite (the run's configs name its paths)
    try:
        report = run_quickstart(out, args.overrides, args.config, args.data, args.labels, args.minutes, args.draws)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # a quickstart cannot resume: leave no half-written folder
        raise
    print((Path(args.out) / "report.md").read_text())
    draws = ""
    if args.draws > 1:
        draws = f" (draw 0; draws 1-{args.draws - 1} in generated_drawD.h5ad, each scored in metrics_draws.json)"
    print(
        f"wrote {args.out}/generated.h5ad{draws}, metrics.json, report.md, report.json and the figures "
        f"in {report['timings']['total_s']:.0f} s"
    )
