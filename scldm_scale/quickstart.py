"""`scldm-scale quickstart`: the whole pipeline on a built-in dataset, end to end.

prepare (the built-in cells into SOMA, fixed stratified split) -> train VAE -> train DiT prior ->
generate as many cells of each condition combination as the real cells hold -> `evaluate` them beside
the baselines -> report.json, metrics.json, report.md and the figures.

The real cells are the test split plus every cell of a held-out combination (`data.holdout_combinations`,
never trained on); the training cells are the rest. configs/quickstart.yaml is the PBMC default;
configs/perturbation.yaml is the unseen-combination demo.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import anndata as ad
import pandas as pd
import torch

from scldm_scale.config import CONFIG_DIR, load_config
from scldm_scale.data.counts import load_builtin
from scldm_scale.data.prepare import prepare
from scldm_scale.data.soma import read_anndata
from scldm_scale.data.source import soma_spec
from scldm_scale.evaluate.run import EvalOptions, Holdout, evaluate, split_real
from scldm_scale.generate import generate
from scldm_scale.train.stages import run_training

log = logging.getLogger(__name__)
QUICKSTART_CONFIG = CONFIG_DIR / "quickstart.yaml"


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


def run_quickstart(out_dir: str | Path, overrides: list[str] = (), config: str | Path | None = None) -> dict:
    config = Path(config) if config else QUICKSTART_CONFIG
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data_uri = prepare_builtin(out, list(overrides), config)
    common = [f"data.uri={data_uri}", f"train.ckpt_dir={out / 'checkpoints'}", *overrides]
    timings["prepare_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    vae_cfg = load_config(config, ["stage=vae", *common, f"train.metrics_file={out / 'vae_metrics.jsonl'}"])
    vae_path = run_training(vae_cfg)
    timings["train_vae_s"] = time.perf_counter() - t

    t = time.perf_counter()
    ldm_cfg = load_config(
        config,
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
    train, real = _evaluation_cells(ldm_cfg)
    keys = list(ldm_cfg.data.condition_keys)
    requests = _requests(real, keys)
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
    opts = EvalOptions(
        condition_keys=keys,
        holdout=Holdout([dict(c) for c in ldm_cfg.data.holdout_combinations]),
        seed=ldm_cfg.seed,
        vae_checkpoint=str(vae_path),
    )
    records = evaluate(real, generated, out, opts, train=train)
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    report = {
        "dataset": ldm_cfg.data.builtin,
        "condition_keys": keys,
        "holdout_combinations": opts.holdout.combinations,
        "n_train_cells": int(train.n_obs),
        "n_real_cells": int(real.n_obs),
        "n_genes": int(real.n_vars),
        "metrics": records,
        "timings": timings,
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "checkpoints": {"vae": str(vae_path), "ldm": str(ldm_path)},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    with open(out / "report.md", "a") as md:
        md.write(_timing_markdown(timings))
    return report


def _labels(adata, keys: list[str]) -> pd.DataFrame:
    return pd.DataFrame({k: adata.obs[k].astype(str).to_numpy() for k in keys})


def _evaluation_cells(cfg) -> tuple[ad.AnnData, ad.AnnData]:
    """(train, real): the train split without held-out cells; the test split plus every held-out cell."""
    cells = read_anndata(soma_spec(cfg.data, None))
    return split_real(cells, cfg.data.split_key, [dict(c) for c in cfg.data.holdout_combinations])


def _requests(real: ad.AnnData, keys: list[str]) -> list[tuple[dict[str, str], int]]:
    """As many cells of each condition combination as the real cells hold."""
    table = _labels(real, keys).value_counts(sort=False).sort_index()
    return [(dict(zip(keys, combo, strict=True)), int(n)) for combo, n in table.items()]


def _guidance(cfg) -> dict[str, float]:
    return {k: cfg.sample.guidance for k in cfg.data.condition_keys}


def _timing_markdown(t: dict[str, float]) -> str:
    return (
        f"\n## Time\n{t['total_s']:.0f} s in all (prepare {t['prepare_s']:.0f} s, VAE {t['train_vae_s']:.0f} s, "
        f"prior {t['train_ldm_s']:.0f} s, generation {t['generate_s']:.0f} s, evaluation {t['evaluate_s']:.0f} s).\n"
    )
