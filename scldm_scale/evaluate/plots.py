"""The report's figures, written as PNG: UMAP of real and generated cells, per-gene mean/variance
agreement, and a metric-by-condition heatmap. matplotlib's Agg backend: no display needed."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

log = logging.getLogger(__name__)
# UMAP is fitted on at most this many cells per side; beyond that a plot shows nothing more.
UMAP_MAX_CELLS = 5000
# Metrics where lower is better; the heatmap colours every column so that darker is worse.
LOWER_IS_BETTER = {"mmd", "wasserstein2", "frechet", "dropout_mae"}
# Accuracy-type two-sample metrics are best at 0.5, density at 1.
BEST_AT = {"one_nn_accuracy": 0.5, "c2st_accuracy": 0.5, "density": 1.0}
# Cell counts describe a group; they are not scored.
NOT_SCORED = {"n_real_cells", "n_cells", "de_n_significant"}


def _subsample(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=UMAP_MAX_CELLS, replace=False)) if n > UMAP_MAX_CELLS else np.arange(n)


def umap_embedding(x: np.ndarray, seed: int, n_neighbors: int = 15) -> np.ndarray:
    """2-D UMAP of the rows of x, from their exact nearest neighbours.

    At most 2 x UMAP_MAX_CELLS rows, so exact neighbours (sklearn, as scanpy uses below 4,096 cells) cost
    little, and handing them to umap-learn skips its approximate search, whose parallel numba code is
    compiled anew in every process (CPU time of a 284-cell plot: 7.3 s instead of 13.1 s). The numba
    functions that remain are cached on disk; launch/_venv.sh fills that cache when it builds .venv.
    """
    import warnings

    import umap
    from sklearn.neighbors import NearestNeighbors

    k = max(2, min(n_neighbors, len(x) - 1))
    dists, idx = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)  # each row's first neighbour is itself
    with warnings.catch_warnings():
        # umap warns that transform() needs the search index it was not given; only fit_transform is used.
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
        reducer = umap.UMAP(n_neighbors=k, random_state=seed, n_jobs=1, precomputed_knn=(idx, dists, None))
        return reducer.fit_transform(x)


def umap_plot(
    real_pcs: np.ndarray, gen_pcs: np.ndarray, real_cond: np.ndarray, gen_cond: np.ndarray, path: Path, seed: int
) -> None:
    """One UMAP of the pooled PCs, drawn twice: coloured by source and by condition."""
    rng = np.random.default_rng(seed)
    r, g = _subsample(len(real_pcs), rng), _subsample(len(gen_pcs), rng)
    pooled = np.concatenate([real_pcs[r], gen_pcs[g]])
    log.info("UMAP of %d cells", len(pooled))
    xy = umap_embedding(pooled, seed)
    source = np.array(["real"] * len(r) + ["generated"] * len(g))
    condition = np.concatenate([real_cond[r], gen_cond[g]]).astype(str)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, colour_by, title in ((axes[0], source, "source"), (axes[1], condition, "condition")):
        values = list(dict.fromkeys(colour_by))
        cmap = plt.get_cmap("tab10" if len(values) <= 10 else "tab20")
        for i, v in enumerate(values):
            sel = colour_by == v
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(i % cmap.N), label=v, alpha=0.7, linewidths=0)
        ax.set_title(f"UMAP of real and generated cells, by {title}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(markerscale=3, fontsize=7, loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_var_plot(pairs: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> None:
    """Per-gene mean (top) and variance (bottom) of each method against the real cells it is compared with.

    `pairs` maps a method to (real log-normalised cells, its own log-normalised cells).
    """
    fig, axes = plt.subplots(2, len(pairs), figsize=(4 * len(pairs), 8), squeeze=False)
    for col, (method, (real, generated)) in enumerate(pairs.items()):
        for row, (stat, fn) in enumerate((("mean", np.mean), ("variance", np.var))):
            x, y = fn(real, axis=0), fn(generated, axis=0)
            ax = axes[row, col]
            ax.scatter(x, y, s=3, alpha=0.5, linewidths=0)
            hi = float(max(x.max(), y.max()))
            ax.plot([0, hi], [0, hi], color="grey", lw=0.8)
            ax.set_xlabel(f"real per-gene {stat}")
            ax.set_ylabel(f"{method} per-gene {stat}")
            ax.set_title(f"{method}: {stat} (log-normalised)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _badness(column: pd.Series) -> pd.Series:
    """Per metric, 0 = the best value in the column and 1 = the worst, so colours compare across metrics."""
    if column.name in BEST_AT:
        column = (column - BEST_AT[column.name]).abs()
    elif column.name not in LOWER_IS_BETTER:
        column = -column
    span = column.max() - column.min()
    return (column - column.min()) / span if span > 0 else column * 0.0


def heatmap(records: list[dict], method: str, path: Path) -> bool:
    """Conditions × metrics for one method, values printed, colour = rank within the metric's column.

    False (and no file) when the method has no per-condition record.
    """
    scored = [r for r in records if r["method"] == method and r["condition"] != "all" and r["metric"] not in NOT_SCORED]
    table = pd.DataFrame(scored)
    if table.empty:
        return False
    # Rows and columns in the records' order (values, then combinations, then seen/unseen), not sorted.
    order = {axis: list(dict.fromkeys(table[axis])) for axis in ("condition", "metric")}
    table = table.pivot(index="condition", columns="metric", values="value")
    table = table.reindex(index=order["condition"], columns=order["metric"])
    colours = table.apply(_badness)
    fig, ax = plt.subplots(figsize=(1.1 * table.shape[1] + 3, 0.4 * table.shape[0] + 2))
    ax.imshow(colours.to_numpy(dtype=float), cmap="Reds", aspect="auto", vmin=0, vmax=1.3)
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=8)
    for (i, j), value in np.ndenumerate(table.to_numpy(dtype=float)):
        ax.text(j, i, "" if np.isnan(value) else f"{value:.3g}", ha="center", va="center", fontsize=6)
    ax.set_title(f"{method}: metric by condition (darker = worse within a metric; small groups score worse)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
