"""`scldm-scale plan`, the model-size presets in configs/model/, and composing several config files."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from scldm_test_helpers import saved_tensor_bytes

from scldm_scale.cli import build_parser, main
from scldm_scale.config import CONFIG_DIR, ConfigError, load_config, split_config_args
from scldm_scale.models.dit import DiT
from scldm_scale.models.prior import FlowMatchingPrior, LatentBatch
from scldm_scale.models.vae import SetVAE
from scldm_scale.plan import build_dit, build_prior, build_vae, count_parameters, load_plan_config, make_plan

QUICKSTART = CONFIG_DIR / "quickstart.yaml"
PRESETS = sorted((CONFIG_DIR / "model").glob("*.yaml"))
FIRST_LINE = re.compile(r"# parameters: ([\d,]+) \((?:n_genes=(\d+))?")


def preset_model(path):
    """The preset's model on the meta device, as its first-line comment describes it."""
    count, n_genes = FIRST_LINE.match(path.read_text().splitlines()[0]).groups()
    stage = "vae" if path.name.startswith("vae_") else "ldm"
    cfg = load_plan_config([QUICKSTART, path], [f"stage={stage}"])
    model = build_vae(cfg, int(n_genes)) if stage == "vae" else build_dit(cfg)
    return model, int(count.replace(",", ""))


def test_presets_exist_from_tiny_to_1b():
    names = {p.stem for p in PRESETS}
    assert {"vae_tiny", "vae_base", "vae_1b", "prior_tiny", "prior_base", "prior_1b"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_parameter_count_comment(path):
    model, stated = preset_model(path)
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model) == stated


@pytest.mark.parametrize("name", ["vae_1b", "prior_1b"])
def test_1b_presets_are_above_a_billion_and_build_on_meta(name):
    model, stated = preset_model(CONFIG_DIR / "model" / f"{name}.yaml")
    assert stated > 1e9
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


def test_vae_1b_stays_above_a_billion_at_2000_genes():
    cfg = load_plan_config([QUICKSTART, CONFIG_DIR / "model" / "vae_1b.yaml"], [])
    assert count_parameters(build_vae(cfg, 2000)) > 1e9


def test_two_files_then_overrides_merge_left_to_right():
    cfg = load_config([QUICKSTART, CONFIG_DIR / "model" / "vae_base.yaml"], ["model.n_layers=3", "stage=vae"])
    assert cfg.model.d_model == 512  # from the preset
    assert cfg.model.n_layers == 3  # the override wins over the preset
    assert cfg.model.theta_mode == "cell"  # from quickstart, untouched by the preset
    assert cfg.prior.d_model == 128  # from quickstart
    assert load_config(QUICKSTART).model.d_model == 32  # one path still works


def test_relative_preset_path_resolves_from_another_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["configs/quickstart.yaml", "configs/model/prior_base.yaml"])
    assert cfg.prior.d_model == 768


def test_missing_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="vae_huge.yaml does not exist"):
        load_config([QUICKSTART, CONFIG_DIR / "model" / "vae_huge.yaml"])


def test_unknown_key_in_a_preset_names_the_file_and_key(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'model\.d_modle'"):
        load_config([QUICKSTART, preset])


def test_train_takes_several_config_files_then_overrides():
    args = build_parser().parse_args(["train", "configs/quickstart.yaml", "configs/model/vae_base.yaml", "stage=vae"])
    assert split_config_args(args.configs) == (
        ["configs/quickstart.yaml", "configs/model/vae_base.yaml"],
        ["stage=vae"],
    )


def test_split_config_args():
    paths, overrides = split_config_args(["a.yaml", "b.yml", "model.n_layers=2", "data.uri=x.yaml"])
    assert paths == ["a.yaml", "b.yml"]
    assert overrides == ["model.n_layers=2", "data.uri=x.yaml"]
    with pytest.raises(ConfigError, match="neither"):
        split_config_args(["a.yaml", "stray"])
    with pytest.raises(ConfigError, match="at least one config file"):
        split_config_args(["model.n_layers=2"])


def test_memory_rows_follow_zero_sharding():
    cfg = load_plan_config([QUICKSTART], ["train.precision=fp32", "train.batch_size=4"])
    plan = make_plan(cfg, world_size=4, n_genes=300)
    rows = {r["strategy"]: r for r in plan["memory_gib"]}
    p = plan["parameters"] / 2**30
    unit = plan["largest_unit_parameters"] / 2**30
    assert rows["single"]["world_size"] == 1
    for name in ("single", "ddp"):
        assert (rows[name]["params"], rows[name]["grads"], rows[name]["optimizer"]) == pytest.approx(
            (4 * p, 4 * p, 8 * p)
        )
    assert (rows["zero1"]["params"], rows["zero1"]["grads"], rows["zero1"]["optimizer"]) == pytest.approx(
        (4 * p, 4 * p, 2 * p)
    )
    assert (rows["zero2"]["grads"], rows["zero2"]["optimizer"]) == pytest.approx((p, 2 * p))
    for name in ("zero3", "fsdp"):
        assert (rows[name]["params"], rows[name]["grads"], rows[name]["optimizer"]) == pytest.approx((p, p, 2 * p))
        assert rows[name]["other"] == pytest.approx(8 * unit)  # one gathered unit: fp32 params + grads
    assert rows["zero1"]["total"] > rows["zero2"]["total"] > rows["zero3"]["total"]


def test_bf16_offload_and_kept_gathered_params():
    cfg = load_plan_config(
        [QUICKSTART], ["train.precision=bf16", "train.offload_optimizer=true", "train.reshard_after_forward=false"]
    )
    plan = make_plan(cfg, world_size=2, strategy="all", n_genes=300)
    rows = {r["strategy"]: r for r in plan["memory_gib"]}
    p = plan["parameters"] / 2**30
    unit = plan["largest_unit_parameters"] / 2**30
    assert rows["ddp"]["optimizer"] == pytest.approx(12 * p)  # fp32 master + 2 moments
    assert rows["zero1"]["optimizer"] == 0 and rows["zero1"]["optimizer_cpu"] == pytest.approx(6 * p)
    assert rows["fsdp"]["optimizer_cpu"] == 0  # offload is DeepSpeed's
    assert rows["fsdp"]["other"] == pytest.approx(2 * p + 2 * unit)  # all params stay gathered (bf16)
    assert rows["zero3"]["other"] == pytest.approx(4 * unit)


# The estimate leaves out small tensors (LayerNorm statistics, attention log-sum-exp, the mask) and
# counts the likelihood's temporaries approximately: within 15% of what autograd really saves.
ACTIVATION_RTOL = 0.15


def test_vae_activation_estimate_matches_saved_tensors():
    torch.manual_seed(0)
    cfg = load_config(
        None,
        [
            "model.d_model=48",
            "model.n_layers=3",
            "model.n_latent_tokens=8",
            "model.latent_dim=8",
            "model.mlp_ratio=2.0",
        ],
    )
    n_genes, n_tokens, batch_size = 300, 40, 16
    vae = SetVAE(cfg.model, n_genes)
    batch = SimpleNamespace(
        gene_ids=torch.randint(0, n_genes, (batch_size, n_tokens)),
        counts=torch.randint(1, 5, (batch_size, n_tokens)).float(),
        mask=torch.ones(batch_size, n_tokens, dtype=torch.bool),
        decode_gene_ids=torch.arange(n_genes),
        library_size=torch.full((batch_size,), 100.0),
        target=torch.randint(0, 5, (batch_size, n_genes)).float(),
    )
    measured = saved_tensor_bytes(vae, lambda: vae(batch)[0])
    estimate = batch_size * vae.activation_profile(n_tokens, n_genes, batch_size).bytes_per_cell(4, checkpointing=False)
    assert estimate == pytest.approx(measured, rel=ACTIVATION_RTOL)


def test_dit_activation_estimate_matches_saved_tensors():
    torch.manual_seed(0)
    overrides = ["stage=ldm", "train.vae_checkpoint=v.pt", "prior.d_model=64", "prior.n_layers=3"]
    cfg = load_config(None, [*overrides, "model.n_latent_tokens=16", "model.latent_dim=8"])
    dit = DiT(cfg.prior, 16, 8, {"cell_type": 5})
    prior = FlowMatchingPrior(dit, 0.2, "independent")
    batch = LatentBatch(torch.randn(16, 16, 8), {"cell_type": torch.randint(0, 5, (16,))})
    measured = saved_tensor_bytes(dit, lambda: prior(batch)[0])
    estimate = 16 * prior.activation_profile().bytes_per_cell(4, checkpointing=False)
    assert estimate == pytest.approx(measured, rel=ACTIVATION_RTOL)


def test_checkpointing_keeps_block_inputs_and_one_block():
    cfg = load_plan_config([QUICKSTART], ["stage=ldm", "prior.n_layers=6"])
    profile = build_prior(cfg).activation_profile()
    full, ckpt = profile.bytes_per_cell(2, False), profile.bytes_per_cell(2, True)
    block, block_input = profile.block_full[0], profile.block_input[0]
    assert full - ckpt == 2 * 5 * (block - block_input)  # five of six blocks keep only their input


def test_plan_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    preset = CONFIG_DIR / "model" / "vae_tiny.yaml"
    argv = ["plan", str(QUICKSTART), str(preset), "--n-genes", "500", "--world-size", "4", "model.n_layers=2"]
    assert main([*argv, "--json", str(out), "train.batch_size=32"]) == 0
    printed = capsys.readouterr().out
    for strategy in ("single*", "ddp", "fsdp", "zero1", "zero2", "zero3"):
        assert f"\n{strategy} " in printed
    plan = json.loads(out.read_text())
    cfg = load_plan_config([QUICKSTART, preset], ["model.n_layers=2"])
    assert plan["parameters"] == count_parameters(build_vae(cfg, 500))
    assert plan["tokens_per_cell"] == 50  # 10% of the genes
    assert plan["batch_size"] == 32  # an override after the options still applies
    assert [r["world_size"] for r in plan["memory_gib"]] == [1, 4, 4, 4, 4, 4]


def test_plan_cli_ldm_needs_no_vae_checkpoint_and_filters_strategies(tmp_path, capsys):
    out = tmp_path / "plan.json"
    preset = CONFIG_DIR / "model" / "prior_tiny.yaml"
    assert main(["plan", str(QUICKSTART), str(preset), "stage=ldm", "--strategy", "deepspeed", "--json", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["model"] == "DiT"
    assert [r["strategy"] for r in plan["memory_gib"]] == ["zero1", "zero2", "zero3"]


def test_plan_cli_errors_are_one_line(capsys):
    assert main(["plan", str(QUICKSTART), str(CONFIG_DIR / "model" / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err
    assert main(["plan", str(QUICKSTART), "--tokens-per-cell", "5000"]) == 2
    assert "--tokens-per-cell" in capsys.readouterr().err


def test_a_gene_subset_step_is_planned_on_the_genes_it_decodes():
    full = make_plan(load_plan_config([QUICKSTART], ["train.batch_size=4"]), world_size=1, n_genes=3000)
    subset = make_plan(
        load_plan_config([QUICKSTART], ["train.batch_size=4", "model.decode_genes=500"]), world_size=1, n_genes=3000
    )
    same = make_plan(
        load_plan_config([QUICKSTART], ["train.batch_size=4", "model.decode_genes=5000"]), world_size=1, n_genes=3000
    )
    flops = "flops_per_cell_forward"
    assert subset[flops] < full[flops] and same[flops] == full[flops]
    assert (subset["decoded_genes_per_step"], same["decoded_genes_per_step"]) == (500, 3000)
    assert subset["parameters"] == full["parameters"]  # the vocabulary is the same; only the step decodes less
