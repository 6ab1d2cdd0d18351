"""Checkpoints: round trip of a model, clear errors for bad files, atomic saves (save / crash / load)."""

import os

import pytest
import scipy.sparse as sp
import torch

from scldm_scale.config import Config, VAEConfig, to_dict
from scldm_scale.data.batch import collate
from scldm_scale.train.checkpoint import FORMAT, VERSION, CheckpointError, load_checkpoint, save_checkpoint
from scldm_scale.train.stages import load_vae


def _vae_payload(seed: int = 0) -> tuple[dict, torch.nn.Module]:
    from scldm_scale.models.vae import SetVAE

    torch.manual_seed(seed)
    cfg = VAEConfig(d_model=16, n_heads=2, n_cross_heads=2, n_layers=1, n_latent_tokens=4, latent_dim=8)
    vae = SetVAE(cfg, 12)
    with torch.no_grad():  # away from init so a missed tensor would show
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    payload = {
        "vae_config": vars(cfg).copy(),
        "vae_state": vae.state_dict(),
        "gene_names": [f"g{i}" for i in range(12)],
    }
    return payload, vae


def _no_temp_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_round_trip_gives_identical_model_outputs(tmp_path):
    payload, vae = _vae_payload()
    path = save_checkpoint(tmp_path / "sub" / "vae.pt", "vae", payload)
    assert path == tmp_path / "sub" / "vae.pt"
    ckpt = load_checkpoint(path, kind="vae")
    assert ckpt["format"] == FORMAT and ckpt["version"] == VERSION and ckpt["kind"] == "vae"
    restored = load_vae(ckpt)
    assert not restored.training
    counts = torch.poisson(torch.full((5, 12), 2.0)) + torch.eye(5, 12)  # no empty cells
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


def test_round_trip_keeps_nested_python_data(tmp_path):
    payload = {"config": to_dict(Config()), "history": [{"step": 1}]}
    path = save_checkpoint(tmp_path / "x.pt", "ldm", payload)
    data = load_checkpoint(path)
    assert data["config"] == payload["config"]
    assert data["history"] == [{"step": 1}]


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file_is_reported_as_corrupt(tmp_path):
    payload, _ = _vae_payload()
    path = save_checkpoint(tmp_path / "vae.pt", "vae", payload)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"vae\.pt is corrupt or not a torch file") as err:
        load_checkpoint(path, kind="vae")
    assert str(path) in str(err.value)


def test_text_file_is_reported_as_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="corrupt or not a torch file"):
        load_checkpoint(path)


def test_foreign_torch_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match=r"weights\.pt is not a scldm-scale checkpoint"):
        load_checkpoint(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a scldm-scale checkpoint"):
        load_checkpoint(path)


def test_other_version_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "version": VERSION + 1, "kind": "vae"}, path)
    with pytest.raises(CheckpointError, match=f"checkpoint version {VERSION + 1}, this code reads {VERSION}"):
        load_checkpoint(path)


@pytest.mark.parametrize(("saved", "wanted", "hint"), [("vae", "ldm", "stage=ldm"), ("ldm", "vae", "stage=vae")])
def test_wrong_kind_says_which_checkpoint_to_pass(tmp_path, saved, wanted, hint):
    path = save_checkpoint(tmp_path / f"{saved}.pt", saved, {})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, kind=wanted)
    message = str(err.value)
    assert f"is a '{saved}' checkpoint, expected '{wanted}'" in message
    assert hint in message
    assert load_checkpoint(path)["kind"] == saved  # no kind asked: any kind loads


def test_save_leaves_no_temporary_files(tmp_path):
    for i in range(3):
        save_checkpoint(tmp_path / "vae.pt", "vae", {"i": i})
    assert sorted(os.listdir(tmp_path)) == ["vae.pt"]
    assert load_checkpoint(tmp_path / "vae.pt")["i"] == 2


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    payload, _ = _vae_payload()
    path = save_checkpoint(tmp_path / "vae.pt", "vae", payload)
    before = path.read_bytes()
    real_save = torch.save

    def crash_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(100)  # a partly written file, then the process is interrupted
        raise error

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(type(error)):
        save_checkpoint(path, "vae", {**payload, "step": 99})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _no_temp_files(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["vae.pt"]
    assert "step" not in load_checkpoint(path, kind="vae")
