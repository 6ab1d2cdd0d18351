"""Model artifacts: round trips, clear errors for bad folders, atomic saves, and no pickle ever runs."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from safetensors.torch import save_file

from scldm_scale import artifact
from scldm_scale.artifact import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    CheckpointError,
    LDMArtifact,
    Provenance,
    VAEArtifact,
)
from scldm_scale.config import Config, PriorConfig, VAEConfig, to_dict
from scldm_scale.data.batch import LabelEncoder, TokenPolicy, collate
from scldm_scale.data.vocab import GeneVocabulary
from scldm_scale.models.dit import DiT
from scldm_scale.models.library_size import LatentLibrarySize, LibrarySizeModel
from scldm_scale.models.vae import SetVAE
from scldm_scale.train.export import from_legacy

N_GENES = 12


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # away from init so a missed tensor would show
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def _vae_artifact(seed: int = 0) -> tuple[VAEArtifact, SetVAE]:
    torch.manual_seed(seed)
    cfg = VAEConfig(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8)
    vae = _perturbed(SetVAE(cfg, N_GENES))
    labels = np.array(["a", "b", "a", "b", "a", "b"])
    model = VAEArtifact(
        config=cfg,
        genes=GeneVocabulary([f"ENSG{i:05d}" for i in range(N_GENES)], [f"GENE{i}" for i in range(N_GENES)]),
        encoders={"cell_type": LabelEncoder.fit("cell_type", labels)},
        library_size=LibrarySizeModel.fit(np.arange(1, 7) * 100.0, {"cell_type": labels}),
        token_policy=TokenPolicy("expressed_plus_zeros", 3),
        weights=vae.state_dict(),
        provenance=Provenance.collect("cells.soma", 640, 5, "single"),
        training={"config": to_dict(Config()), "history": [{"step": 1, "loss": 2.5}]},
    )
    return model, vae


def _ldm_artifact() -> tuple[LDMArtifact, DiT]:
    vae_model, _ = _vae_artifact()
    cfg = vae_model.config
    torch.manual_seed(1)
    dit = _perturbed(
        DiT(PriorConfig(d_model=16, n_heads=2, n_layers=1), cfg.n_latent_tokens, cfg.latent_dim, {"cell_type": 2})
    )
    ema = {k: v + 1.0 for k, v in dit.state_dict().items()}
    model = LDMArtifact(
        vae=vae_model,
        prior_config=PriorConfig(d_model=16, n_heads=2, n_layers=1),
        n_classes={"cell_type": 2},
        latent_mean=torch.randn(cfg.n_latent_tokens, cfg.latent_dim),
        latent_std=torch.rand(cfg.n_latent_tokens, cfg.latent_dim) + 0.5,
        prior_weights=dit.state_dict(),
        prior_ema_weights=ema,
    )
    return model, dit


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _no_temp_folders(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.endswith((".tmp", ".trash"))]


def test_vae_round_trip_gives_identical_model_outputs(tmp_path):
    model, vae = _vae_artifact()
    path = model.save(tmp_path / "sub" / "vae-model")
    assert path == tmp_path / "sub" / "vae-model"
    assert sorted(os.listdir(path)) == ["README.md", CONFIG_FILE, WEIGHTS_FILE]
    loaded = artifact.load(path, kind="vae")
    restored = loaded.build_vae()
    assert not restored.training
    counts = torch.poisson(torch.full((5, N_GENES), 2.0)) + torch.eye(5, N_GENES)  # no empty cells
    batch = collate(sp.csr_matrix(counts.numpy()), {})
    vae.eval()
    with torch.no_grad():
        z, _ = vae.encode(batch.gene_ids, batch.counts, batch.mask)
        z2, _ = restored.encode(batch.gene_ids, batch.counts, batch.mask)
        h, h2 = vae.decode(z, batch.decode_gene_ids), restored.decode(z2, batch.decode_gene_ids)
    assert torch.equal(z, z2)
    assert torch.equal(h, h2)
    for key, value in vae.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    # The tied gene embedding is one tensor again after loading, as in the model that was saved.
    assert restored.decoder_gene_embedding.weight is restored.gene_embedding.weight
    assert loaded.genes == model.genes and loaded.genes.names[3] == "GENE3"
    assert loaded.encoders["cell_type"].values == ["a", "b"]
    assert loaded.library_size.params({"cell_type": "b"}) == pytest.approx(
        model.library_size.params({"cell_type": "b"})
    )
    assert loaded.token_policy == TokenPolicy("expressed_plus_zeros", 3)
    assert loaded.provenance == model.provenance
    assert loaded.source == str(path)


@pytest.mark.parametrize("copied", [False, True])
def test_weights_are_stored_once_under_plain_module_names(tmp_path, copied):
    model, vae = _vae_artifact()
    if copied:  # as a GPU state dict moved to the CPU key by key: tied names are separate tensors
        model = dataclasses.replace(model, weights={k: v.clone() for k, v in model.weights.items()})
    path = model.save(tmp_path / "vae-model")
    config = json.loads((path / CONFIG_FILE).read_text())
    from safetensors import safe_open

    with safe_open(path / WEIGHTS_FILE, "pt") as f:
        stored = set(f.keys())
    expected = {f"vae.{k}" for k in vae.state_dict()}
    assert stored | set(config["tied_weights"]) == expected
    assert not stored & set(config["tied_weights"])
    assert config["tied_weights"]["vae.decoder_gene_embedding.weight"] == "vae.gene_embedding.weight"
    restored = artifact.load(path).build_vae()
    assert restored.decoder_gene_embedding.weight is restored.gene_embedding.weight
    assert torch.equal(restored.decoder_gene_embedding.weight, vae.gene_embedding.weight)


def test_ldm_round_trip_keeps_prior_ema_latents_and_its_vae(tmp_path):
    model, dit = _ldm_artifact()
    loaded = artifact.load(model.save(tmp_path / "ldm-model"), kind="ldm")
    assert isinstance(loaded, LDMArtifact) and loaded.guidance_mode == "compositional"
    assert torch.equal(loaded.latent_mean, model.latent_mean) and torch.equal(loaded.latent_std, model.latent_std)
    trained, ema = loaded.build_prior(use_ema=False), loaded.build_prior()
    for key, value in dit.state_dict().items():
        assert torch.equal(trained.state_dict()[key], value), key
        assert torch.equal(ema.state_dict()[key], value + 1.0), key
    assert loaded.n_classes == {"cell_type": 2}
    assert loaded.vae.genes == model.vae.genes
    vae = loaded.build_vae()
    for key, value in model.vae.weights.items():
        assert torch.equal(vae.state_dict()[key], value), key


def test_ldm_round_trip_keeps_the_library_fit_on_the_latent_and_refuses_it_half_written(tmp_path):
    from dataclasses import replace

    from safetensors.torch import load_file

    model, _ = _ldm_artifact()
    assert artifact.load(model.save(tmp_path / "without"), kind="ldm").library_from_latent is None  # older models
    fit = LatentLibrarySize(torch.randn_like(model.latent_mean), 7.5, 0.2, 3.0, 0.6, 40, (6.0, 9.0))
    path = replace(model, library_from_latent=fit).save(tmp_path / "with")
    loaded = artifact.load(path, kind="ldm").library_from_latent
    assert torch.equal(loaded.weight, fit.weight)
    assert (loaded.bias, loaded.std, loaded.alpha, loaded.loo_r2, loaded.n_cells, loaded.log_range) == (
        7.5, 0.2, 3.0, 0.6, 40, (6.0, 9.0)
    )  # fmt: skip
    assert "drawn given the latent: leave-one-out R^2 0.60" in (path / "README.md").read_text()
    tensors = load_file(path / WEIGHTS_FILE)
    weight = tensors.pop("library.weight")
    save_file(tensors, path / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="lacks 'library.weight'; export the model again"):
        artifact.load(path)
    save_file({**tensors, "library.weight": weight[:1]}, path / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="'library.weight' has shape"):
        artifact.load(path)


def test_the_model_card_code_runs(tmp_path):
    model, _ = _ldm_artifact()
    model.save(tmp_path / "ldm-model")
    card = (tmp_path / "ldm-model" / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    assert "embed_cells" in code and "generate_cells" in code
    adata = ad.AnnData(
        X=sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (6, N_GENES)).astype(np.float32) + np.eye(6, N_GENES)),
        var=pd.DataFrame(index=model.vae.genes.ids),
    )
    namespace = {"adata": adata}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(code, namespace)
    finally:
        os.chdir(cwd)
    assert namespace["adata"].obsm["X_scldm"].shape == (6, 4 * 8)
    assert namespace["cells"].shape == (100, N_GENES)


def test_an_unknown_field_in_the_config_is_a_clear_error(tmp_path):
    path = _vae_artifact()[0].save(tmp_path / "m")
    config = json.loads((path / CONFIG_FILE).read_text())
    config["provenance"]["gpu_hours"] = 3
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json lacks or misstates .*gpu_hours"):
        artifact.load(path)
    config["provenance"].pop("gpu_hours")
    config["vae"]["conditions"] = ["a", "b"]
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json lacks or misstates"):
        artifact.load(path)


def test_round_trip_keeps_nested_python_data(tmp_path):
    model, _ = _vae_artifact()
    loaded = artifact.load(model.save(tmp_path / "m"))
    assert loaded.training["config"] == to_dict(Config())
    assert loaded.training["history"] == [{"step": 1, "loss": 2.5}]
    nan_loss = dataclasses.replace(model, training={"history": [{"step": 1, "loss": float("nan")}]})
    assert artifact.load(nan_loss.save(tmp_path / "n")).training["history"] == [{"step": 1, "loss": None}]
    artifact.record_evaluation(tmp_path / "m", {"mmd": 0.0057, "evaluated on": "pbmc"})
    again = artifact.load(tmp_path / "m")
    assert again.evaluation == {"mmd": 0.0057, "evaluated on": "pbmc"}
    card = (tmp_path / "m" / "README.md").read_text()
    modes = {name: os.stat(tmp_path / "m" / name).st_mode & 0o777 for name in ("README.md", CONFIG_FILE)}
    assert modes == {name: 0o666 & ~_umask() for name in modes}  # readable by others, as a shared model must be
    assert "| mmd | 0.0057 |" in card and "12 (ids and names)" in card and "cells.soma" in card


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        artifact.load(tmp_path / "nope")


def test_truncated_weights_are_reported_as_corrupt(tmp_path):
    model, _ = _vae_artifact()
    path = model.save(tmp_path / "vae-model")
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is missing or corrupt") as err:
        artifact.load(path, kind="vae")
    assert str(path) in str(err.value)


def test_a_folder_without_config_is_not_a_model(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(CheckpointError, match="not a model artifact folder"):
        artifact.load(tmp_path / "weights")


def test_foreign_config_is_not_a_model(tmp_path):
    model, _ = _vae_artifact()
    path = model.save(tmp_path / "m")
    (path / CONFIG_FILE).write_text("this is not json\n")
    with pytest.raises(CheckpointError, match="config.json is unreadable"):
        artifact.load(path)
    (path / CONFIG_FILE).write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match="not a scldm-scale model config"):
        artifact.load(path)


def test_other_format_version_is_refused(tmp_path):
    model, _ = _vae_artifact()
    path = model.save(tmp_path / "m")
    config = json.loads((path / CONFIG_FILE).read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"model format version {FORMAT_VERSION + 1}, but .* reads version 1"):
        artifact.load(path)


def test_a_config_that_misstates_the_model_is_refused(tmp_path):
    model, _ = _vae_artifact()
    path = model.save(tmp_path / "m")
    config = json.loads((path / CONFIG_FILE).read_text())
    config["vae"]["config"]["d_model"] = 32
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="VAE weights do not match the stored VAE config"):
        artifact.load(path).build_vae()
    del config["vae"]["genes"]
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lacks or misstates 'genes'"):
        artifact.load(path)


@pytest.mark.parametrize(("saved", "wanted", "hint"), [("vae", "ldm", "stage=ldm"), ("ldm", "vae", "stage=vae")])
def test_wrong_kind_says_which_model_to_pass(tmp_path, saved, wanted, hint):
    model = _vae_artifact()[0] if saved == "vae" else _ldm_artifact()[0]
    path = model.save(tmp_path / saved)
    with pytest.raises(CheckpointError) as err:
        artifact.load(path, kind=wanted)
    message = str(err.value)
    assert f"is a '{saved}' model, expected '{wanted}'" in message
    assert hint in message
    assert artifact.load(path).kind == saved  # no kind asked: any kind loads


def test_a_single_file_says_how_to_convert_it(tmp_path):
    path = tmp_path / "vae.pt"
    path.write_bytes(b"not read at all")
    with pytest.raises(CheckpointError, match=r"scldm-scale export --from-legacy .*vae\.pt --out DIR"):
        artifact.load(path)


def test_save_leaves_no_temporary_files_and_replaces_the_old_model(tmp_path):
    for seed in range(3):
        _vae_artifact(seed)[0].save(tmp_path / "vae-model")
    assert sorted(os.listdir(tmp_path)) == ["vae-model"]
    expected = _vae_artifact(2)[0].weights
    loaded = artifact.load(tmp_path / "vae-model").weights
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_save_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("mine")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / CONFIG_FILE).write_text(json.dumps({"architectures": ["BertModel"]}))
    for folder in ("results", "hf"):
        with pytest.raises(CheckpointError, match="exists and is not a scldm-scale model"):
            _vae_artifact()[0].save(tmp_path / folder)
    assert (tmp_path / "results" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "hf" / CONFIG_FILE).read_text()) == {"architectures": ["BertModel"]}
    (tmp_path / "empty").mkdir()
    assert artifact.load(_vae_artifact()[0].save(tmp_path / "empty")).kind == "vae"


def test_a_save_interrupted_between_its_renames_says_where_the_previous_model_is(tmp_path, monkeypatch):
    path = _vae_artifact()[0].save(tmp_path / "vae-model")
    real_replace = os.replace

    def die_after_moving_the_old_model_aside(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".trash"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", die_after_moving_the_old_model_aside)
    with pytest.raises(KeyboardInterrupt):
        _vae_artifact(seed=1)[0].save(path)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"an interrupted save left the previous model at .*\.vae-model\.trash"):
        artifact.load(path)
    assert sorted(os.listdir(tmp_path)) == [".vae-model.trash"]  # the new model's temporary folder is gone


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_crash_during_save_keeps_the_previous_model(tmp_path, monkeypatch, error):
    model, _ = _vae_artifact()
    path = model.save(tmp_path / "vae-model")
    before = {name: (path / name).read_bytes() for name in os.listdir(path)}

    def crash_half_way(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)  # a partly written file, then the process is interrupted
        raise error

    monkeypatch.setattr(artifact, "save_file", crash_half_way)
    with pytest.raises(type(error)):
        _vae_artifact(seed=1)[0].save(path)
    monkeypatch.undo()
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before
    assert _no_temp_folders(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["vae-model"]


class _Payload:
    """Unpickling this creates the marker file: the proof that a pickle's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_tampered_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"format": "scldm-scale", "kind": "vae", "x": _Payload(marker)})
    # 1. A model folder whose weights file is a pickle: safetensors refuses it as corrupt.
    model, _ = _vae_artifact()
    folder = model.save(tmp_path / "m")
    (folder / WEIGHTS_FILE).write_bytes(evil)
    with pytest.raises(CheckpointError, match="missing or corrupt"):
        artifact.load(folder)
    # 2. A legacy .pt, given where a model goes, is not opened; converting it uses the restricted unpickler.
    legacy = tmp_path / "vae.pt"
    torch.save({"format": "scldm-scale", "kind": "vae", "x": _Payload(marker)}, legacy)
    with pytest.raises(CheckpointError, match="--from-legacy"):
        artifact.load(legacy)
    with pytest.raises(CheckpointError, match="not a loadable scldm-scale 0.1 checkpoint"):
        from_legacy(legacy)
    legacy.write_bytes(evil)
    with pytest.raises(CheckpointError, match="not a loadable scldm-scale 0.1 checkpoint"):
        from_legacy(legacy)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler does run it (so the checks above prove something).
    pickle.loads(evil)
    assert marker.exists()


def _legacy_payload(model: LDMArtifact) -> dict:
    """What scldm-scale 0.1 wrote as ldm.pt (numpy strings in the library-size fits, as np.unique gave)."""
    vae = model.vae
    library = vae.library_size.state_dict()
    library["fits"]["cell_type"] = {np.str_(k): v for k, v in library["fits"]["cell_type"].items()}
    return {
        "format": "scldm-scale",
        "version": 1,
        "kind": "ldm",
        "config": to_dict(Config()),
        "vae_config": dict(vars(vae.config)),
        "vae_state": vae.weights,
        "prior_config": dict(vars(model.prior_config)),
        "n_classes": model.n_classes,
        "latent_mean": model.latent_mean,
        "latent_std": model.latent_std,
        "gene_names": vae.genes.ids,
        "condition_encoders": {k: e.state_dict() for k, e in vae.encoders.items()},
        "library_size": library,
        "step": 7,
        "history": [{"step": 7, "loss": 1.0}],
        "prior_state": model.prior_weights,
        "prior_ema_state": model.prior_ema_weights,
    }


def test_export_from_legacy_converts_a_0_1_checkpoint(tmp_path):
    from scldm_scale.cli import main

    model, _ = _ldm_artifact()
    torch.save(_legacy_payload(model), tmp_path / "ldm.pt")
    assert main(["export", "--from-legacy", str(tmp_path / "ldm.pt"), "--out", str(tmp_path / "ldm-model")]) == 0
    loaded = artifact.load(tmp_path / "ldm-model", kind="ldm")
    for key, value in model.prior_ema_weights.items():
        assert torch.equal(loaded.prior_ema_weights[key], value), key
    assert loaded.vae.genes.ids == model.vae.genes.ids
    assert loaded.vae.library_size.params({"cell_type": "a"}) == pytest.approx(
        model.vae.library_size.params({"cell_type": "a"})
    )
    assert loaded.provenance.steps == 7 and loaded.training["history"] == [{"step": 7, "loss": 1.0}]


def test_a_model_loads_and_generates_in_a_fresh_process_without_torch_distributed_or_train(tmp_path):
    model, _ = _ldm_artifact()
    model.save(tmp_path / "ldm-model")
    code = (
        "import sys, torch.distributed as dist, scldm_scale\n"
        f"model = scldm_scale.load_model({str(tmp_path / 'ldm-model')!r})\n"
        "cells = scldm_scale.generate_cells(model, {'cell_type': 'b'}, n_cells=3)\n"
        "from scldm_scale.cli import main\n"
        f"assert main(['generate', {str(tmp_path / 'ldm-model')!r}, '--n-cells', '2', '--steps', '2',"
        f" '--out', {str(tmp_path / 'g.h5ad')!r}]) == 0\n"
        "assert not dist.is_initialized()\n"
        "assert 'scldm_scale.train' not in sys.modules, sorted(m for m in sys.modules if 'scldm_scale.train' in m)\n"
        "print(cells.shape, list(cells.obs['cell_type']), list(cells.var['feature_name'][:2]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "(3, 12) ['b', 'b', 'b'] ['GENE0', 'GENE1']"


def test_format_header(tmp_path):
    model, _ = _vae_artifact()
    config = json.loads((model.save(tmp_path / "m") / CONFIG_FILE).read_text())
    assert (config["format"], config["format_version"], config["kind"]) == (FORMAT, FORMAT_VERSION, "vae")
