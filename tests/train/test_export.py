"""`scldm-scale export`: a step folder of a single-process run -> the same artifact training wrote at its end
(the multi-rank strategies are exported in tests/train/test_distributed.py)."""

import torch
from scldm_test_helpers import synthetic_vae_args

from scldm_scale import artifact
from scldm_scale.cli import main
from scldm_scale.config import load_config
from scldm_scale.models.vae import SetVAE
from scldm_scale.train.stages import run_training

STEPS = 4


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_of_the_last_step_folder_is_the_trained_model(synthetic_h5ad, tiny_overrides, tmp_path):
    common = [*tiny_overrides, f"train.max_steps={STEPS}", "train.ckpt_every=2"]
    vae_cfg = load_config(
        None, [*synthetic_vae_args(synthetic_h5ad, tmp_path), *common, "train.activation_checkpointing=true"]
    )
    vae_path = run_training(vae_cfg)
    ldm_args = [*synthetic_vae_args(synthetic_h5ad, tmp_path), "stage=ldm", f"train.vae_checkpoint={vae_path}"]
    ldm_path = run_training(load_config(None, [*ldm_args, *common]))

    assert main(["export", str(tmp_path / "vae" / f"step-{STEPS}"), "--out", str(tmp_path / "vae-export")]) == 0
    exported, final = artifact.load(tmp_path / "vae-export"), artifact.load(vae_path)
    assert _same(exported.weights, final.weights)
    # Plain module names, whatever the training wrapped around the blocks (activation checkpointing here).
    assert set(final.weights) == set(SetVAE(vae_cfg.model, len(final.genes)).state_dict())
    assert exported.genes == final.genes and exported.training == final.training
    assert (exported.provenance.steps, exported.provenance.cells_seen) == (STEPS, final.provenance.cells_seen)
    assert exported.provenance.data_uri == str(synthetic_h5ad)

    assert main(["export", str(tmp_path / "ldm" / "step-2")]) == 0  # default: beside the step folders
    early, final_ldm = artifact.load(tmp_path / "ldm-model-step-2", kind="ldm"), artifact.load(ldm_path)
    assert early.provenance.steps == 2 and early.training["history"] == final_ldm.training["history"][:2]
    assert not _same(early.prior_ema_weights, final_ldm.prior_ema_weights)
    assert _same(early.vae.weights, final_ldm.vae.weights) and torch.equal(early.latent_std, final_ldm.latent_std)
