"""`scldm-scale evaluate`: read real, generated and (optionally) training cells, build the baselines on
the same split, compute every metric, and write metrics.json, report.md and the figures.

metrics.json is a list of records {"metric", "condition", "method", "value"}: `method` is "generated" for the
file under evaluation, the baseline's name otherwise, "reconstruction_ceiling" for the real cells encoded,
decoded and sampled by the VAE (with --vae-checkpoint; scored like every method), "train_reconstruction" for
the noise floor's training cells through the VAE the same way (with --vae-checkpoint, training cells and the
real_train_cells baseline), and "reconstruction" for the VAE's reconstruction figures; `condition` is "all",
"key=value", "k1=v1, k2=v2", "seen" or "unseen".
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scldm_scale import artifact
from scldm_scale.config import BASELINES, EvalConfig, HoldoutConfig, add_option, from_flags, parse_pairs
from scldm_scale.data.counts import DataError, validate_counts
from scldm_scale.data.holdout import combination_mask, describe, holdout_mask
from scldm_scale.evaluate import baselines, plots, report
from scldm_scale.evaluate.conditions import combination_labels
from scldm_scale.evaluate.embed import Embedder
from scldm_scale.evaluate.suite import (
    CEILING,
    GENERATED,
    PREPROCESSING,
    TRAIN_RECONSTRUCTION,
    CellSet,
    Features,
    Preprocessor,
    align_genes,
    compare,
)
from scldm_scale.outputs import add_overwrite, claim_output, staged

log = logging.getLogger(__name__)


def _check_options(opts: EvalConfig, have_train: bool) -> None:
    unknown = sorted(set(opts.baselines) - set(BASELINES))
    if unknown:
        raise DataError(f"unknown baselines {unknown}; choose from {list(BASELINES)}")
    if "scvi" in opts.baselines:
        from scldm_scale.evaluate.scvi_baseline import require_scvi

        require_scvi()  # an optional extra: refused before any metric is computed
    if min(opts.n_pcs, opts.n_hvg, opts.scvi_epochs) < 1:
        raise DataError(
            f"--n-pcs, --n-hvg and --scvi-epochs must be >= 1, got {opts.n_pcs}, {opts.n_hvg} and {opts.scvi_epochs}"
        )
    for combo in opts.holdout.combinations:
        stray = sorted(set(combo) - set(opts.condition_keys))
        if stray or not combo:
            raise DataError(
                f"held-out combination {combo} must set some of the condition keys {opts.condition_keys}, only those"
            )
    if opts.holdout.combinations and not have_train:
        raise DataError("held-out combinations need the training cells (--train) for the additive-shift baseline")


def _baseline_sets(
    train: CellSet, real: CellSet, opts: EvalConfig, skipped: list[str], model_records: list[dict]
) -> dict[str, CellSet]:
    """The baselines' cell sets; records a baseline makes of itself (scVI's reconstruction) go to model_records."""
    out = {}
    if "independent_nb" in opts.baselines:
        counts, labels = baselines.independent_nb_cells(train.counts, train.labels, real.labels, opts.seed)
        out["independent_nb"] = CellSet(sp.csr_matrix(counts, dtype=np.float64), labels)
    if "scvi" in opts.baselines:
        from scldm_scale.evaluate.scvi_baseline import scvi_baseline

        fit = scvi_baseline(train.counts, train.labels, real.counts, real.labels, opts.seed, opts.scvi_epochs, skipped)
        out["scvi"], out["scvi_posterior"] = CellSet(*fit.prior), CellSet(*fit.posterior)
        model_records += fit.records()
    if opts.holdout.combinations and "additive_shift" in opts.baselines:
        made = _additive_shift(train, real, opts, skipped)
        if made is not None:
            out["additive_shift"] = made
    return out


def _floor_rows(real: ad.AnnData, train: ad.AnnData, opts: EvalConfig) -> tuple[np.ndarray, pd.DataFrame] | None:
    """The rows of the training cells that make the noise floor (the real cells' composition of condition
    combinations) and their labels; None without the real_train_cells baseline. The floor and the
    train_reconstruction row both take these rows."""
    if "real_train_cells" not in opts.baselines:
        return None
    keys = opts.condition_keys
    train_labels, real_labels = (
        CellSet.labels_of(train, keys, "train cells"),
        CellSet.labels_of(real, keys, "real cells"),
    )
    return baselines.matched_train_rows(train_labels, real_labels, opts.seed)


def _noise_floor(
    train: CellSet, floor_rows: tuple[np.ndarray, pd.DataFrame] | None, opts: EvalConfig
) -> tuple[CellSet | None, CellSet]:
    """The real_train_cells baseline (the training cells of `floor_rows`) and the cells the preprocessing is
    fitted on.

    A PCA fitted on a set spreads that set along its noise directions more than any other set, so the
    noise-floor cells would look farther from the real cells than they are: they are kept out of the fit,
    which uses the remaining training cells (all of them when too few remain for the PCA).
    """
    if floor_rows is None:
        return None, train
    rows, labels = floor_rows
    floor = CellSet(train.counts[rows], labels)
    rest = np.setdiff1d(np.arange(len(train)), rows)
    if len(rest) <= 2 * opts.n_pcs:
        log.warning("only %d training cells are not in the noise floor; the PCA is fitted on all of them", len(rest))
        return floor, train
    return floor, train.subset(rest)


def _train_reconstruction(vae: Embedder, opts: EvalConfig, train: ad.AnnData, rows: np.ndarray) -> ad.AnnData:
    """The noise floor's training cells (its `rows`) encoded, decoded and sampled through the VAE like the
    ceiling. When the training cells are the model's training split, the prior is trained to reproduce these
    cells' latents, so this set is what a prior that reproduced them exactly would generate: generated -
    train_reconstruction is the prior's share, and train_reconstruction - real_train_cells compares the same
    cells before and after the VAE. The ceiling reconstructs the very cells it is scored against, which flatters
    the neighbour and distance metrics."""
    from scldm_scale.evaluate.reconstruction import reconstruction_of

    # Rows repeat where a combination has fewer training cells than real ones: each repeat is its own NB draw.
    cells = ad.AnnData(
        X=train.X[rows], obs=train.obs.iloc[rows].set_axis([str(i) for i in range(len(rows))]), var=train.var
    )
    return reconstruction_of(vae, cells, torch.device("cpu"), opts.seed, what="the train cells")[1]


def _additive_shift(train: CellSet, real: CellSet, opts: EvalConfig, skipped: list[str]) -> CellSet | None:
    """The held-out combinations predicted by control cells plus the perturbation's shift elsewhere.

    Only combinations of exactly the context and perturbation keys can be predicted this way; others are
    listed in `skipped`. None when no combination could be predicted.
    """
    from scldm_scale.evaluate.perturbation import additive_shift_baseline

    h = opts.holdout
    counts, labels = [], []
    for combo in h.combinations:
        if set(combo) != {h.perturbation_key, h.context_key}:
            skipped.append(
                f"additive_shift: {describe(combo)} is not a ({h.context_key}, {h.perturbation_key}) pair "
                "(set --context-key / --perturbation-key)"
            )
            continue
        real_rows = combination_mask(real.labels, combo)
        if not real_rows.any():
            raise DataError(f"the real cells hold no cell of the held-out combination {describe(combo)}")
        try:
            made = additive_shift_baseline(
                train.counts,
                train.labels,
                dict(combo),
                n_cells=int(real_rows.sum()),
                seed=opts.seed,
                perturbation_key=h.perturbation_key,
                context_key=h.context_key,
                control_value=h.control_value,
            )
        except DataError as err:  # the same error, told which combination and which option to check
            raise DataError(f"additive_shift baseline for {describe(combo)}: {err} (see --control-value)") from None
        counts.append(made)
        labels.append(real.labels[real_rows])
    if not counts:
        return None
    return CellSet(sp.csr_matrix(np.concatenate(counts), dtype=np.float64), pd.concat(labels, ignore_index=True))


def evaluate(
    real: ad.AnnData,
    generated: ad.AnnData | Sequence[ad.AnnData],
    out_dir: str | Path,
    opts: EvalConfig,
    train: ad.AnnData | None = None,
) -> list[dict]:
    """Every metric of the generated cells and the baselines against the real cells; writes the report.

    `generated` may be several draws of one model (a list): draw d is scored with seed `opts.seed + d`, so
    every method is drawn again with it (the noise floor's training cells, the baselines' samples, the
    ceiling's NB draws, the metrics' subsamples and folds), and metrics.json holds each record's mean over
    the draws; metrics_draws.json holds every draw's records (with a "draw" field) and report.md their range.
    """
    draws = [generated] if isinstance(generated, ad.AnnData) else list(generated)
    if not draws:
        raise DataError("no generated cells to evaluate (give --generated at least once)")
    out = Path(out_dir)
    per_draw, skipped = [], []
    # The VAE is read once, when the first draw needs it (after that draw's cells are checked), for every draw.
    vae = functools.cache(lambda: Embedder.from_artifact(opts.vae_checkpoint, device="cpu"))
    for d, cells in enumerate(draws):
        label = f" (draw {d})" if len(draws) > 1 else ""
        scored = _score(real, cells, replace(opts, seed=opts.seed + d), train, label, vae)
        per_draw.append(scored)
        skipped += scored["skipped"]
    first = per_draw[0]
    records = first["records"] if len(draws) == 1 else mean_records([p["records"] for p in per_draw])
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(records, indent=1))
    if len(draws) > 1:
        every = [r | {"draw": d} for d, p in enumerate(per_draw) for r in p["records"]]
        (out / "metrics_draws.json").write_text(json.dumps(every, indent=1))
    figures = (
        _figures(out, first["real"], first["methods"], first["features"], records, opts.seed) if opts.plots else {}
    )
    context = {
        "inputs": _describe(first["aligned"], opts),
        "preprocessing": _preprocessing_text(opts, first["have_train"]),
        "skipped": list(dict.fromkeys(skipped)),
    }
    if len(draws) > 1:
        context["draws"] = report.draws_section([p["records"] for p in per_draw], opts.seed)
    (out / "report.md").write_text(report.render(context, records, figures))
    log.info("wrote %s, %s and %d figures", out / "metrics.json", out / "report.md", len(figures))
    return records


def mean_records(draws: list[list[dict]]) -> list[dict]:
    """Each (metric, condition, method) record's mean over the draws that have it, in the first draw's order
    (then any the first lacks); NaN values are left out of a mean, and a record with none is NaN."""
    values: dict[tuple, list[float]] = {}
    for records in draws:
        for r in records:
            values.setdefault((r["metric"], r["condition"], r["method"]), []).append(r["value"])
    out = []
    for (metric, condition, method), v in values.items():
        finite = [x for x in v if np.isfinite(x)]
        mean = float(np.mean(finite)) if finite else float("nan")
        out.append({"metric": metric, "condition": condition, "method": method, "value": mean})
    return out


def _score(
    real: ad.AnnData,
    generated: ad.AnnData,
    opts: EvalConfig,
    train: ad.AnnData | None,
    draw: str,
    vae: Callable[[], Embedder],
) -> dict:
    """One draw's records and what the figures and the report need of it; `draw` names it in messages, `vae`
    gives opts.vae_checkpoint's VAE."""
    _check_options(opts, train is not None)
    named = {"real": real, GENERATED: generated} | ({"train": train} if train is not None else {})
    for name, adata in named.items():
        what = f"{name} cells{draw if name == GENERATED else ''}"
        if adata.n_obs < 2:
            raise DataError(f"the {what} number {adata.n_obs}; evaluation needs at least 2")
        # Generated counts may be non-integer (some models emit expected counts); real ones may not.
        validate_counts(adata.X, what, allow_non_integer=name == GENERATED)
    floor_rows = None if train is None else _floor_rows(real, train, opts)
    recon = None
    if opts.vae_checkpoint:
        from scldm_scale.evaluate.reconstruction import reconstruction_of

        recon, named[CEILING] = reconstruction_of(vae(), real, torch.device("cpu"), opts.seed)
        if floor_rows is not None:
            named[TRAIN_RECONSTRUCTION] = _train_reconstruction(vae(), opts, train, floor_rows[0])
    aligned = align_genes(named, opts.intersect_genes)
    sets = {name: CellSet.from_anndata(a, opts.condition_keys, f"{name} cells") for name, a in aligned.items()}
    real_set, reference = sets["real"], sets.get("train", sets["real"])
    skipped: list[str] = []
    model_records: list[dict] = []
    methods = {GENERATED: sets[GENERATED]} | {
        name: sets[name] for name in (CEILING, TRAIN_RECONSTRUCTION) if name in sets
    }
    if "train" in sets:
        floor, reference = _noise_floor(sets["train"], floor_rows, opts)
        methods |= {"real_train_cells": floor} if floor is not None else {}
        methods |= _baseline_sets(sets["train"], real_set, opts, skipped, model_records)
    elif opts.baselines:
        skipped.append("baselines: no training cells (--train), so none was fitted")
    prep = Preprocessor(reference.counts, opts.n_pcs, opts.n_hvg)
    records, features = compare(real_set, methods, prep, opts.holdout.combinations, opts.seed, notes=skipped)
    records += model_records
    if opts.de:
        from scldm_scale.evaluate.de import de_records

        lognorm = {name: (cells.labels, features[name].lognorm) for name, cells in methods.items()}
        records += de_records(real_set.labels, features["real"].lognorm, lognorm, opts.seed, notes=skipped)
    if recon is not None:
        records += [
            {"metric": k, "condition": "all", "method": "reconstruction", "value": float(recon[k])}
            for k in ("nll_per_cell", "pearson_lognorm", "n_genes_missing")
        ]
    return {
        "records": records, "skipped": skipped, "real": real_set, "methods": methods, "features": features,
        "aligned": aligned, "have_train": "train" in sets,
    }  # fmt: skip


def _figures(
    out: Path, real: CellSet, methods: dict[str, CellSet], features: dict[str, Features], records, seed: int
) -> dict:
    """The figures that could be drawn, {file name: caption}; `features` as `compare` returns them."""
    real_f = features["real"]
    real_combo = combination_labels(real.labels)
    method_f = {name: features[name] for name in methods}
    gen = methods[GENERATED]
    plots.umap_plot(
        real_f.pcs, method_f[GENERATED].pcs, real_combo, combination_labels(gen.labels), out / "umap.png", seed
    )
    # Each method against the real cells of the combinations it generated.
    pairs = {}
    for name, cells in methods.items():
        covered = np.isin(real_combo, combination_labels(cells.labels))
        pairs[name] = (real_f.lognorm[covered], method_f[name].lognorm)
    plots.mean_var_plot(pairs, out / "mean_var.png")
    figures = {
        "umap.png": "UMAP of real and generated cells, by source and by condition",
        "mean_var.png": "per-gene means and variances, each method against the real cells it covers",
    }
    if plots.heatmap(records, GENERATED, out / "metric_by_condition.png"):
        figures["metric_by_condition.png"] = "metric by condition for the generated cells"
    return figures


def _describe(aligned: dict[str, ad.AnnData], opts: EvalConfig) -> str:
    sizes = ", ".join(f"{name} {a.n_obs} cells" for name, a in aligned.items())
    genes = next(iter(aligned.values())).n_vars
    held = f"; held-out combinations: {opts.holdout.combinations}" if opts.holdout.combinations else ""
    return f"Inputs: {sizes}; {genes} genes; condition keys {opts.condition_keys}{held}."


def _preprocessing_text(opts: EvalConfig, have_train: bool) -> str:
    fitted_on = (
        "the real training cells (less those drawn for the `real_train_cells` noise floor, which a fit would favour)"
        if have_train
        else "the real cells themselves (no --train was given, so the fit favours them over every other set)"
    )
    return (
        f"Counts normalised to {PREPROCESSING['target_sum']:.0e} per cell and log1p-transformed; PCA with "
        f"{opts.n_pcs} components and the {opts.n_hvg} highly variable genes (scanpy, flavor "
        f"{PREPROCESSING['hvg_flavor']!r}) fitted on {fitted_on} and applied to every set. Seed {opts.seed}."
    )


def read_cells(path: str | Path, what: str, layer: str | None = None) -> ad.AnnData:
    """Counts from an .h5ad (X, or `layer`) or a SOMA experiment folder (its `counts` layer)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"the {what} cells: {path} does not exist")
    if path.is_dir():
        from scldm_scale.data.soma import SomaSpec, read_anndata

        return read_anndata(SomaSpec(uri=str(path), layer=layer or "counts"))
    from scldm_scale.data.counts import read_counts

    return read_counts(path, layer, flag="--layer")


def split_real(
    adata: ad.AnnData, split_key: str, holdout: Sequence[dict[str, str]] = ()
) -> tuple[ad.AnnData, ad.AnnData] | None:
    """(train, real) from the split column `prepare` writes, or None when the cells have no such column.

    Training cells are the train split less every held-out cell; real cells are the test split plus every
    held-out cell (a held-out combination was never trained on, whatever its split).
    """
    if split_key not in adata.obs:
        return None
    split = adata.obs[split_key].astype(str).to_numpy()
    held = holdout_mask(adata.obs, holdout)
    train, real = (split == "train") & ~held, (split == "test") | held
    if not train.any() or not real.any():
        raise DataError(
            f"obs[{split_key!r}] leaves {int(train.sum())} training and {int(real.sum())} real cells; it holds "
            f"{sorted(set(split))} (train and test are used)"
        )
    log.info("cells split by obs[%r]: %d train, %d real", split_key, int(train.sum()), int(real.sum()))
    return adata[train].copy(), adata[real].copy()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale evaluate`; the options are views of `EvalConfig` and `HoldoutConfig`."""
    parser.add_argument("--real", required=True, help="real cells: .h5ad of counts or a SOMA experiment folder")
    generated_help = (
        "generated cells: .h5ad of counts; repeatable for several draws of one model, each scored with --seed + its "
        "position and metrics.json holding the means (default: required, given once)"
    )
    parser.add_argument("--generated", required=True, action="append", help=generated_help)
    train_help = (
        "real training cells: the baselines and the PCA are fitted on them (default: the train split of --real "
        "by --split-key; without that column, none: no baselines, the PCA fitted on --real)"
    )
    parser.add_argument("--train", help=train_help)
    layer_help = "the layer of --real / --train that holds raw counts, or raw.X for .raw.X (default X)"
    parser.add_argument("--layer", help=layer_help)
    split_help = "without --train, a --real column with train/test values splits it into training and real cells"
    parser.add_argument("--split-key", default="split", help=split_help)
    add_option(parser, EvalConfig, "condition_keys", "--condition-key", action="append", metavar="KEY")
    add_option(parser, EvalConfig, "intersect_genes")
    add_option(parser, EvalConfig, "baselines")
    add_option(parser, HoldoutConfig, "combinations", "--holdout", action="append", metavar="KEY=VALUE,...")
    for name in ("perturbation_key", "context_key", "control_value"):
        add_option(parser, HoldoutConfig, name)
    for name in ("vae_checkpoint", "n_pcs", "n_hvg", "scvi_epochs", "seed"):
        add_option(parser, EvalConfig, name)
    add_option(parser, EvalConfig, "plots", "--no-plots")
    add_option(parser, EvalConfig, "de", "--no-de")
    parser.add_argument("--out", required=True, help="folder for metrics.json, report.md and the figures")
    add_overwrite(parser, "the evaluation folder at --out (one with a metrics.json)")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    combinations = [parse_pairs(c.split(","), "--holdout") for c in args.combinations]
    opts = from_flags(EvalConfig, args, holdout=from_flags(HoldoutConfig, args, combinations=combinations))
    claim_output(args.out, "an evaluation folder", "--out", args.overwrite, folder=True, marker="metrics.json")
    if opts.vae_checkpoint:
        artifact.load(opts.vae_checkpoint)  # a missing or corrupt model is refused now, not after the metrics
    real = read_cells(args.real, "real", args.layer)
    train = read_cells(args.train, "train", args.layer) if args.train else None
    if train is None and (parts := split_real(real, args.split_key, combinations)) is not None:
        train, real = parts
    generated = [read_cells(path, "generated") for path in args.generated]
    with staged(args.out) as out:
        evaluate(real, generated, out, opts, train=train)
    print(f"wrote {args.out}/metrics.json, report.md and the figures")
