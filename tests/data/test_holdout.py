"""`data.holdout_combinations`: the config rules, `holdout_mask` and the SOMA filters, training cells without
the held-out combinations from the h5ad and the SOMA sources (everything else kept, every value still known
to the encoders), the refusals, and a VAE + prior run with a combination held out."""

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from scldm_scale import artifact
from scldm_scale.config import CONFIG_DIR, ConfigError, load_config
from scldm_scale.data.counts import DataError
from scldm_scale.data.holdout import exclusion_filter, holdout_mask, match_filter
from scldm_scale.data.prepare import prepare
from scldm_scale.data.source import open_train_cells
from scldm_scale.data.synthetic import synthetic_perturbation
from scldm_scale.train.stages import run_training

KEYS = "data.condition_keys=[cell_line,perturbation]"
HELD_OUT = {"cell_line": "line_B", "perturbation": "pert_2"}
HOLDOUT = "data.holdout_combinations=[{cell_line: line_B, perturbation: pert_2}]"


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    """3 lines x (control + 3 perturbations) x 20 cells over 60 genes."""
    path = tmp_path_factory.mktemp("holdout") / "cells.h5ad"
    synthetic_perturbation(n_cells_per_group=20, n_genes=60, seed=2).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def soma_uri(h5ad):
    out = h5ad.parent / "cells.soma"
    return prepare(h5ad, out, labels=["cell_line", "perturbation"], test_fraction=0.2, val_fraction=0.0)


def _h5ad_args(h5ad) -> list[str]:
    return ["data.source=h5ad", f"data.path={h5ad}", KEYS]


def _soma_args(uri) -> list[str]:
    return ["data.source=soma", f"data.uri={uri}", KEYS]


def _pairs(cells) -> list[tuple[str, str]]:
    return list(zip(cells.labels["cell_line"], cells.labels["perturbation"], strict=True))


# --- config ------------------------------------------------------------------------------------------


def test_config_accepts_combinations_of_condition_keys():
    assert load_config(None, [KEYS]).data.holdout_combinations == []
    cfg = load_config(None, [KEYS, "data.holdout_combinations=[{cell_line: a, perturbation: b}, {perturbation: c}]"])
    assert cfg.data.holdout_combinations == [{"cell_line": "a", "perturbation": "b"}, {"perturbation": "c"}]


@pytest.mark.parametrize(
    ("combinations", "message"),
    [
        ("[{cell_type: a}]", "not data.condition_keys"),
        ("[{}]", "is empty"),
        ("[{cell_line: a, perturbation: b}, {perturbation: b, cell_line: a}]", "repeats data.holdout_combinations[0]"),
        ("[{cell_line: null}]", "data.holdout_combinations[0].cell_line"),
        ("[{cell_line: [a, b]}]", "data.holdout_combinations[0]"),
    ],
)
def test_config_refuses_bad_combinations(combinations, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(None, [KEYS, f"data.holdout_combinations={combinations}"])


# --- the mask and the filters ------------------------------------------------------------------------


def test_holdout_mask_marks_cells_matching_any_combination():
    obs = pd.DataFrame(
        {
            "cell_line": pd.Categorical(["A", "A", "B", "B", "C"]),
            "perturbation": ["p", "q", "p", "q", "p"],
            "dose": [1, 2, 1, 2, 1],
        }
    )
    mask = holdout_mask(obs, [{"cell_line": "A", "perturbation": "p"}, {"cell_line": "B"}])
    np.testing.assert_array_equal(mask, [True, False, True, True, False])
    np.testing.assert_array_equal(holdout_mask(obs, [{"dose": "2"}]), [False, True, False, True, False])  # as text
    assert not holdout_mask(obs, []).any()
    with pytest.raises(DataError, match="not obs columns"):
        holdout_mask(obs, [{"donor": "x"}])


def test_soma_filters_select_and_exclude_the_combinations():
    combos = [{"cell_line": "line_B", "perturbation": "pert_2"}, {"cell line": "it's"}]
    assert match_filter(combos) == (
        "(cell_line == 'line_B' and perturbation == 'pert_2') or (attr('cell line') == \"it's\")"
    )
    assert exclusion_filter(combos) == (
        "(cell_line != 'line_B' or perturbation != 'pert_2') and (attr('cell line') != \"it's\")"
    )
    assert exclusion_filter([]) is None


# --- training cells from each source -----------------------------------------------------------------


@pytest.mark.parametrize("source", ["h5ad", "soma"])
def test_training_cells_lack_exactly_the_held_out_combination(source, h5ad, soma_uri, caplog):
    args = _h5ad_args(h5ad) if source == "h5ad" else _soma_args(soma_uri)
    everything = open_train_cells(load_config(None, args).data, batch_size=16, seed=0)
    with caplog.at_level(logging.INFO, logger="scldm_scale.data.holdout"):
        held = open_train_cells(load_config(None, [*args, HOLDOUT]).data, batch_size=16, seed=0)
    pair = (HELD_OUT["cell_line"], HELD_OUT["perturbation"])
    n_pair = _pairs(everything).count(pair)
    assert n_pair > 0 and pair not in _pairs(held)
    # Every other training cell is still there, in the same order.
    assert [p for p in _pairs(everything) if p != pair] == _pairs(held)
    assert held.n_cells == everything.n_cells - n_pair
    np.testing.assert_array_equal(held.library_sizes, everything.library_sizes[_keep(everything, pair)])
    ordered = np.concatenate([b.library_size.numpy() for b in held.ordered()])
    np.testing.assert_allclose(ordered, held.library_sizes)
    # The held-out values are still known: each occurs in other combinations.
    assert held.encoders["cell_line"].values == ["line_A", "line_B", "line_C"]
    assert held.encoders["perturbation"].values == ["control", "pert_1", "pert_2", "pert_3"]
    assert f"held out {n_pair} training cells" in caplog.text


def _keep(cells, pair) -> np.ndarray:
    return np.array([p != pair for p in _pairs(cells)])


@pytest.mark.parametrize("source", ["h5ad", "soma"])
def test_a_combination_matching_no_cell_is_refused_by_name(source, h5ad, soma_uri):
    args = _h5ad_args(h5ad) if source == "h5ad" else _soma_args(soma_uri)
    cfg = load_config(None, [*args, "data.holdout_combinations=[{cell_line: line_B, perturbation: pert_9}]"])
    with pytest.raises(DataError, match=r"\{cell_line=line_B, perturbation=pert_9\} matches no cell"):
        open_train_cells(cfg.data, batch_size=16, seed=0)


@pytest.mark.parametrize("source", ["h5ad", "soma"])
def test_a_value_left_in_no_training_cell_is_refused(source, h5ad, soma_uri):
    args = _h5ad_args(h5ad) if source == "h5ad" else _soma_args(soma_uri)
    every_line = ", ".join(f"{{cell_line: {line}, perturbation: pert_2}}" for line in ("line_A", "line_B", "line_C"))
    cfg = load_config(None, [*args, f"data.holdout_combinations=[{every_line}]"])
    with pytest.raises(DataError, match="perturbation='pert_2', so that value would be unknown to the model"):
        open_train_cells(cfg.data, batch_size=16, seed=0)


def test_the_perturbation_demo_config_holds_out_a_composable_pair_of_its_builtin_data(caplog):
    cfg = load_config(CONFIG_DIR / "perturbation.yaml", ["data.source=h5ad"])
    assert cfg.data.builtin == "synthetic_perturbation" and cfg.prior.cond_dropout == "independent"
    assert cfg.data.holdout_combinations == [HELD_OUT]
    with caplog.at_level(logging.INFO, logger="scldm_scale.data.holdout"):
        cells = open_train_cells(cfg.data, batch_size=16, seed=0)
    assert (HELD_OUT["cell_line"], HELD_OUT["perturbation"]) not in _pairs(cells)
    assert "held out 80 training cells" in caplog.text  # the pair's 100 cells less the 20 the seeded split put in test


# --- both stages -------------------------------------------------------------------------------------


def test_vae_and_prior_train_without_the_held_out_cells(h5ad, tmp_path, tiny_overrides, caplog):
    common = [*tiny_overrides, *_h5ad_args(h5ad), HOLDOUT, "train.max_steps=2", f"train.ckpt_dir={tmp_path}"]
    vae_path = run_training(load_config(None, ["stage=vae", *common]))
    with caplog.at_level(logging.INFO):
        ldm_path = run_training(load_config(None, ["stage=ldm", *common, f"train.vae_checkpoint={vae_path}"]))
    everything = open_train_cells(load_config(None, _h5ad_args(h5ad)).data, batch_size=16, seed=0)
    n_train = int(_keep(everything, (HELD_OUT["cell_line"], HELD_OUT["perturbation"])).sum())
    assert f"on {n_train} latents" in caplog.text
    model = artifact.load(ldm_path, kind="ldm")
    assert model.vae.encoders["perturbation"].values == ["control", "pert_1", "pert_2", "pert_3"]
    assert model.n_classes == {"cell_line": 3, "perturbation": 4}
    assert torch.isfinite(model.latent_std).all()
