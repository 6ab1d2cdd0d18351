"""Differential expression recovered: do a method's cells show the real cells' DE genes and log-fold changes?

For each condition key and each of its values, the cells of that value are tested against the rest of
the cells (one-vs-rest), once on the real cells and once on the method's cells, each set on its own:
- The test is scanpy's `rank_genes_groups`, Welch's t-test (scanpy's default, `TEST`), on log-normalised
  counts (1e4 per cell, log1p), Benjamini–Hochberg adjusted; a gene is significant at adjusted p < `ALPHA`
  (0.05). Not Wilcoxon: scanpy's Wilcoxon compiles numba code the first time a new environment runs it
  (57 s on the busy 2-core machine, 2026-12-07; the t-test 0.2 s), a cost every fresh quickstart would pay.
- `de_lfc_pearson`: Pearson r of the log2 fold changes, method vs real, over the genes significant in
  the real cells (needs `MIN_SIGNIFICANT` of them). The log2 fold change of a gene is
  log2((mean normalised expression of the value + 1) / (mean of the rest + 1)), the normalised
  expression being expm1 of the log-normalised counts (counts per 1e4). The pseudocount 1 is Seurat's;
  scanpy's own `logfoldchanges` add 1e-9, which puts a gene absent on one side near ±30 and lets a few
  such genes decide the correlation.
- `de_top50_overlap`: |top-50 of the method ∩ top-50 of the real cells| / 50, the top genes being the
  first 50 of scanpy's ranking (t statistic, descending: the genes most up in the value). By chance
  it is about 50 / genes.
- `de_n_significant`: how many genes are significant in the real cells (context, not a score).

A method is compared with the real cells of the condition combinations it generated, as everywhere in
`evaluate`. Each side of a test (the value and the rest) needs `MIN_CELLS` cells in both sets and is
subsampled to `MAX_CELLS` cells (seeded), which keeps the test's cost bounded on large sets. The
"all" record of each metric is the mean over the values that were scored.
`de_section` writes the report's part: the definitions and one row per condition value.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc

from scldm_scale.evaluate.conditions import groups
from scldm_scale.evaluate.metrics import pearson

log = logging.getLogger(__name__)

ALPHA = 0.05
TOP_GENES = 50
MIN_CELLS = 3
MIN_SIGNIFICANT = 3
MAX_CELLS = 2000
TEST = "t-test"
DE_METRICS = ("de_lfc_pearson", "de_top50_overlap", "de_n_significant")


@dataclass
class DETest:
    """One one-vs-rest test over the genes: log2 fold changes, adjusted p-values, and the gene indices in
    scanpy's order (by score, descending)."""

    lfc: np.ndarray
    pvals_adj: np.ndarray
    ranking: np.ndarray


def _subsample(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(rows, size=MAX_CELLS, replace=False)) if len(rows) > MAX_CELLS else rows


def de_test(lognorm: np.ndarray, in_group: np.ndarray, seed: int = 0, rest: np.ndarray | None = None) -> DETest:
    """The cells where `in_group` is True against those where `rest` is (default: all the others), on
    (cells, genes) log-normalised counts; only the rows tested are copied."""
    rng = np.random.default_rng(seed)
    inside = _subsample(np.flatnonzero(in_group), rng)
    rest = _subsample(np.flatnonzero(~in_group if rest is None else rest & ~in_group), rng)
    if min(len(inside), len(rest)) < MIN_CELLS:
        raise ValueError(f"de_test needs {MIN_CELLS} cells on each side; got {len(inside)} and {len(rest)}")
    x = np.asarray(lognorm[np.concatenate([inside, rest])], dtype=np.float64)
    n_genes = x.shape[1]
    side = pd.Categorical(["in"] * len(inside) + ["rest"] * len(rest), categories=["in", "rest"])
    adata = ad.AnnData(X=x, obs=pd.DataFrame({"side": side}, index=[str(i) for i in range(len(x))]))
    adata.var_names = [str(i) for i in range(n_genes)]
    adata.uns["log1p"] = {"base": None}  # natural log1p, as metrics.normalize_log1p writes it
    with warnings.catch_warnings():
        # Constant genes make the test divide by a zero variance and warn; their p-value is set to 1 below.
        warnings.simplefilter("ignore", RuntimeWarning)
        sc.tl.rank_genes_groups(
            adata, "side", groups=["in"], reference="rest", method=TEST, n_genes=n_genes,
            corr_method="benjamini-hochberg", use_raw=False,
        )  # fmt: skip
    result = adata.uns["rank_genes_groups"]
    ranking = np.asarray(result["names"]["in"]).astype(int)
    pvals_adj = np.ones(n_genes)
    pvals_adj[ranking] = np.nan_to_num(np.asarray(result["pvals_adj"]["in"], dtype=np.float64), nan=1.0)
    expressed = np.expm1(x)
    lfc = np.log2((expressed[: len(inside)].mean(0) + 1.0) / (expressed[len(inside) :].mean(0) + 1.0))
    return DETest(lfc=lfc, pvals_adj=pvals_adj, ranking=ranking)


def de_recovery(real: DETest, generated: DETest, n_top: int = TOP_GENES) -> dict[str, float]:
    """The method's test against the real one: `de_lfc_pearson` (NaN with fewer than MIN_SIGNIFICANT
    significant real genes, or a constant side), `de_top50_overlap` (over the top `n_top`; n_top is 50
    in `evaluate`) and `de_n_significant`."""
    significant = real.pvals_adj < ALPHA
    r = float("nan")
    if significant.sum() >= MIN_SIGNIFICANT:
        a, b = real.lfc[significant], generated.lfc[significant]
        if a.std() > 0 and b.std() > 0:
            r = pearson(a, b)
    k = min(n_top, len(real.ranking))
    overlap = len(np.intersect1d(real.ranking[:k], generated.ranking[:k])) / k
    return {"de_lfc_pearson": r, "de_top50_overlap": overlap, "de_n_significant": float(significant.sum())}


def de_records(
    real_labels: pd.DataFrame,
    real_lognorm: np.ndarray,
    methods: dict[str, tuple[pd.DataFrame, np.ndarray]],
    seed: int = 0,
    n_top: int = TOP_GENES,
    notes: list[str] | None = None,
) -> list[dict]:
    """Records {metric, condition, method, value} of DE recovery, condition "key=value" for each value of
    each condition key and "all" for the mean over the values scored.

    `methods` maps a method to (its condition labels, its log-normalised cells); the real cells'
    tests are shared by the methods that cover the same condition combinations. Values too small to
    test on either side are listed in `notes`.
    """
    notes = notes if notes is not None else []
    cache: dict[tuple, DETest] = {}
    records = []
    for method, (gen_labels, gen_lognorm) in methods.items():
        _, real_in, gen_in = next(groups(real_labels, gen_labels))
        scored: dict[str, list[float]] = {}
        for key in real_labels.columns:
            real_values, gen_values = real_labels[key].to_numpy(), gen_labels[key].to_numpy()
            for value in np.unique(gen_values[gen_in]):
                condition = f"{key}={value}"
                real_side, gen_side = real_in & (real_values == value), gen_in & (gen_values == value)
                sizes = [int(s.sum()) for s in (real_side, real_in & ~real_side, gen_side, gen_in & ~gen_side)]
                if min(sizes) < MIN_CELLS:
                    notes.append(
                        f"DE {method}, {condition}: {sizes[0]}/{sizes[1]} real and {sizes[2]}/{sizes[3]} "
                        f"of its cells in the value/the rest; a test needs {MIN_CELLS} on each side"
                    )
                    continue
                cache_key = (key, value, real_in.tobytes())
                if cache_key not in cache:
                    cache[cache_key] = de_test(real_lognorm, real_side, seed, rest=real_in)
                values = de_recovery(cache[cache_key], de_test(gen_lognorm, gen_side, seed, rest=gen_in), n_top)
                for metric, v in values.items():
                    if np.isfinite(v):
                        records.append({"metric": metric, "condition": condition, "method": method, "value": v})
                        scored.setdefault(metric, []).append(v)
        for metric in DE_METRICS:
            if scored.get(metric):
                records.append(
                    {"metric": metric, "condition": "all", "method": method, "value": float(np.mean(scored[metric]))}
                )
        log.info("DE recovery of %s: %d condition values scored", method, len(scored.get("de_top50_overlap", [])))
    return records


DEFINITIONS = {
    "de_lfc_pearson": f"Pearson r of log2 fold changes (value vs the rest), method vs real, over the genes "
    f"significant in the real cells ({TEST}, BH-adjusted p < {ALPHA}); higher is better, 1 = the real DE",
    "de_top50_overlap": f"fraction of the real cells' top {TOP_GENES} DE genes ({TEST} score, up in the value) "
    f"among the method's top {TOP_GENES}; higher is better, chance ≈ {TOP_GENES} / genes",
    "de_n_significant": "genes significant in the real cells (context, not a score)",
}


def de_section(records: list[dict]) -> list[str]:
    """The report's DE part, as lines: what was tested, the metrics' meaning, and a table with one row per
    condition value (the real DE genes, then r / overlap of each method); no lines without DE records."""
    de = [r for r in records if r["metric"] in DE_METRICS and r["condition"] != "all"]
    if not de:
        return []
    methods = list(dict.fromkeys(r["method"] for r in de))
    conditions = list(dict.fromkeys(r["condition"] for r in de))
    value = {(r["method"], r["condition"], r["metric"]): r["value"] for r in de}

    def cell(method: str, condition: str) -> str:
        r, overlap = (value.get((method, condition, k)) for k in ("de_lfc_pearson", "de_top50_overlap"))
        if overlap is None:
            return "–"
        return ("–" if r is None else f"{r:.3f}") + f" / {overlap:.2f}"

    rows = []
    for condition in conditions:
        n = [value[(m, condition, "de_n_significant")] for m in methods if (m, condition, "de_n_significant") in value]
        rows.append([condition, f"{n[0]:.0f}" if n else "–"] + [cell(m, condition) for m in methods])
    header = ["condition", "real DE genes", *methods]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [
        "",
        "## Differential expression recovered",
        f"Each condition value against the rest of the cells, on the real cells and on each method's cells apart: "
        f"scanpy's rank_genes_groups ({TEST}, log-normalised counts, Benjamini-Hochberg), significant at "
        f"adjusted p < {ALPHA}. Each cell: `de_lfc_pearson` / `de_top50_overlap` (the summary table holds their "
        f"means over the values). A dash: too few cells ({MIN_CELLS} a side) or significant genes "
        f"({MIN_SIGNIFICANT}).",
        "",
        *lines,
        "",
        *[f"- `{k}`: {v}" for k, v in DEFINITIONS.items()],
    ]
