"""The whole pipeline with a tiny model: train both stages, generate through the CLI, run the quickstart."""

import json
import logging

import anndata as ad
import numpy as np
import pytest
import torch
from scldm_test_helpers import synthetic_vae_args

from scldm_scale import artifact
from scldm_scale.artifact import CheckpointError
from scldm_scale.cli import main
from scldm_scale.config import CONFIG_DIR, load_config
from scldm_scale.data.counts import DataError, load_builtin
from scldm_scale.data.dataset import build_dataset
from scldm_scale.data.prepare import prepare
from scldm_scale.models.vae import SetVAE
from scldm_scale.train.stages import condition_balance_weights, run_training

STEPS = 6


def _train_both(out_dir, overrides) -> dict:
    common = [*overrides, f"train.ckpt_dir={out_dir}", f"train.max_steps={STEPS}"]
    vae_path = run_training(load_config(None, ["stage=vae", *common]))
    ldm_path = run_training(load_config(None, ["stage=ldm", *common, f"train.vae_checkpoint={vae_path}"]))
    return {"vae": vae_path, "ldm": ldm_path}


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory, synthetic_h5ad, tiny_overrides) -> dict:
    data = ["data.source=h5ad", f"data.path={synthetic_h5ad}", "data.condition_keys=[cell_type]"]
    paths = _train_both(tmp_path_factory.mktemp("synthetic_run"), [*tiny_overrides, *data])
    return {**paths, "key": "cell_type", "value": "type_1", "n_genes": 50}


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory, tiny_overrides) -> dict:
    """The built-in PBMC cells ingested into a SOMA experiment and streamed from it (the default source)."""
    out = tmp_path_factory.mktemp("builtin_run")
    h5ad = out / "pbmc.h5ad"
    load_builtin("pbmc68k_reduced").write_h5ad(h5ad)
    uri = prepare(h5ad, out / "pbmc.soma", labels=["bulk_labels"], test_fraction=0.2, val_fraction=0.0)
    paths = _train_both(out, [*tiny_overrides, f"data.uri={uri}"])
    return {**paths, "key": "bulk_labels", "value": "CD14+ Monocyte", "n_genes": 765}


@pytest.fixture(params=["synthetic", "builtin"])
def run(request) -> dict:
    return request.getfixturevalue(f"{request.param}_run")


def test_vae_checkpoint_holds_everything_generation_needs(synthetic_run, synthetic_h5ad):
    model = artifact.load(synthetic_run["vae"], kind="vae")
    source = ad.read_h5ad(synthetic_h5ad)
    assert model.genes.ids == list(source.var_names)
    assert {k: e.state_dict() for k, e in model.encoders.items()} == {
        "cell_type": {"key": "cell_type", "values": ["type_0", "type_1", "type_2"]}
    }
    assert model.config.d_model == 16 and model.training["config"]["stage"] == "vae"
    assert model.provenance.steps == STEPS
    assert [h["step"] for h in model.training["history"]] == list(range(1, STEPS + 1))
    assert set(model.library_size.fits["cell_type"]) == {"type_0", "type_1", "type_2"}


def test_ldm_checkpoint_embeds_the_vae_and_the_ema_prior(synthetic_run):
    vae = artifact.load(synthetic_run["vae"], kind="vae")
    ldm = artifact.load(synthetic_run["ldm"], kind="ldm")
    assert ldm.provenance.steps == STEPS
    assert ldm.n_classes == {"cell_type": 3}
    assert ldm.vae.genes == vae.genes
    for key, value in vae.weights.items():
        assert torch.equal(ldm.vae.weights[key], value)
    assert set(ldm.prior_ema_weights) == set(ldm.prior_weights)
    assert ldm.latent_mean.shape == ldm.latent_std.shape == (4, 8)
    assert (ldm.latent_std > 0).all()
    # The EMA differs from the raw weights once the prior has trained.
    assert any(not torch.equal(ldm.prior_ema_weights[k], v) for k, v in ldm.prior_weights.items())


def test_cli_generate_writes_counts_labels_genes_and_settings(run, tmp_path, capsys):
    out = tmp_path / "generated.h5ad"
    key, value = run["key"], run["value"]
    argv = ["generate", str(run["ldm"]), "--n-cells", "12", "--condition", f"{key}={value}", "--cfg", f"{key}=2.0"]
    code = main(
        [*argv, "--sampler", "euler", "--steps", "3", "--seed", "5", "--guidance-interval", "0,0.5", "--out", str(out)]
    )
    assert code == 0
    assert f"wrote 12 cells x {run['n_genes']} genes" in capsys.readouterr().out
    generated = ad.read_h5ad(out)
    assert generated.shape == (12, run["n_genes"])
    x = generated.X.toarray()
    assert np.isfinite(x).all() and (x >= 0).all()
    np.testing.assert_array_equal(x, np.round(x))
    assert x.sum(axis=1).min() > 0
    assert list(generated.obs[key].astype(str)) == [value] * 12
    assert list(generated.var_names) == artifact.load(run["ldm"]).vae.genes.ids
    settings = generated.uns["generation"]
    assert settings["checkpoint"] == str(run["ldm"])
    assert dict(settings["guidance"]) == {key: 2.0}
    assert settings["guidance_mode"] == "compositional"
    assert list(settings["guidance_interval"]) == [0.0, 0.5]
    assert settings["sampler"] == "euler"
    assert settings["n_steps"] == 3
    assert settings["seed"] == 5
    assert json.loads(settings["requests"]) == [{"condition": {key: value}, "n_cells": 12}]


@pytest.mark.parametrize("sampler", [["--sampler", "euler"], ["--sampler", "sde", "--sde-noise", "0.5"]])
def test_generation_is_reproducible_for_a_seed(synthetic_run, tmp_path, sampler):
    args = ["generate", str(synthetic_run["ldm"]), "--n-cells", "8", "--condition", "cell_type=type_0"]
    args += [*sampler, "--steps", "2"]
    for name, seed in [("a", "1"), ("b", "1"), ("c", "2")]:
        assert main([*args, "--seed", seed, "--out", str(tmp_path / f"{name}.h5ad")]) == 0
    a, b, c = (ad.read_h5ad(tmp_path / f"{n}.h5ad") for n in "abc")
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    assert not np.array_equal(a.X.toarray(), c.X.toarray())
    settings = a.uns["generation"]
    assert settings["sampler"] == sampler[1]
    assert settings.get("sde_noise") == (0.5 if sampler[1] == "sde" else None)


def test_the_prior_fits_the_library_size_on_the_training_latents(synthetic_run):
    ldm = artifact.load(synthetic_run["ldm"], kind="ldm")
    fit = ldm.library_from_latent
    # The VAE's global log-normal was fitted on the same training cells: their mean and spread of log L.
    mean, std = ldm.vae.library_size.params({})
    assert fit.weight.shape == ldm.latent_mean.shape and fit.n_cells == 96  # the h5ad source's 80% train split
    # Standardised training latents have mean zero, so the intercept is the training cells' mean log size.
    assert fit.bias == pytest.approx(mean, abs=1e-3)
    assert 0 < fit.std <= std * 1.05
    assert fit.log_range[0] < mean < fit.log_range[1]


def test_the_library_fit_leaves_out_cells_without_counts_and_says_so(caplog):
    from scldm_scale.train.stages import _fit_library_from_latent

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(50, 2, 3, generator=g)
    sizes = torch.exp(6.0 + 0.3 * torch.randn(50, generator=g))
    sizes[[3, 17]] = 0.0
    with caplog.at_level(logging.WARNING, logger="scldm_scale.train.stages"):
        fit = _fit_library_from_latent(latents, sizes, seed=0)
    assert fit.n_cells == 48 and np.isfinite(fit.bias) and np.isfinite(fit.std)
    assert "2 of 50 training cells have no counts over the model's genes" in caplog.text


def test_library_sizes_follow_the_latent_fit_or_the_condition_and_are_recorded(synthetic_run, tmp_path, capsys):
    from dataclasses import replace

    from scldm_scale.config import SampleConfig
    from scldm_scale.generate import Generator
    from scldm_scale.models.library_size import LatentLibrarySize

    ldm = artifact.load(synthetic_run["ldm"], kind="ldm")
    labels = {"cell_type": np.array(["type_0"] * 300, dtype=object)}
    sampler = SampleConfig(method="euler", n_steps=2, library_size="latent")
    for total in (40.0, 2000.0):  # a fit with no slope and no noise: every cell's library size is `total`
        log_total = float(np.log(total))
        no_slope = torch.zeros_like(ldm.latent_mean)
        flat = LatentLibrarySize(no_slope, log_total, 0.0, 1.0, 0.0, 10, (log_total, log_total))
        gen = Generator.from_artifact(replace(ldm, library_from_latent=flat))
        counts = gen.sample(300, labels, sampler=sampler, progress=False)
        assert counts.sum(axis=1).mean() == pytest.approx(total, rel=0.1)  # NB means sum to the library size
    args = ["generate", "--n-cells", "6", "--condition", "cell_type=type_0", "--steps", "2", "--seed", "3"]
    drawn = {}
    for mode in ("auto", "latent", "condition"):
        out = tmp_path / f"{mode}.h5ad"
        assert main([args[0], str(synthetic_run["ldm"]), *args[1:], "--library-size", mode, "--out", str(out)]) == 0
        drawn[mode] = ad.read_h5ad(out)
        assert drawn[mode].uns["generation"]["library_size"] == ("condition" if mode == "condition" else "latent")
    np.testing.assert_array_equal(drawn["auto"].X.toarray(), drawn["latent"].X.toarray())
    assert not np.array_equal(drawn["latent"].X.toarray(), drawn["condition"].X.toarray())
    # A model written before the fit existed: auto takes the condition's fit and says so; latent is refused.
    old = replace(ldm, library_from_latent=None).save(tmp_path / "old-model")
    assert main([args[0], str(old), *args[1:], "--out", str(tmp_path / "old.h5ad")]) == 0
    assert ad.read_h5ad(tmp_path / "old.h5ad").uns["generation"]["library_size"] == "condition"
    capsys.readouterr()
    code = main([args[0], str(old), *args[1:], "--library-size", "latent", "--out", str(tmp_path / "never.h5ad")])
    assert code == 2
    assert "no library-size fit on the latent" in capsys.readouterr().err
    assert not (tmp_path / "never.h5ad").exists()


def test_cli_generate_unknown_condition_value_lists_the_known_ones(synthetic_run, tmp_path, capsys):
    out = tmp_path / "never.h5ad"
    code = main(
        ["generate", str(synthetic_run["ldm"]), "--n-cells", "4", "--condition", "cell_type=neuron", "--out", str(out)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "cell_type='neuron' is not known" in err
    assert "known values: type_0, type_1, type_2" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--condition", "tissue=lung"], "unknown condition key 'tissue'"),
        (["--cfg", "cell_type=2.0"], "without a --condition value"),
        (["--condition", "cell_type=type_0", "--cfg", "cell_type=strong"], "is not a number"),
        (["--condition", "cell_type"], "expects KEY=VALUE"),
        (["--condition", "cell_type=type_0", "--condition", "cell_type=type_1"], "gives 'cell_type' twice"),
        pytest.param(
            ["--device", "cuda"],
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine can use --device cuda"),
        ),
        (["--device", "tpu9"], "is not a torch device name"),
    ],
)
def test_cli_generate_request_errors_exit_2(synthetic_run, tmp_path, capsys, extra, message):
    argv = ["generate", str(synthetic_run["ldm"]), "--n-cells", "4", *extra, "--out", str(tmp_path / "x.h5ad")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_generate_from_a_vae_checkpoint_exits_2(synthetic_run, tmp_path, capsys):
    argv = ["generate", str(synthetic_run["vae"]), "--n-cells", "4", "--out", str(tmp_path / "x.h5ad")]
    assert main(argv) == 2
    assert "expected 'ldm'" in capsys.readouterr().err


def test_ldm_with_other_condition_keys_than_the_vae_is_refused(synthetic_run, synthetic_h5ad, tiny_overrides, tmp_path):
    cfg = load_config(
        None,
        [
            "stage=ldm",
            *tiny_overrides,
            "data.source=h5ad",
            f"data.path={synthetic_h5ad}",
            "data.condition_keys=[]",
            f"train.vae_checkpoint={synthetic_run['vae']}",
            f"train.ckpt_dir={tmp_path}",
        ],
    )
    with pytest.raises(CheckpointError, match=r"the VAE was trained with \['cell_type'\]"):
        run_training(cfg)


def _ldm_cfg(data_path, vae_path, ckpt_dir, tiny_overrides):
    return load_config(
        None,
        [
            "stage=ldm",
            *tiny_overrides,
            "data.source=h5ad",
            f"data.path={data_path}",
            "data.condition_keys=[cell_type]",
            f"train.vae_checkpoint={vae_path}",
            f"train.ckpt_dir={ckpt_dir}",
            "train.max_steps=2",
        ],
    )


def test_ldm_aligns_a_dataset_with_reordered_genes_to_the_vae(synthetic_run, synthetic_h5ad, tiny_overrides, tmp_path):
    source = ad.read_h5ad(synthetic_h5ad)
    reordered = source[:, source.var_names[::-1]].copy()
    reordered.write_h5ad(tmp_path / "reordered.h5ad")
    ldm = artifact.load(
        run_training(_ldm_cfg(tmp_path / "reordered.h5ad", synthetic_run["vae"], tmp_path, tiny_overrides))
    )
    reference = artifact.load(synthetic_run["ldm"])
    assert ldm.vae.genes.ids == list(source.var_names)
    # The same cells in the VAE's gene order encode to the same latents.
    torch.testing.assert_close(ldm.latent_mean, reference.latent_mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(ldm.latent_std, reference.latent_std, rtol=0, atol=1e-5)


def test_condition_balance_weights_even_out_the_combinations():
    ids = {"cell_type": np.array([0] * 6 + [1] * 2 + [2] * 2), "donor": np.array([0] * 8 + [1] * 2)}
    weights = condition_balance_weights(ids, 1.0)  # combinations (0,0) x6, (1,0) x2, (2,1) x2
    np.testing.assert_allclose(weights, [1 / 6] * 6 + [1 / 2] * 4)
    np.testing.assert_allclose(condition_balance_weights(ids, 0.5), [6**-0.5] * 6 + [2**-0.5] * 4)
    assert condition_balance_weights(ids, 0.0) is None
    assert condition_balance_weights({}, 1.0) is None  # an unconditional prior
    assert condition_balance_weights({"cell_type": np.zeros(5, dtype=int)}, 1.0) is None  # one combination


def test_ldm_trains_with_condition_balanced_draws(synthetic_run, synthetic_h5ad, tiny_overrides, tmp_path, caplog):
    cfg = _ldm_cfg(synthetic_h5ad, synthetic_run["vae"], tmp_path, tiny_overrides)
    cfg.train.balance_conditions = 1.0
    with caplog.at_level(logging.INFO, logger="scldm_scale.train.stages"):
        ldm = artifact.load(run_training(cfg))
    assert "condition-balanced draws (train.balance_conditions=1)" in caplog.text
    assert ldm.training["config"]["train"]["balance_conditions"] == 1.0


def test_ldm_refuses_a_dataset_missing_vae_genes(synthetic_run, synthetic_h5ad, tiny_overrides, tmp_path):
    source = ad.read_h5ad(synthetic_h5ad)
    source[:, 3:].copy().write_h5ad(tmp_path / "fewer.h5ad")
    with pytest.raises(
        DataError, match=r"3 genes of the model's vocabulary are missing from the data, e\.g\. \['gene_0', 'gene_1'"
    ):
        run_training(_ldm_cfg(tmp_path / "fewer.h5ad", synthetic_run["vae"], tmp_path, tiny_overrides))


def test_cli_train_writes_a_checkpoint(synthetic_h5ad, tiny_overrides, tmp_path, capsys):
    argv = [
        "train",
        str(CONFIG_DIR / "quickstart.yaml"),
        *tiny_overrides,
        "data.source=h5ad",
        f"data.path={synthetic_h5ad}",
    ]
    argv += ["data.condition_keys=[cell_type]", "train.max_steps=2", f"train.ckpt_dir={tmp_path}"]
    assert main(argv) == 0
    assert f"checkpoint: {tmp_path / 'vae-model'}" in capsys.readouterr().out
    assert artifact.load(tmp_path / "vae-model", kind="vae").provenance.steps == 2


def test_vae_training_loss_decreases(synthetic_h5ad, tiny_overrides, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    overrides = [*tiny_overrides, *synthetic_vae_args(synthetic_h5ad, tmp_path, metrics)]
    cfg = load_config(None, [*overrides, "train.max_steps=30", "optim.vae.lr=1e-2"])
    model = artifact.load(run_training(cfg), kind="vae")
    losses = np.array([h["loss"] for h in model.training["history"]])
    assert len(losses) == 30 and np.isfinite(losses).all()
    # Batch losses are noisy (they scale with the batch's library sizes); measured ratio 0.89.
    assert losses[-5:].mean() < 0.95 * losses[:5].mean(), losses
    # On all cells at once the trained VAE beats an untrained one clearly (measured 116 vs 133 nats).
    dataset = build_dataset(ad.read_h5ad(synthetic_h5ad), cfg.data)
    everything = dataset.batch(np.arange(dataset.counts.shape[0]))
    torch.manual_seed(1)
    untrained = SetVAE(cfg.model, dataset.n_genes).eval()
    with torch.no_grad():
        trained_nll, _ = model.build_vae()(everything)
        untrained_nll, _ = untrained(everything)
    assert trained_nll.item() < 0.92 * untrained_nll.item()
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 31))
    assert [r["loss"] for r in logged] == pytest.approx(losses.tolist())
    assert {"lr", "grad_norm", "cells_per_s", "nll"} <= set(logged[0])


def test_quickstart_writes_the_report(tmp_path, tiny_overrides):
    # Two generation draws (the single draw runs in the --data and perturbation tests).
    from scldm_scale.generate import generate
    from scldm_scale.quickstart import run_quickstart

    overrides = [*tiny_overrides, "train.max_steps=4", "sample.method=euler", "sample.n_steps=2"]
    report = run_quickstart(tmp_path, overrides=overrides, draws=2)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["n_genes"] == 765 and on_disk["draws"] == 2
    assert on_disk["n_train_cells"] + on_disk["n_real_cells"] == 700
    records = json.loads((tmp_path / "metrics.json").read_text())
    assert records == on_disk["metrics"]
    overall = {(r["method"], r["metric"]): r["value"] for r in records if r["condition"] == "all"}
    assert np.isfinite(overall[("reconstruction", "nll_per_cell")]) and overall[("reconstruction", "nll_per_cell")] > 0
    for method in ("generated", "independent_nb", "real_train_cells"):
        for metric in ("mmd", "wasserstein2", "frechet", "mean_r2", "var_r2", "c2st_accuracy", "coverage"):
            assert np.isfinite(overall[(method, metric)]), (method, metric)
    generated = ad.read_h5ad(tmp_path / "generated.h5ad")
    assert generated.n_obs == on_disk["n_real_cells"]
    markdown = (tmp_path / "report.md").read_text()
    assert "NB negative log-likelihood per cell" in markdown
    assert "| generated |" in markdown and "| independent_nb |" in markdown and "## Time" in markdown
    for figure in ("umap.png", "mean_var.png", "metric_by_condition.png"):
        assert f"]({figure})" in markdown and (tmp_path / figure).stat().st_size > 1000

    # Draw 1 is what `generate` gives with seed 0 + 1 for the same requests, and differs from draw 0.
    draw1 = ad.read_h5ad(tmp_path / "generated_draw1.h5ad")
    assert (generated.X != draw1.X).nnz > 0
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", overrides)
    counts = draw1.obs["bulk_labels"].astype(str).value_counts(sort=False).sort_index()
    requests = [({"bulk_labels": label}, int(n)) for label, n in counts.items()]
    guidance = {"bulk_labels": cfg.sample.guidance}
    again = generate(on_disk["checkpoints"]["ldm"], requests, guidance=guidance, sampler=cfg.sample, seed=1)
    np.testing.assert_array_equal(again.X.toarray(), draw1.X.toarray())
    # metrics.json is each record's mean over the two draws of metrics_draws.json.
    every = json.loads((tmp_path / "metrics_draws.json").read_text())
    assert {r["draw"] for r in every} == {0, 1}
    by_key: dict[tuple, list[float]] = {}
    for r in every:
        by_key.setdefault((r["metric"], r["condition"], r["method"]), []).append(r["value"])
    checked = 0
    for r in records:
        values = by_key[(r["metric"], r["condition"], r["method"])]
        if len(values) == 2 and all(np.isfinite(values)):
            assert r["value"] == pytest.approx(np.mean(values)), r
            checked += 1
    assert checked > 50
    assert "mean of 2 generation draws" in (tmp_path / "checkpoints" / "ldm-model" / "README.md").read_text()


def test_quickstart_refuses_no_draws(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs"), "--draws", "0"]) == 2
    assert "--draws must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()


def test_perturbation_demo_reports_the_unseen_pair_beside_its_baseline(tmp_path, tiny_overrides):
    from scldm_scale.quickstart import run_quickstart

    overrides = [*tiny_overrides, "train.max_steps=4", "sample.method=euler", "sample.n_steps=2"]
    report = run_quickstart(tmp_path, overrides=overrides, config=CONFIG_DIR / "perturbation.yaml")
    assert report["holdout_combinations"] == [{"cell_line": "line_B", "perturbation": "pert_2"}]
    unseen = {(r["method"], r["metric"]): r["value"] for r in report["metrics"] if r["condition"] == "unseen"}
    # The held-out pair is all of its cells (100), never trained on; only the additive shift predicts it (and the
    # reconstruction ceiling reconstructs them through the VAE, which never saw them either).
    assert {m for m, _ in unseen} == {"generated", "additive_shift", "reconstruction_ceiling"}
    assert unseen[("generated", "n_real_cells")] == unseen[("additive_shift", "n_cells")] == 100
    seen_methods = {r["method"] for r in report["metrics"] if r["condition"] == "seen"}
    assert seen_methods == {
        "generated",
        "reconstruction_ceiling",
        "train_reconstruction",
        "real_train_cells",
        "independent_nb",
    }
    assert "| unseen | additive_shift |" in (tmp_path / "report.md").read_text()
