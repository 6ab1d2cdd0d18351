"""The scVI baseline (evaluate/scvi_baseline.py): refused with the install command without scvi-tools, and, where
scvi-tools is installed (not in CI), trained at a tiny size and scored like every method."""

import json
import sys

import pandas as pd
import pytest

from scldm_scale import cli
from scldm_scale.config import EvalConfig
from scldm_scale.data.counts import DataError
from scldm_scale.evaluate.run import evaluate

INSTALL = "pip install 'scldm-scale[scvi]'"


@pytest.fixture
def cells(counts_adata):
    adata = counts_adata(n_cells=150, n_genes=30, seed=0)
    return adata[:100].copy(), adata[100:].copy()


@pytest.fixture
def without_scvi(monkeypatch):
    monkeypatch.setitem(sys.modules, "scvi", None)  # `import scvi` raises ImportError


def test_asking_for_scvi_without_it_is_refused_with_the_install_command(cells, tmp_path, without_scvi):
    train, real = cells
    opts = EvalConfig(["cell_type"], baselines=("independent_nb", "scvi"), plots=False)
    with pytest.raises(DataError, match=r"pip install 'scldm-scale\[scvi\]'.*leave scvi out of --baselines"):
        evaluate(real, real.copy(), tmp_path / "out", opts, train=train)
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_it_in_one_line(cells, tmp_path, without_scvi, capsys):
    train, real = cells
    train.write_h5ad(tmp_path / "train.h5ad")
    real.write_h5ad(tmp_path / "real.h5ad")
    argv = ["evaluate", "--real", str(tmp_path / "real.h5ad"), "--train", str(tmp_path / "train.h5ad")]
    argv += ["--generated", str(tmp_path / "real.h5ad"), "--condition-key", "cell_type", "--baselines", "scvi"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("scldm-scale evaluate: ") and INSTALL in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "out").exists()


def test_scvi_trains_generates_and_reconstructs(cells, tmp_path):
    pytest.importorskip("scvi", reason="scvi-tools is the optional extra scldm-scale[scvi], not installed in CI")
    import anndata as ad

    from scldm_scale.evaluate.scvi_baseline import RECONSTRUCTION, scvi_baseline

    train, real = cells
    labels = pd.DataFrame({"cell_type": train.obs["cell_type"].astype(str).to_numpy()})
    real_labels = pd.DataFrame({"cell_type": real.obs["cell_type"].astype(str).to_numpy()})
    early = scvi_baseline(train.X, labels, real.X, real_labels, seed=0, max_epochs=1)
    assert early.prior[0].shape == early.posterior[0].shape == real.shape
    assert (early.prior[1] == real_labels).all().all()
    # Our NLL (posterior-mean z) is scvi-tools' own reconstruction loss (one sampled z), up to the z noise.
    own = ad.AnnData(X=real.X, obs=real_labels.set_axis(real_labels.index.astype(str)))
    scvi_loss = float(early.model.get_reconstruction_error(own)["reconstruction_loss"])
    assert early.reconstruction["nll_per_cell"] == pytest.approx(scvi_loss, rel=0.02)

    opts = EvalConfig(["cell_type"], baselines=("scvi",), n_hvg=20, n_pcs=5, scvi_epochs=150, plots=False, de=False)
    evaluate(real, real.copy(), tmp_path, opts, train=train)
    records = json.loads((tmp_path / "metrics.json").read_text())
    assert {r["method"] for r in records} == {"generated", "scvi", "scvi_posterior", RECONSTRUCTION}
    overall = {(r["method"], r["metric"]): r["value"] for r in records if r["condition"] == "all"}
    assert overall[("scvi", "n_cells")] == overall[("scvi_posterior", "n_cells")] == real.n_obs
    # Trained longer, it explains the real cells better, and its cells' per-gene means follow theirs.
    assert overall[(RECONSTRUCTION, "nll_per_cell")] < early.reconstruction["nll_per_cell"]
    assert min(overall[("scvi", "mean_pearson")], overall[("scvi_posterior", "mean_pearson")]) > 0.7
    assert "## scVI beside scLDM" in (tmp_path / "report.md").read_text()
