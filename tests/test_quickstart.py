"""`scldm-scale quickstart --data`: the user's own cells end to end (with and without labels), and the sizing
of the run from the data and the machine."""

import json

import anndata as ad
import numpy as np
import pytest

from scldm_scale.cli import main
from scldm_scale.config import load_config
from scldm_scale.data.synthetic import synthetic_transcriptome
from scldm_scale.quickstart import (
    BATCH_RANGE,
    DECODE_GENES_STEP,
    ENCODER_WARMUP_SHARE,
    MAX_ACTIVATIONS,
    MIN_SUBSET_GENES,
    OWN_DATA_VAE_STEPS,
    QUICKSTART_CONFIG,
    DataShape,
    Machine,
    StepTimes,
    measure_steps,
    own_data_choices,
    size_run,
)

GIB = 2**30
LAPTOP = Machine(cores=2, memory_bytes=8 * GIB)
# Step times of the 2-core CI machine under load (configs/quickstart.yaml's model, 32 cells, ~1,650 tokens).
LOADED = StepTimes(vae_fixed=1.4, vae_per_gene=0.39 / 1024, prior=2.3)
UNLOADED = StepTimes(vae_fixed=0.1, vae_per_gene=0.03 / 1024, prior=0.1)


@pytest.fixture(scope="module")
def own_cells(tmp_path_factory):
    """120 cells x 300 genes of whole-transcriptome-like counts, with cell_type and donor in obs."""
    path = tmp_path_factory.mktemp("own") / "cells.h5ad"
    synthetic_transcriptome(n_cells=120, n_genes=300, n_cell_types=3, n_donors=2, seed=3).write_h5ad(path)
    return path


def _quickstart(out, data, *extra: str, tiny_overrides) -> dict:
    # Sizing picks the batch sizes and steps; a few steps and a short solve keep the test fast.
    fast = ["optim.vae.max_steps=3", "optim.ldm.max_steps=3", "sample.method=euler", "sample.n_steps=2"]
    argv = ["quickstart", "--data", str(data), "--out", str(out), *extra, *tiny_overrides, *fast]
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("labels", [[], ["cell_type", "donor"]], ids=["unconditional", "labelled"])
def test_quickstart_on_own_cells_writes_the_same_outputs(own_cells, tmp_path, tiny_overrides, labels, caplog):
    extra = ["--labels", ",".join(labels)] if labels else ["--draws", "2"]
    with caplog.at_level("INFO", logger="scldm_scale.quickstart"):
        report = _quickstart(tmp_path, own_cells, *extra, tiny_overrides=tiny_overrides)
    assert report["draws"] == (1 if labels else 2)
    assert (tmp_path / "metrics_draws.json").exists() == (not labels)
    assert "quickstart sized to the data and the machine" in caplog.text
    assert report["dataset"] == "cells.h5ad" and report["condition_keys"] == labels
    assert report["n_genes"] == 300  # every gene kept
    assert report["n_train_cells"] + report["n_real_cells"] == 120
    assert report["sizing"]["overrides"]["vae"][-1] == "model.decode_genes=all"  # 300 genes: all decoded
    records = json.loads((tmp_path / "metrics.json").read_text())
    assert records == report["metrics"]
    overall = {(r["method"], r["metric"]): r["value"] for r in records if r["condition"] == "all"}
    for method in ("generated", "independent_nb", "real_train_cells"):
        assert np.isfinite(overall[(method, "mmd")]), method
    assert np.isfinite(overall[("reconstruction", "nll_per_cell")])
    generated = ad.read_h5ad(tmp_path / "generated.h5ad")
    assert generated.n_obs == report["n_real_cells"] and generated.n_vars == 300
    assert list(generated.obs.columns) == labels
    real_types = sorted(ad.read_h5ad(own_cells).obs["cell_type"].unique()) if labels else []
    assert sorted(generated.obs["cell_type"].unique()) <= real_types if labels else True
    markdown = (tmp_path / "report.md").read_text()
    assert "| independent_nb |" in markdown and "## Time" in markdown and "## Sizing" in markdown
    for artifact in ("vae-model", "ldm-model"):
        assert (tmp_path / "checkpoints" / artifact / "config.json").exists()


def test_quickstart_labels_need_data(capsys):
    assert main(["quickstart", "--labels", "cell_type"]) == 2
    assert "--labels names obs columns of --data" in capsys.readouterr().err


def _sized(shape: DataShape, machine=LAPTOP, times=UNLOADED, *overrides: str) -> dict[str, str]:
    """The VAE stage's chosen overrides as {key: value}, and the prior's as {"ldm:" + key: value}."""
    cfg = load_config(QUICKSTART_CONFIG, ["data.condition_keys=[]", *overrides])
    sizing = size_run(cfg, shape, machine, times=times)
    pairs = [
        (f"{'ldm:' if stage == 'ldm' else ''}{item}") for stage, items in sizing.overrides.items() for item in items
    ]
    return dict(pair.split("=", 1) for pair in pairs)


def test_small_data_decodes_every_gene_for_the_configs_steps():
    chosen = _sized(DataShape(n_cells=700, n_genes=765, nnz=700 * 200))
    assert chosen["model.decode_genes"] == "all"
    assert "model.latent_gene_path" not in chosen and "model.encoder_warmup_steps" not in chosen  # the config's model
    assert chosen["optim.vae.max_steps"] == "600"  # configs/quickstart.yaml's
    assert int(chosen["train.batch_size"]) in range(BATCH_RANGE[0], BATCH_RANGE[1] + 1)


def test_whole_transcriptome_decodes_a_subset_and_fits_the_memory():
    chosen = _sized(DataShape(n_cells=400, n_genes=33_000, nnz=400 * 800), LAPTOP, LOADED, *own_data_choices([]))
    n_decoded = int(chosen["model.decode_genes"])
    assert n_decoded % DECODE_GENES_STEP == 0 and MIN_SUBSET_GENES <= n_decoded < 33_000
    assert 50 <= int(chosen["optim.vae.max_steps"]) <= OWN_DATA_VAE_STEPS
    # Subset steps start from data offsets: the latent's linear path, count pooling, a frozen-encoder warm-up.
    assert chosen["model.latent_gene_path"] == "true" and chosen["model.pooling_weights"] == "count"
    assert int(chosen["model.encoder_warmup_steps"]) == round(ENCODER_WARMUP_SHARE * int(chosen["optim.vae.max_steps"]))
    # Generation decodes all 33,000 genes for the cells of one solve: fewer of them than the default 1,024.
    assert 16 <= int(chosen["ldm:sample.batch_size"]) < 1024


def test_sizing_scales_with_the_machine_and_the_data():
    shape = DataShape(n_cells=400, n_genes=33_000, nnz=400 * 800)
    own = own_data_choices(["cell_type"])
    slow, fast = _sized(shape, LAPTOP, LOADED, *own), _sized(shape, LAPTOP, UNLOADED, *own)
    assert int(fast["model.decode_genes"]) > int(slow["model.decode_genes"]) == MIN_SUBSET_GENES  # the floor
    assert int(fast["optim.vae.max_steps"]) == OWN_DATA_VAE_STEPS > int(slow["optim.vae.max_steps"])
    assert int(fast["ldm:optim.ldm.max_steps"]) > int(slow["ldm:optim.ldm.max_steps"])
    # A tiny memory shrinks the batch to the floor, not below it.
    assert _sized(shape, Machine(2, GIB // 4))["train.batch_size"] == str(BATCH_RANGE[0])
    # Fewer cells than a batch: one batch of every training cell (test_fraction 0.2 of 20 cells leaves 16).
    small = _sized(DataShape(n_cells=20, n_genes=300, nnz=20 * 50))
    assert small["train.batch_size"] == small["ldm:train.batch_size"] == "16"
    assert MAX_ACTIVATIONS < 4 * GIB  # the acceptance's peak RSS leaves room for the model and the data


def test_sizing_respects_a_configs_fewer_steps():
    chosen = _sized(DataShape(n_cells=120, n_genes=300, nnz=120 * 80), LAPTOP, LOADED, "optim.vae.max_steps=3")
    assert chosen["optim.vae.max_steps"] == "3"


def test_measured_step_times_grow_with_the_decoded_genes(tiny_overrides):
    cfg = load_config(QUICKSTART_CONFIG, ["data.condition_keys=[cell_type]", *tiny_overrides])
    times = measure_steps(cfg, n_genes=2048, tokens=16, vae_batch=4, ldm_batch=8)
    assert times.vae_fixed >= 0 and times.prior > 0
    assert times.vae_per_gene >= 0 and times.vae(1024) > 0  # the slope is noisy on a shared machine
