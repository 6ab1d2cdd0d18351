"""The chunked decoder (model.decode_chunk_genes) under FSDP2 (with activation checkpointing) and DeepSpeed
ZeRO-3 on 2 gloo processes: the loss curve of one process decoding all genes in one pass.

Under both, the unpooling block (an FSDP unit / a ZeRO-3 partitioned module) is called once per chunk in the
forward pass and again when each chunk is recomputed in the backward pass.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scldm_test_helpers import NO_TOKEN_DROPOUT, synthetic_vae_args

from scldm_scale.cli import main
from scldm_scale.config import CONFIG_DIR

pytestmark = [pytest.mark.multiproc, pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")]

STEPS = 6
BATCH = 32  # per rank; the single process takes 2 x BATCH
# As tests/train/test_distributed.py: only the order of fp32 sums differs (here also chunk by chunk).
CURVE_RTOL = 1e-4
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _args(tiny_overrides, h5ad: Path, run: Path, *extra: str) -> list[str]:
    quickstart = str(CONFIG_DIR / "quickstart.yaml")
    return ["train", quickstart, *tiny_overrides, *synthetic_vae_args(h5ad, run, run / "metrics.jsonl"),
            NO_TOKEN_DROPOUT, f"train.max_steps={STEPS}", *extra]  # fmt: skip


def _curve(run: Path) -> dict[str, list[float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return {key: [r[key] for r in records] for key in ("loss", "grad_norm")}


@pytest.mark.parametrize(
    "strategy",
    [
        ("train.strategy=fsdp", "train.activation_checkpointing=true"),
        ("train.strategy=deepspeed", "train.zero_stage=3"),
    ],
    ids=["fsdp+ac", "zero3"],
)
def test_chunked_decoder_on_two_ranks_gives_the_one_pass_curve(strategy, tiny_overrides, synthetic_h5ad, tmp_path):
    single = tmp_path / "single"
    whole = _args(
        tiny_overrides, synthetic_h5ad, single, f"train.batch_size={2 * BATCH}", "model.decode_chunk_genes=-1"
    )
    assert main(whole) == 0
    sharded = tmp_path / "sharded"
    chunked = _args(tiny_overrides, synthetic_h5ad, sharded, f"train.batch_size={BATCH}", "model.decode_chunk_genes=7")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS} | {
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
    }
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "scldm_scale",
    ]
    result = subprocess.run([*launcher, *chunked, *strategy], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    want, got = _curve(single), _curve(sharded)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=CURVE_RTOL, err_msg=key)
