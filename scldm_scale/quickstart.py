"""`scldm-scale quickstart`: the whole pipeline on the built-in PBMC data, end to end.

prepare (recover counts, fixed stratified split) -> train VAE -> train DiT prior -> generate as many
cells per cell type as the test split holds -> evaluate against the test cells, beside the
independent-NB baseline and real training cells (the metric's noise floor) -> report.json, report.md.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

from scldm_scale.config import CONFIG_DIR, load_config
from scldm_scale.data.counts import load_builtin
from scldm_scale.data.dataset import build_dataset
from scldm_scale.data.prepare import prepare
from scldm_scale.data.soma import read_anndata
from scldm_scale.data.source import soma_spec
from scldm_scale.evaluate.baselines import IndependentNB
from scldm_scale.evaluate.reconstruction import reconstruction_metrics
from scldm_scale.evaluate.report import compare, per_condition_table, summary_table
from scldm_scale.generate import generate
from scldm_scale.train.checkpoint import load_checkpoint
from scldm_scale.train.stages import load_vae, run_training

log = logging.getLogger(__name__)
QUICKSTART_CONFIG = CONFIG_DIR / "quickstart.yaml"


def prepare_builtin(out_dir: Path, overrides: list[str]) -> Path:
    """Ingest the built-in dataset into a SOMA experiment with the fixed stratified split."""
    cfg = load_config(QUICKSTART_CONFIG, overrides)
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


def run_quickstart(out_dir: str | Path, overrides: list[str] = ()) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data_uri = prepare_builtin(out, list(overrides))
    common = [f"data.uri={data_uri}", f"train.ckpt_dir={out / 'checkpoints'}", *overrides]
    timings["prepare_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    vae_cfg = load_config(QUICKSTART_CONFIG, ["stage=vae", *common, f"train.metrics_file={out / 'vae_metrics.jsonl'}"])
    vae_path = run_training(vae_cfg)
    timings["train_vae_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ldm_cfg = load_config(
        QUICKSTART_CONFIG,
        [
            "stage=ldm",
            *common,
            f"train.vae_checkpoint={vae_path}",
            f"train.metrics_file={out / 'ldm_metrics.jsonl'}",
        ],
    )
    ldm_path = run_training(ldm_cfg)
    timings["train_ldm_s"] = time.perf_counter() - t

    t = time.perf_counter()
    # Evaluation-sized: all cells of the experiment in memory, with the split column from prepare.
    dataset = build_dataset(read_anndata(soma_spec(ldm_cfg.data, None)), ldm_cfg.data)
    key = ldm_cfg.data.condition_keys[0]
    train_idx, test_idx = dataset.indices("train"), dataset.indices("test")
    test_labels = dataset.obs[key][test_idx]
    values, counts = np.unique(test_labels, return_counts=True)
    requests = [({key: str(v)}, int(n)) for v, n in zip(values, counts, strict=True)]
    generated = generate(
        str(ldm_path),
        requests,
        guidance=_guidance(ldm_cfg),
        method=ldm_cfg.sample.method,
        n_steps=ldm_cfg.sample.n_steps,
        seed=ldm_cfg.seed,
        progress=ldm_cfg.train.progress,
    )
    generated.write_h5ad(out / "generated.h5ad")
    timings["generate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    vae = load_vae(load_checkpoint(vae_path, kind="vae"))
    recon = reconstruction_metrics(vae, dataset, test_idx, torch.device("cpu"))
    baseline = IndependentNB().fit(dataset.counts[train_idx], dataset.obs[key][train_idx])
    gen_labels = generated.obs[key].astype(str).to_numpy()
    noise_floor_idx = _matched_train_cells(dataset.obs[key], train_idx, test_labels, ldm_cfg.seed)
    records = compare(
        dataset.counts[train_idx],
        dataset.counts[test_idx],
        test_labels,
        {
            "scLDM": (generated.X, gen_labels),
            "independent_nb": (baseline.sample(test_labels, seed=ldm_cfg.seed), test_labels),
            "real_train_cells": (dataset.counts[noise_floor_idx], dataset.obs[key][noise_floor_idx]),
        },
    )
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    report = {
        "dataset": ldm_cfg.data.builtin,
        "condition_key": key,
        "n_train_cells": int(len(train_idx)),
        "n_test_cells": int(len(test_idx)),
        "n_genes": dataset.n_genes,
        "reconstruction": recon,
        "metrics": records,
        "timings": timings,
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "checkpoints": {"vae": str(vae_path), "ldm": str(ldm_path)},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    return report


def _guidance(cfg) -> dict[str, float]:
    return {k: cfg.sample.guidance for k in cfg.data.condition_keys}


def _matched_train_cells(labels: np.ndarray, train_idx: np.ndarray, test_labels: np.ndarray, seed: int) -> np.ndarray:
    """Train cells with the test split's label composition (with replacement where a label is short)."""
    rng = np.random.default_rng(seed)
    picked = []
    for value, n in zip(*np.unique(test_labels, return_counts=True), strict=True):
        pool = train_idx[labels[train_idx] == value]
        picked.append(rng.choice(pool, size=n, replace=len(pool) < n))
    return np.sort(np.concatenate(picked))


def _markdown(report: dict) -> str:
    recon = report["reconstruction"]
    records = report["metrics"]
    t = report["timings"]
    return "\n".join(
        [
            "# scldm-scale quickstart report",
            "",
            f"Data: `{report['dataset']}`, {report['n_train_cells']} train / {report['n_test_cells']} test cells, "
            f"{report['n_genes']} genes; conditions: `{report['condition_key']}`.",
            "",
            "## VAE reconstruction (test cells)",
            f"- NB negative log-likelihood per cell: {recon['nll_per_cell']:.2f}",
            f"- Pearson r, reconstructed vs observed log-normalised counts: {recon['pearson_lognorm']:.4f}",
            "",
            "## Generated vs test cells (all cell types)",
            "MMD: RBF kernel on 30 PCs of log1p(normalised) counts, PCA fitted on train cells (lower is better). "
            "mean_r2 / var_r2: R² of per-gene means / variances (higher is better). `real_train_cells` is "
            "the noise floor: real cells that the model never generated.",
            "",
            summary_table(records),
            "",
            "## MMD per cell type",
            "",
            per_condition_table(records, "mmd"),
            "",
            f"Time: {t['total_s']:.0f} s in all (prepare {t['prepare_s']:.0f} s, VAE {t['train_vae_s']:.0f} s, "
            f"prior {t['train_ldm_s']:.0f} s, "
            f"generation {t['generate_s']:.0f} s, evaluation {t['evaluate_s']:.0f} s).",
            "",
        ]
    )
