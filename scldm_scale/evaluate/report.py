"""Compare generated with real held-out cells, beside the independent-NB baseline and the noise floor.

Preprocessing (fixed): library-size normalisation to 1e4, log1p, PCA (30 components) fitted on the
real training cells and applied to every set. Metrics per method: RBF-kernel MMD in PCA space
(multi-bandwidth, see metrics.mmd_rbf), and R² of per-gene means and variances of the log-normalised
genes. Overall and per condition value.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from scldm_scale.evaluate.metrics import PCAProjector, mean_var_r2, mmd_rbf, normalize_log1p

N_COMPONENTS = 30


def compare(
    train_counts: sp.csr_matrix,
    test_counts: sp.csr_matrix,
    test_labels: np.ndarray,
    methods: dict[str, tuple[np.ndarray | sp.csr_matrix, np.ndarray]],
) -> list[dict]:
    """Records {metric, condition, method, value} for each method's (counts, labels) vs the test cells."""
    pca = PCAProjector().fit(normalize_log1p(train_counts), n_components=N_COMPONENTS)
    real_log = normalize_log1p(test_counts)
    real_pc = pca.transform(real_log)
    records = []
    for method, (counts, labels) in methods.items():
        gen_log = normalize_log1p(counts)
        gen_pc = pca.transform(gen_log)
        groups = [("all", np.ones(len(real_pc), bool), np.ones(len(gen_pc), bool))]
        groups += [(str(v), test_labels == v, labels == v) for v in np.unique(test_labels)]
        for condition, real_sel, gen_sel in groups:
            if real_sel.sum() < 2 or gen_sel.sum() < 2:
                continue
            values = {"mmd": mmd_rbf(real_pc[real_sel], gen_pc[gen_sel])}
            values.update(mean_var_r2(real_log[real_sel], gen_log[gen_sel]))
            for metric, value in values.items():
                records.append({"metric": metric, "condition": condition, "method": method, "value": float(value)})
    return records


def summary_table(records: list[dict], condition: str = "all") -> str:
    """Markdown table: one row per method, one column per metric, for one condition."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    metrics = list(dict.fromkeys(r["metric"] for r in records))
    value = {(r["method"], r["metric"]): r["value"] for r in records if r["condition"] == condition}
    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{value.get((m, k), float('nan')):.4f}" for k in metrics) + " |")
    return "\n".join(lines)


def per_condition_table(records: list[dict], metric: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in records))
    conditions = [c for c in dict.fromkeys(r["condition"] for r in records) if c != "all"]
    value = {(r["method"], r["condition"]): r["value"] for r in records if r["metric"] == metric}
    lines = ["| condition | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for c in conditions:
        lines.append(f"| {c} | " + " | ".join(f"{value.get((m, c), float('nan')):.4f}" for m in methods) + " |")
    return "\n".join(lines)
