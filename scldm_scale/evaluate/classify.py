"""Cell-level classification from embeddings (`scldm-scale classify`): scLDM latents against a PCA baseline,
and whether generated cells of rare classes help.

Features, computed for every cell the same way (real train, real test, generated):
- scldm_pooled: the mean of the M posterior-mean latent tokens, (N, L) — the compact summary;
- scldm_tokens: the M tokens flattened, (N, M*L) — everything the encoder keeps. Both are reported: the
  pooled mean loses which token carries what, the flat vector is M times wider;
- pca: 30 principal components of log1p(CP10k) counts over the vocabulary genes, fitted on the train cells.
Classifiers (standardised features, fitted on the train cells, fixed seeds): logistic regression (lbfgs) and
an MLP with one hidden layer. Both run a fixed iteration budget, the same for every feature set; sklearn's
ConvergenceWarning is silenced, so a budget that stops short does not flood the output.

Split: the data's obs[split_key] (`prepare` writes train / val / test; only train and test are used). Without
that column a stratified 80/20 split with seed 0 is made and the settings say so. The used cells' counts are
held in memory (the PCA baseline needs them; its fit densifies the train cells): evaluation-sized data.

Augmentation (with generated cells, e.g. from `scldm-scale generate`, labels in obs[label_key]): the rare
classes are those named, or those with at most N train cells; the generated cells of the rare classes are
added to the real train cells and the same classifiers are fitted again. Everything is scored on the real
test cells.

Output: DIR/classify.json = {"settings": {...}, "records": [...]}, one record per number:
{"features", "classifier", "setting", "metric", "class", "value"} with setting "real", "real+generated" or
"delta" (real+generated minus real), metric "accuracy", "macro_f1" (class null) or "f1" (per rare class);
DIR/classify.md has the same numbers as tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from scldm_scale.config import ConfigError, EmbedConfig, comma_separated
from scldm_scale.data.counts import DataError
from scldm_scale.data.split import stratified_split
from scldm_scale.evaluate.embed import Embedder, add_embed_options, check_embed_options, check_expressed, open_counts
from scldm_scale.evaluate.metrics import PCAProjector, normalize_log1p
from scldm_scale.outputs import add_overwrite, claim_output, staged

log = logging.getLogger(__name__)

N_COMPONENTS = 30
DEFAULT_TEST_FRACTION = 0.2
SPLIT_SEED = 0
SEED = 0
MLP_HIDDEN = 128
MLP_MAX_ITER = 300
LOGISTIC_MAX_ITER = 1000
NORMALIZE_CHUNK_ROWS = 10_000  # normalize_log1p densifies: project in chunks
FEATURES = ("scldm_pooled", "scldm_tokens", "pca")
CLASSIFIERS = ("logistic", "mlp")


def make_classifier(name: str):
    if name == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=LOGISTIC_MAX_ITER, random_state=SEED))
    return make_pipeline(
        StandardScaler(), MLPClassifier(hidden_layer_sizes=(MLP_HIDDEN,), max_iter=MLP_MAX_ITER, random_state=SEED)
    )


def _read_cells(embedder: Embedder, source, rows: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts (n, G_present) and latents (n, M, L) of a source's cells at the given sorted rows.

    Whole chunks are encoded (as `embed` does), so a cell's latents are the same as in `embed`'s output.
    """
    counts, latents = [], []
    for start, block in source.blocks():
        check_expressed(block, source.obs.index, start, source.where)
        keep = rows[(rows >= start) & (rows < start + block.shape[0])] - start
        counts.append(block[keep])
        latents.append(embedder.encode(block, source.gene_ids, first_row=start)[keep])
    return sp.vstack(counts, format="csr"), np.concatenate(latents)


def _features(latents: np.ndarray, counts: sp.csr_matrix, pca: PCAProjector) -> dict[str, np.ndarray]:
    pcs = [
        pca.transform(normalize_log1p(counts[start : start + NORMALIZE_CHUNK_ROWS]))
        for start in range(0, counts.shape[0], NORMALIZE_CHUNK_ROWS)
    ]
    return {
        "scldm_pooled": latents.mean(axis=1),  # (N, L)
        "scldm_tokens": latents.reshape(len(latents), -1),  # (N, M*L)
        "pca": np.concatenate(pcs),  # (N, n_components)
    }


def _split(obs, labels: np.ndarray, split_key: str, where: str) -> tuple[np.ndarray, np.ndarray, str]:
    if split_key in obs:
        split = obs[split_key].astype(str).to_numpy()
        n_other = int((~np.isin(split, ["train", "test"])).sum())
        how = f"obs[{split_key!r}]" + (f", {n_other} cells neither train nor test left out" if n_other else "")
    else:
        split = stratified_split(labels, DEFAULT_TEST_FRACTION, SPLIT_SEED)
        how = f"stratified {1 - DEFAULT_TEST_FRACTION:.0%}/{DEFAULT_TEST_FRACTION:.0%} split, seed {SPLIT_SEED}"
        log.warning("%s has no obs[%r]: made a %s", where, split_key, how)
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    if len(train) == 0 or len(test) == 0:
        raise DataError(
            f"{where}: obs[{split_key!r}] needs 'train' and 'test' cells; it has {sorted(set(split.tolist()))}"
        )
    return train, test, how


def rare_classes_of(train_labels: np.ndarray, names: list[str] | None, max_train: int | None) -> list[str]:
    counts = dict(zip(*np.unique(train_labels, return_counts=True), strict=True))
    if names:
        unknown = [c for c in names if c not in counts]
        if unknown:
            raise DataError(f"rare classes {unknown} have no train cells; the classes are {sorted(counts)}")
        return list(names)
    rare = sorted(c for c, n in counts.items() if n <= max_train)
    if not rare:
        raise DataError(
            f"no class has at most {max_train} train cells (the smallest, {min(counts, key=counts.get)!r}, has "
            f"{min(counts.values())}); raise --rare-max-train or name them with --rare-classes"
        )
    return rare


def _scores(y_true: np.ndarray, y_pred: np.ndarray, rare: list[str]) -> dict[tuple[str, str | None], float]:
    out = {
        ("accuracy", None): float(accuracy_score(y_true, y_pred)),
        ("macro_f1", None): float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
    if rare:
        per_class = f1_score(y_true, y_pred, labels=rare, average=None, zero_division=0)
        out.update({("f1", c): float(v) for c, v in zip(rare, per_class, strict=True)})
    return out


def _fit_score(name: str, x_train, y_train, x_test, y_test, rare: list[str]) -> dict:
    model = make_classifier(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)
    return _scores(y_test, model.predict(x_test), rare)


def classify(
    checkpoint: str | Path,
    data: str | Path,
    label_key: str,
    out_dir: str | Path,
    split_key: str = "split",
    generated: str | Path | None = None,
    rare_classes: list[str] | None = None,
    rare_max_train: int | None = None,
    batch_size: int = EmbedConfig.batch_size,
    device: str = EmbedConfig.device,
    allow_missing_genes: bool = EmbedConfig.allow_missing_genes,
    layer: str | None = EmbedConfig.layer,
) -> dict:
    """Write DIR/classify.json and DIR/classify.md (see the module docstring) and return the json's content."""
    if generated is not None and not rare_classes and rare_max_train is None:
        raise DataError("--generated needs the rare classes: --rare-classes A,B or --rare-max-train N")
    if generated is None and (rare_classes or rare_max_train is not None):
        raise DataError("--rare-classes / --rare-max-train choose the classes to augment: pass --generated too")
    embedder = Embedder.from_artifact(checkpoint, device=device, batch_size=batch_size)
    if generated is not None:  # read after the real cells: an unreadable file is refused now, not then
        open_counts(generated, embedder.genes, True, None, embedder.allow_non_integer).close()
    source = open_counts(data, embedder.genes, allow_missing_genes, layer, embedder.allow_non_integer)
    try:
        if label_key not in source.obs:
            raise DataError(f"{data}: no obs column {label_key!r} for --label-key; obs has {list(source.obs)}")
        labels = source.obs[label_key].astype(str).to_numpy()
        train, test, split_how = _split(source.obs, labels, split_key, str(data))
        if len(np.unique(labels[train])) < 2:
            raise DataError(f"{data}: the train cells have one {label_key} value; classification needs two or more")
        rare = rare_classes_of(labels[train], rare_classes, rare_max_train) if generated is not None else []
        used = np.sort(np.concatenate([train, test]))
        counts, latents = _read_cells(embedder, source, used)
    finally:
        source.close()
    gene_ids = source.gene_ids
    labels = labels[used]
    is_train = np.isin(used, train)
    pca = PCAProjector().fit(normalize_log1p(counts[is_train]), n_components=N_COMPONENTS)
    features = _features(latents, counts, pca)
    y_train, y_test = labels[is_train], labels[~is_train]
    settings = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "label_key": label_key,
        "split": split_how,
        "n_train": int(is_train.sum()),
        "n_test": int((~is_train).sum()),
        "n_genes_missing": len(embedder.genes) - len(gene_ids),  # absent tokens (--allow-missing-genes)
        "train_cells_per_class": {str(c): int(n) for c, n in zip(*np.unique(y_train, return_counts=True), strict=True)},
        "features": {
            "scldm_pooled": "mean of the latent tokens (posterior mean)",
            "scldm_tokens": "latent tokens flattened",
            "pca": f"{pca.pca.n_components_} PCs of log1p(CP10k), fitted on the train cells",
        },
        "classifiers": {
            "logistic": f"standardised features, LogisticRegression(lbfgs, max_iter={LOGISTIC_MAX_ITER})",
            "mlp": f"standardised features, MLPClassifier(({MLP_HIDDEN},), max_iter={MLP_MAX_ITER}, seed {SEED})",
        },
    }
    extra = None
    if generated is not None:
        extra = _generated_features(embedder, generated, label_key, gene_ids, rare, pca)
        settings["generated"] = str(generated)
        settings["rare_classes"] = rare
        settings["generated_cells_per_class"] = {c: int((extra[1] == c).sum()) for c in rare}
    records = []
    for feature in FEATURES:
        x_train, x_test = features[feature][is_train], features[feature][~is_train]
        for name in CLASSIFIERS:
            real = _fit_score(name, x_train, y_train, x_test, y_test, rare)
            records += _records(feature, name, "real", real)
            if extra is None:
                continue
            x_aug = np.concatenate([x_train, extra[0][feature]])
            y_aug = np.concatenate([y_train, extra[1]])
            augmented = _fit_score(name, x_aug, y_aug, x_test, y_test, rare)
            records += _records(feature, name, "real+generated", augmented)
            records += _records(feature, name, "delta", {k: augmented[k] - v for k, v in real.items()})
    result = {"settings": settings, "records": records}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classify.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "classify.md").write_text(markdown(result))
    return result


def _generated_features(
    embedder: Embedder,
    path: str | Path,
    label_key: str,
    gene_ids: np.ndarray,
    rare: list[str],
    pca: PCAProjector,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Features and labels of the generated cells of the rare classes, over the same genes as the real cells."""
    source = open_counts(path, embedder.genes, True, None, embedder.allow_non_integer)
    try:
        if label_key not in source.obs:
            raise DataError(f"{path}: no obs column {label_key!r}; the generated cells need their labels")
        labels = source.obs[label_key].astype(str).to_numpy()
        lacking = np.setdiff1d(gene_ids, source.gene_ids)
        if len(lacking):
            raise DataError(
                f"{path}: {len(lacking)} genes of the real cells are missing, e.g. "
                f"{[embedder.genes.ids[i] for i in lacking[:5]]}; generate with the same model"
            )
        rows = np.flatnonzero(np.isin(labels, rare))
        if len(rows) == 0:
            raise DataError(
                f"{path}: no cells of the rare classes {rare}; its obs[{label_key!r}] has {sorted(set(labels))}"
            )
        counts = sp.vstack([block for _, block in source.blocks()], format="csr")[rows]
    finally:
        source.close()
    counts = counts[:, np.searchsorted(source.gene_ids, gene_ids)]  # the real cells' genes, in their order
    expressed = np.asarray(counts.sum(axis=1)).ravel() > 0
    if not expressed.all():
        log.warning("%s: skipping %d generated cells with zero counts", path, int((~expressed).sum()))
        rows, counts = rows[expressed], counts[expressed]
    for c in rare:
        if not (labels[rows] == c).any():
            log.warning("%s: no generated cells of rare class %r", path, c)
    latents = embedder.encode(counts, gene_ids)
    return _features(latents, counts, pca), labels[rows]


def _records(features: str, classifier: str, setting: str, scores: dict) -> list[dict]:
    return [
        {"features": features, "classifier": classifier, "setting": setting, "metric": m, "class": c, "value": v}
        for (m, c), v in scores.items()
    ]


def markdown(result: dict) -> str:
    """The records as tables: test scores of real-only training, then the augmentation's effect."""
    settings, records = result["settings"], result["records"]
    value = {(r["features"], r["classifier"], r["setting"], r["metric"], r["class"]): r["value"] for r in records}
    rows = list(dict.fromkeys((r["features"], r["classifier"]) for r in records))
    lines = [
        f"# Cell classification: {settings['label_key']}",
        "",
        f"{settings['n_train']} train / {settings['n_test']} test cells ({settings['split']}); test scores.",
        "",
        "| features | classifier | accuracy | macro-F1 |",
        "|---|---|---|---|",
    ]
    for f, c in rows:
        accuracy, macro_f1 = value[(f, c, "real", "accuracy", None)], value[(f, c, "real", "macro_f1", None)]
        lines.append(f"| {f} | {c} | {accuracy:.4f} | {macro_f1:.4f} |")
    if "rare_classes" in settings:
        rare = settings["rare_classes"]
        n_gen = ", ".join(f"{c}: {n}" for c, n in settings["generated_cells_per_class"].items())
        lines += [
            "",
            f"## Augmentation with generated cells of the rare classes ({n_gen})",
            "",
            "real → real+generated (delta)",
            "",
            "| features | classifier | accuracy | macro-F1 | " + " | ".join(f"F1 {c}" for c in rare) + " |",
            "|---" * (4 + len(rare)) + "|",
        ]
        keys = [("accuracy", None), ("macro_f1", None), *(("f1", c) for c in rare)]
        for f, c in rows:
            cells = [
                f"{value[(f, c, 'real', m, k)]:.3f} → {value[(f, c, 'real+generated', m, k)]:.3f} "
                f"({value[(f, c, 'delta', m, k)]:+.3f})"
                for m, k in keys
            ]
            lines.append(f"| {f} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`scldm-scale classify`."""
    parser.add_argument("checkpoint", metavar="MODEL", help="a vae or ldm model artifact folder")
    parser.add_argument("data", help=".h5ad of raw counts, or a SOMA experiment URI, with the labels in obs")
    parser.add_argument("--label-key", required=True, help="obs column to predict, e.g. cell_type")
    split_help = "obs column with train/test (else a stratified 80/20 split)"
    parser.add_argument("--split-key", default="split", help=split_help)
    generated_help = "generated cells (.h5ad, labels in obs) to add to rare classes (default: none)"
    parser.add_argument("--generated", default=None, help=generated_help)
    rare = parser.add_mutually_exclusive_group()
    rare_help = "the classes to augment (default: none; or --rare-max-train)"
    rare.add_argument("--rare-classes", type=comma_separated, default=None, metavar="A,B", help=rare_help)
    max_help = "augment classes with <= N train cells (default: none; or --rare-classes)"
    rare.add_argument("--rare-max-train", type=int, default=None, metavar="N", help=max_help)
    add_embed_options(parser)
    parser.add_argument("--out", required=True, help="folder for classify.json and classify.md")
    add_overwrite(parser, "the folder at --out (one with a classify.json)")
    parser.set_defaults(handle=handle)


def handle(args: argparse.Namespace) -> None:
    check_embed_options(args)
    if args.rare_max_train is not None and args.rare_max_train < 1:
        raise ConfigError(f"--rare-max-train must be at least 1, got {args.rare_max_train}")
    claim_output(args.out, "a classification folder", "--out", args.overwrite, folder=True, marker="classify.json")
    with staged(args.out) as out:
        result = classify(
            args.checkpoint,
            args.data,
            args.label_key,
            out,
            split_key=args.split_key,
            generated=args.generated,
            rare_classes=args.rare_classes or None,
            rare_max_train=args.rare_max_train,
            batch_size=args.batch_size,
            device=args.device,
            allow_missing_genes=args.allow_missing_genes,
            layer=args.layer,
        )
    print((Path(args.out) / "classify.md").read_text())
    print(f"wrote {len(result['records'])} records to {args.out}/classify.json and classify.md")
