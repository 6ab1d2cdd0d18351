"""`scldm-scale quickstart`: the whole pipeline on a built-in dataset, end to end.

prepare (the built-in cells into SOMA, fixed stratified split) -> train VAE -> train DiT prior ->
generate as many cells of each condition combination as the real cells hold -> `evaluate` them beside
the baselines -> report.json, metrics.json, report.md and the figures.

The real cells are the test split plus every cell of a held-out combination (`data.holdout_combinations`,
never trained on); the training cells are the rest. configs/quickstart.yaml is the PBMC default;
configs/perturbation.yaml is the unseen-combination demo.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import anndata as ad
import pandas as pd
import torch

from scldm_scale.artifact import record_evaluation
from scldm_scale.config import CONFIG_DIR, EvalConfig, HoldoutConfig, load_config
from scldm_scale.data.counts import load_builtin
from scldm_scale.data.prepare import prepare
from scldm_scale.data.soma import read_anndata
from scldm_scale.data.source import soma_spec
from scldm_scale.evaluate.run import evaluate, split_real
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
        sampler=ldm_cfg.sample,
        seed=ldm_cfg.seed,
        progress=ldm_cfg.train.progress,
    )
    generated.write_h5ad(out / "generated.h5ad")
    timings["generate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    opts = EvalConfig(
        condition_keys=keys,
        holdout=HoldoutConfig([dict(c) for c in ldm_cfg.data.holdout_combinations]),
        seed=ldm_cfg.seed,
        vae_checkpoint=str(vae_path),
    )
    records = evaluate(real, generated, out, opts, train=train)
    _record_on_model_cards(records, vae_path, ldm_path, ldm_cfg.data.builtin, int(real.n_obs))
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


def _record_on_model_cards(records: list[dict], vae_path: Path, ldm_path: Path, dataset: str, n_real: int) -> None:
    """The headline numbers of this run into the two artifacts' config.json and model cards."""
    split = {"evaluated on": f"{dataset}, {n_real} held-out test cells"}
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale quickstart`."""
    parser.add_argument("--out", default="quickstart_out", help="folder for everything the run writes")
    config_help = "a demo config (default configs/quickstart.yaml; configs/perturbation.yaml)"
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument("overrides", nargs="*", help="dot-list overrides of the config")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    report = run_quickstart(args.out, args.overrides, config=args.config)
    print((Path(args.out) / "report.md").read_text())
    print(
        f"wrote {args.out}/generated.h5ad, metrics.json, report.md, report.json and the figures "
        f"in {report['timings']['total_s']:.0f} s"
    )
