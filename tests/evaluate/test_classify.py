"""`scldm-scale classify` on a tiny trained VAE and three clearly separable cell types, one of them rare."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scldm_test_helpers import synthetic_vae_args

from scldm_scale.cli import main
from scldm_scale.config import load_config
from scldm_scale.data.counts import DataError
from scldm_scale.evaluate.classify import CLASSIFIERS, FEATURES, classify
from scldm_scale.train.stages import run_training

N_GENES = 40
TYPES = ("a", "b", "c")
REAL_CELLS = {"a": 60, "b": 60, "c": 16}  # c is rare: 12 train cells
RARE_MAX_TRAIN = 12
GENERATED_CELLS = {"c": 40, "a": 10}  # only the rare class's cells are used


def _cells(n_per_type: dict[str, int], seed: int) -> ad.AnnData:
    """Poisson counts; type t has mean 12 on its own block of genes and 0.5 elsewhere: separable by any method."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([[t] * n for t, n in n_per_type.items()])
    block = N_GENES // len(TYPES)
    mean = np.full((len(labels), N_GENES), 0.5)
    for i, t in enumerate(labels):
        k = TYPES.index(t)
        mean[i, k * block : (k + 1) * block] = 12.0
    counts = rng.poisson(mean * rng.lognormal(0.0, 0.3, size=(len(labels), 1)))  # (N, G)
    obs = pd.DataFrame({"cell_type": labels}, index=[f"s{seed}_{i}" for i in range(len(labels))])
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(N_GENES)])
    return ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_overrides) -> dict:
    out = tmp_path_factory.mktemp("classify")
    real = _cells(REAL_CELLS, seed=0)
    # Every 4th cell of each type is a test cell.
    rank_in_type = real.obs.groupby("cell_type").cumcount().to_numpy()
    real.obs["split"] = np.where(rank_in_type % 4 == 3, "test", "train")
    real.write_h5ad(out / "real.h5ad")
    real.obs = real.obs.drop(columns="split")
    real.write_h5ad(out / "real_no_split.h5ad")
    _cells(GENERATED_CELLS, seed=1).write_h5ad(out / "generated.h5ad")
    overrides = [*tiny_overrides, *synthetic_vae_args(out / "real.h5ad", out), "train.max_steps=30"]
    vae = run_training(load_config(None, overrides))
    return {"dir": out, "vae": str(vae), "real": str(out / "real.h5ad"), "generated": str(out / "generated.h5ad")}


def test_cli_classifies_well_above_chance_and_reports_the_augmentation(files, tmp_path, capsys):
    out = tmp_path / "cls"
    args = ["classify", files["vae"], files["real"], "--label-key", "cell_type", "--out", str(out)]
    assert main([*args, "--generated", files["generated"], "--rare-max-train", str(RARE_MAX_TRAIN)]) == 0
    assert "Augmentation with generated cells" in capsys.readouterr().out
    result = json.loads((out / "classify.json").read_text())
    settings, records = result["settings"], result["records"]
    assert settings["split"] == "obs['split']" and (settings["n_train"], settings["n_test"]) == (102, 34)
    assert settings["rare_classes"] == ["c"] and settings["generated_cells_per_class"] == {"c": 40}
    value = {(r["features"], r["classifier"], r["setting"], r["metric"], r["class"]): r["value"] for r in records}
    assert len(value) == len(records)  # one record per number
    metrics = [("accuracy", None), ("macro_f1", None), ("f1", "c")]
    settings_ = ("real", "real+generated", "delta")
    expected = {(f, c, s, m, k) for f in FEATURES for c in CLASSIFIERS for s in settings_ for m, k in metrics}
    assert set(value) == expected
    for f in FEATURES:
        for c in CLASSIFIERS:
            # Majority-class accuracy is 15/34 = 0.44; a VAE trained for 30 steps separates the types well
            # (0.85 to 0.97 on its latents), PCA perfectly.
            assert value[(f, c, "real", "accuracy", None)] >= 0.75, (f, c)
            for m, k in metrics:
                delta = value[(f, c, "real+generated", m, k)] - value[(f, c, "real", m, k)]
                assert value[(f, c, "delta", m, k)] == pytest.approx(delta, abs=1e-12)
    table = (out / "classify.md").read_text()
    assert "| scldm_pooled | logistic |" in table and "F1 c" in table


def test_classification_is_deterministic_and_makes_a_split_when_there_is_none(files, tmp_path):
    data = str(files["dir"] / "real_no_split.h5ad")
    first = classify(files["vae"], data, "cell_type", tmp_path / "one")
    second = classify(files["vae"], data, "cell_type", tmp_path / "two")
    assert first == second
    assert first["settings"]["split"].startswith("stratified 80%/20% split, seed 0")
    assert first["settings"]["n_test"] == round(0.2 * 60) * 2 + round(0.2 * 16)
    assert {r["setting"] for r in first["records"]} == {"real"}


def test_bad_label_key_and_incomplete_augmentation_are_clear_errors(files, tmp_path, capsys):
    with pytest.raises(DataError, match=r"no obs column 'cell_kind' for --label-key; obs has \['cell_type', 'split'\]"):
        classify(files["vae"], files["real"], "cell_kind", tmp_path)
    base = ["classify", files["vae"], files["real"], "--out", str(tmp_path)]
    assert main([*base, "--label-key", "cell_kind"]) == 2
    assert "cell_kind" in capsys.readouterr().err
    assert main([*base, "--label-key", "cell_type", "--generated", files["generated"]]) == 2
    assert "--rare-classes" in capsys.readouterr().err
    assert main([*base, "--label-key", "cell_type", "--generated", files["generated"], "--rare-classes", "z"]) == 2
    assert "rare classes ['z'] have no train cells" in capsys.readouterr().err
