"""Single-process checks of the engine's options: activation checkpointing, gradient accumulation, the
DeepSpeed config built from ours, which checkpoints each strategy resumes, and the config rules of the
strategies. (Multi-process behaviour is in test_distributed.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from scldm_test_helpers import synthetic_vae_args

from scldm_scale.artifact import CheckpointError
from scldm_scale.config import ConfigError, TrainConfig, load_config
from scldm_scale.train import distributed
from scldm_scale.train.distributed import Dist
from scldm_scale.train.stages import run_training
from scldm_scale.train.strategies import (
    DEEPSPEED,
    WEIGHTS,
    DeepSpeedStrategy,
    FSDPStrategy,
    apply_activation_checkpointing,
)


def _run(tiny_overrides, synthetic_h5ad, tmp_path, *extra) -> list[dict]:
    metrics = tmp_path / "m.jsonl"
    overrides = [*tiny_overrides, *synthetic_vae_args(synthetic_h5ad, tmp_path, metrics), "train.max_steps=4"]
    cfg = load_config(None, [*overrides, *extra])
    run_training(cfg)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def test_activation_checkpointing_gives_the_same_losses(tiny_overrides, synthetic_h5ad, tmp_path):
    plain = _run(tiny_overrides, synthetic_h5ad, tmp_path / "plain")
    recomputed = _run(tiny_overrides, synthetic_h5ad, tmp_path / "ac", "train.activation_checkpointing=true")
    # Recomputation repeats the same float32 operations: equal up to summation order (none here).
    assert [r["loss"] for r in recomputed] == pytest.approx([r["loss"] for r in plain], rel=1e-6)
    assert [r["grad_norm"] for r in recomputed] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-5)


def test_activation_checkpointing_wraps_every_block_and_keeps_parameter_names():
    from scldm_scale.config import VAEConfig
    from scldm_scale.models.vae import SetVAE

    model = SetVAE(VAEConfig(d_model=16, n_heads=2, n_cross_heads=2, n_layers=2, n_latent_tokens=4, latent_dim=8), 20)
    names = [n for n, _ in model.named_parameters()]
    assert apply_activation_checkpointing(model) == 2 + 2 * 2  # pool, unpool and 2 x 2 self-attention blocks
    assert [n for n, _ in model.named_parameters()] == names


def test_gradient_accumulation_equals_the_large_batch(tiny_overrides, synthetic_h5ad, tmp_path):
    # train.batch_size=32 in tiny_overrides: 2 micro-batches of 16 see the same 32 cells as one batch of 32
    # (the in-memory source deals consecutive slices of one permutation) and average the same gradient.
    large = _run(tiny_overrides, synthetic_h5ad, tmp_path / "large")
    accumulated = _run(
        tiny_overrides, synthetic_h5ad, tmp_path / "accum", "train.batch_size=16", "train.grad_accum_steps=2"
    )
    assert [r["step"] for r in accumulated] == [1, 2, 3, 4]
    assert [r["loss"] for r in accumulated] == pytest.approx([r["loss"] for r in large], rel=1e-5)
    assert [r["cells_per_s"] > 0 for r in accumulated] == [True] * 4


def test_the_deepspeed_config_is_built_from_ours():
    cfg = TrainConfig(
        strategy="deepspeed", zero_stage=3, offload_optimizer=True, batch_size=24, grad_accum_steps=2, grad_clip=0.5
    )
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # the config alone, no engine
    strategy.cfg, strategy.dist, strategy.amp_dtype = cfg, Dist(0, 1, 0, torch.device("cpu")), torch.bfloat16
    ds = strategy.deepspeed_config()
    assert ds["train_micro_batch_size_per_gpu"] == 24 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False}}


def test_each_strategy_says_which_checkpoints_it_resumes(tmp_path):
    dcp_folder, zero_folder = tmp_path / "dcp", tmp_path / "zero"
    (dcp_folder / WEIGHTS).mkdir(parents=True)
    (zero_folder / DEEPSPEED).mkdir(parents=True)
    fsdp = FSDPStrategy.__new__(FSDPStrategy)  # the check alone, no model
    fsdp.dist = Dist(0, 2, 0, torch.device("cpu"))
    fsdp.check_resumable(dcp_folder, "single", 1)  # DCP reshards: any DCP strategy, any number of ranks
    with pytest.raises(CheckpointError, match="written by train.strategy=deepspeed, which train.strategy=fsdp cannot"):
        fsdp.check_resumable(zero_folder, "deepspeed", 2)
    zero = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    zero.dist = Dist(0, 2, 0, torch.device("cpu"))
    zero.check_resumable(zero_folder, "deepspeed", 2)
    with pytest.raises(CheckpointError, match="deepspeed resumes only its own checkpoints"):
        zero.check_resumable(dcp_folder, "fsdp", 2)
    with pytest.raises(CheckpointError, match=r"DeepSpeed checkpoint of 4 ranks; it resumes on 4 ranks only \(now 2\)"):
        zero.check_resumable(zero_folder, "deepspeed", 4)


def test_strategy_config_rules(monkeypatch):
    with pytest.raises(ConfigError, match="init_on_meta=true needs train.strategy=fsdp"):
        load_config(None, ["train.init_on_meta=true"])
    with pytest.raises(ConfigError, match="zero_stage must be 1, 2 or 3"):
        load_config(None, ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match="train.strategy=.*is not one of"):
        load_config(None, ["train.strategy=horovod"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="strategy=single but 2 processes were launched"):
        distributed.setup(TrainConfig(), torch.device("cpu"))
