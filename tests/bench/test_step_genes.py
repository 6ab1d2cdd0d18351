"""`scldm-scale bench step --genes`: the gene sweep's records and table on a tiny model (no timings checked)."""

import json

import pytest

from scldm_scale.bench.step import DECODERS, gene_step, run_gene_sweep
from scldm_scale.cli import main
from scldm_scale.config import ConfigError


def test_gene_step_trains_with_the_configured_chunk():
    got = gene_step(["model.d_model=16", "model.decode_chunk_genes=64"], 150, 3, steps=1, warmup=1, device="cpu")
    assert got["decode_chunk"] == 64
    assert got["s_per_step"] > 0 and got["peak_mem_gb"] > 0 and got["cells_per_s"] == 3 / got["s_per_step"]


def test_gene_sweep_runs_each_decoder_in_a_fresh_process_and_writes_json(tmp_path, capsys):
    out = tmp_path / "genes.json"
    argv = ["bench", "step", "--genes", "120", "--models", "vae-S,prior-S", "--global-batch", "3", "--steps", "1"]
    assert main([*argv, "--warmup", "0", "--set", "model.n_layers=1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["model"], r["n_genes"], r["decoder"]) for r in records] == [("vae-S", 120, d) for d in DECODERS]
    assert all(r["decode_chunk"] == 120 and r["peak_mem_gb"] > 0 and r["cells"] == 3 for r in records)
    assert "one pass" in capsys.readouterr().out


def test_gene_sweep_refuses_a_prior_size():
    with pytest.raises(ConfigError, match="VAE sizes"):
        run_gene_sweep(["prior-S"], [100], 2, 1, 0, None, "cpu")
