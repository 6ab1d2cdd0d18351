"""report.md from the metric records: tables per method and condition, the held-out combinations, the
VAE reconstruction, the figures and what each metric means."""

from __future__ import annotations

import math

import numpy as np

from scldm_scale.evaluate.scvi_baseline import RECONSTRUCTION as SCVI_RECONSTRUCTION
from scldm_scale.evaluate.scvi_baseline import scvi_section
from scldm_scale.evaluate.suite import CEILING, GENERATED, TRAIN_RECONSTRUCTION

# Higher is better for these; the rest are lower-is-better, or best at 0.5 (the two-sample accuracies).
DEFINITIONS = {
    "n_real_cells": "real cells in the comparison (the real cells of the conditions the method has)",
    "n_cells": "the method's cells in the comparison",
    "mmd": "squared MMD, RBF kernel averaged over bandwidths (0.25, 0.5, 1, 2, 4) × the median pairwise "
    "distance, on the PCs (lower is better; 0 = same sample)",
    "wasserstein2": "2-Wasserstein distance, exact optimal transport (POT) on up to 2,000 cells a side, on the "
    "PCs (lower is better)",
    "frechet": "Fréchet distance between Gaussian fits of the PCs (lower is better)",
    "mean_r2": "R² of per-gene means of log-normalised counts, generated predicting real (higher is better)",
    "var_r2": "R² of per-gene variances (higher is better)",
    "mean_pearson": "Pearson r of per-gene means (higher is better)",
    "var_pearson": "Pearson r of per-gene variances (higher is better)",
    "dropout_mae": "mean absolute difference of per-gene fractions of zero counts (lower is better)",
    "one_nn_accuracy": "leave-one-out 1-NN accuracy telling real from generated on the highly variable genes "
    "(0.5 is perfect, 1 = fully separable)",
    "c2st_accuracy": "cross-validated accuracy of a classifier telling real from generated on the PCs (0.5 is perfect)",
    "precision": "k-NN precision (Kynkäänniemi et al. 2019): generated cells inside the real manifold (higher)",
    "recall": "k-NN recall: real cells inside the generated manifold (higher is better)",
    "density": "k-NN density (Naeem et al. 2020): about 1 when generated cells are as dense as real ones",
    "coverage": "k-NN coverage (Naeem et al. 2020): real cells with a generated cell in their k-NN ball (higher)",
}
# The per-condition tables shown in full; every other metric is in metrics.json and the heatmap.
PER_CONDITION_METRICS = ("mmd", "wasserstein2", "c2st_accuracy")
# The metrics whose gap to the noise floor is split into the VAE's and the prior's shares (all lower-is-better,
# the two-sample accuracies towards 0.5).
DECOMPOSED_METRICS = ("mmd", "frechet", "wasserstein2", "c2st_accuracy", "one_nn_accuracy")
FLOOR = "real_train_cells"


def _fmt(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _ordered(records: list[dict], field: str) -> list[str]:
    return list(dict.fromkeys(r[field] for r in records))


def summary_table(records: list[dict], condition: str = "all") -> str:
    """One row per method, one column per metric, for one condition."""
    metrics = _ordered(records, "metric")
    value = {(r["method"], r["metric"]): r["value"] for r in records if r["condition"] == condition}
    rows = [[m] + [_fmt(value.get((m, k))) for k in metrics] for m in _ordered(records, "method")]
    return _table(["method", *metrics], rows)


def per_condition_table(records: list[dict], metric: str, skip: tuple[str, ...] = ("all",)) -> str:
    """One row per condition, one column per method, for one metric."""
    methods = _ordered(records, "method")
    value = {(r["method"], r["condition"]): r["value"] for r in records if r["metric"] == metric}
    conditions = [c for c in _ordered(records, "condition") if c not in skip]
    return _table(["condition", *methods], [[c] + [_fmt(value.get((m, c))) for m in methods] for c in conditions])


def holdout_table(records: list[dict]) -> str:
    """Seen vs unseen combinations: one row per (method, group), one column per metric."""
    metrics = _ordered(records, "metric")
    value = {(r["method"], r["condition"], r["metric"]): r["value"] for r in records}
    rows = []
    for group in ("unseen", "seen"):
        for method in _ordered(records, "method"):
            if any((method, group, k) in value for k in metrics):
                rows.append([group, method] + [_fmt(value.get((method, group, k))) for k in metrics])
    return _table(["combinations", "method", *metrics], rows)


def decomposition_table(records: list[dict], condition: str = "all") -> str | None:
    """The gap of the generated cells to the noise floor, one row per metric, split at the training cells through
    the VAE (the prior's target): the VAE's share (train_reconstruction - floor, the same training cells) and the
    prior's (generated - train_reconstruction); the reconstruction ceiling is shown beside them. None without the
    floor, the train_reconstruction and the generated rows."""
    value = {(r["method"], r["metric"]): r["value"] for r in records if r["condition"] == condition}
    rows = []
    for metric in DECOMPOSED_METRICS:
        floor, target, ceiling, generated = (
            value.get((method, metric)) for method in (FLOOR, TRAIN_RECONSTRUCTION, CEILING, GENERATED)
        )
        if None in (floor, target, generated):
            continue
        gap = generated - floor
        share = f"{(target - floor) / gap:.0%}" if gap > 0 else "–"
        cells = [floor, target, ceiling, generated, target - floor, generated - target]
        rows.append([metric] + [_fmt(v) for v in cells] + [share])
    if not rows:
        return None
    header = ["metric", "noise floor", "training cells through the VAE", "reconstruction ceiling", "generated"]
    return _table([*header, "VAE share", "prior share", "VAE % of gap"], rows)


# The metrics whose range over generation draws report.md shows (every record's mean is in metrics.json).
DRAW_METRICS = ("mmd", "frechet", "c2st_accuracy", "one_nn_accuracy", "de_lfc_pearson", "de_top50_overlap")


def draws_section(draws: list[list[dict]], seed: int) -> list[str]:
    """The report's lines on several generation draws: how they were scored and, per method, the mean and
    the range over the draws of the headline metrics (all conditions)."""
    values: dict[tuple[str, str], list[float]] = {}
    for records in draws:
        for r in records:
            if r["condition"] == "all" and r["metric"] in DRAW_METRICS:
                values.setdefault((r["method"], r["metric"]), []).append(r["value"])
    metrics = [m for m in DRAW_METRICS if any(k[1] == m for k in values)]
    methods = list(dict.fromkeys(method for method, _ in values))

    def cell(method: str, metric: str) -> str:
        v = values.get((method, metric))
        return "–" if not v else f"{_fmt(float(np.mean(v)))} ({_fmt(min(v))}–{_fmt(max(v))})"

    return [
        "",
        f"## {len(draws)} generation draws",
        f"Draw d was scored with seed {seed} + d: every method was drawn again with it (the noise floor's training "
        "cells, the baselines' samples, the ceiling's NB draws, the metrics' subsamples and folds). Every value in "
        "this report is the mean over the draws (each draw's records: metrics_draws.json); below, mean (min–max).",
        "",
        _table(["method", *metrics], [[m] + [cell(m, k) for k in metrics] for m in methods]),
    ]


def render(context: dict, records: list[dict], figures: dict[str, str]) -> str:
    """The whole report; `context` holds the inputs' description and what was skipped."""
    generation = [r for r in records if r["method"] not in ("reconstruction", SCVI_RECONSTRUCTION)]
    out = [
        "# scldm-scale evaluation report",
        "",
        context["inputs"],
        "",
        "## Preprocessing (fixed)",
        context["preprocessing"],
        "",
        "## All conditions",
        "Every method is compared with the real cells of the conditions it generated. "
        "`real_train_cells` is the noise floor: real cells that no model generated. "
        "`reconstruction_ceiling` (with a VAE) is the real cells encoded, decoded and sampled through the VAE's "
        "head with their own library sizes; `train_reconstruction` (with a VAE and training cells) is the noise "
        "floor's training cells through the VAE the same way: what a prior that reproduced its training latents "
        "exactly would generate.",
        "",
        summary_table(generation),
    ]
    out += context.get("draws", [])
    decomposition = decomposition_table(generation)
    if decomposition:
        out += [
            "",
            "## Where the gap to the noise floor comes from",
            "VAE share = training cells through the VAE - noise floor (the same training cells, without and with "
            "the VAE); prior share (latent prior and library-size model) = generated - training cells through the "
            "VAE, the set the prior is trained to reproduce when the training cells are the model's training split. "
            "The reconstruction ceiling (the real cells through the VAE: how it does on cells it never trained on) "
            "reconstructs the very cells it is compared with: each reconstruction lies near its own cell, which "
            "flatters the neighbour metrics (1-NN) and the distances, so it can score below the noise floor and is "
            "not a split point. C2ST's floor can sit below its best value 0.5, so read its shares with care.",
            "",
            decomposition,
        ]
    if any(r["condition"] == "unseen" for r in generation):
        out += ["", "## Held-out combinations (never seen in training) vs seen ones", "", holdout_table(generation)]
    for metric in PER_CONDITION_METRICS:
        if any(r["metric"] == metric for r in generation):
            out += ["", f"## {metric} per condition", "", per_condition_table(generation, metric)]
    out += [
        "",
        "Distances and two-sample scores depend on the number of cells compared, so compare methods within a "
        "row, not conditions with one another.",
    ]
    from scldm_scale.evaluate.de import de_section

    out += de_section(generation)
    recon = {r["metric"]: r["value"] for r in records if r["method"] == "reconstruction"}
    if recon:
        out += [
            "",
            "## VAE reconstruction of the real cells",
            f"- NB negative log-likelihood per cell: {recon['nll_per_cell']:.2f}",
            f"- Pearson r, reconstructed vs observed log-normalised counts: {recon['pearson_lognorm']:.4f}",
        ]
        if recon.get("n_genes_missing"):
            out.append(f"- over the measured genes: {recon['n_genes_missing']:.0f} of the model's genes are missing")
    out += scvi_section(records)
    out += ["", "## Figures"] + [f"![{caption}]({name})" for name, caption in figures.items()]
    if context.get("skipped"):
        out += ["", "## Skipped"] + [f"- {s}" for s in context["skipped"]]
    out += ["", "## Metrics"] + [f"- `{k}`: {v}" for k, v in DEFINITIONS.items()]
    return "\n".join(out) + "\n"
