"""Config loading: defaults, overrides, closed schema, type and choice errors; CLI flags as views of the
schema's fields; the CLI's exit code."""

import argparse
from dataclasses import asdict, dataclass

import pytest

from scldm_scale.cli import build_parser, main
from scldm_scale.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    EvalConfig,
    SampleConfig,
    add_option,
    from_flags,
    load_config,
    option,
    parse_ints,
    parse_pairs,
    stage_optim,
    to_dict,
)

QUICKSTART = CONFIG_DIR / "quickstart.yaml"


def test_defaults_validate_and_equal_the_schema():
    cfg = load_config()
    assert asdict(cfg) == asdict(Config())
    assert cfg.stage == "vae"
    assert cfg.model.n_layers == 2
    assert cfg.data.condition_keys == ["bulk_labels"]


def test_dot_list_overrides_apply():
    cfg = load_config(None, ["model.n_layers=4", "train.max_steps=200", "data.condition_keys=[a,b]"])
    assert cfg.model.n_layers == 4
    assert cfg.train.max_steps == 200
    assert cfg.data.condition_keys == ["a", "b"]
    # train.max_steps overrides the per-stage step count and leaves the rest of the stage's optimiser.
    assert stage_optim(cfg, "vae").max_steps == 200
    assert stage_optim(cfg, "ldm").max_steps == 200
    assert stage_optim(cfg, "ldm").lr == cfg.optim.ldm.lr == 5e-4


def test_overrides_win_over_the_yaml_file():
    cfg = load_config(QUICKSTART, ["model.d_model=64", "optim.vae.max_steps=7"])
    assert cfg.model.d_model == 64
    assert cfg.optim.vae.max_steps == 7
    assert cfg.model.n_latent_tokens == 8  # untouched YAML value


@pytest.mark.parametrize("override", ["model.n_layer=4", "train.max_step=5", "optim.vae.learning_rate=1e-3"])
def test_misspelled_key_is_an_error_naming_it(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match="unknown config key") as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_misspelled_top_level_section_is_named():
    with pytest.raises(ConfigError, match="'modle'"):
        load_config(None, ["modle.n_layers=3"])


def test_misspelled_key_in_a_yaml_file_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_layerz: 3\n")
    with pytest.raises(ConfigError, match=r"model\.n_layerz"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.n_layers=abc", "model.n_layers"),
        ("optim.vae.lr=fast", "optim.vae.lr"),
        ("train.progress=maybe", "train.progress"),
    ],
)
def test_wrong_type_is_an_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match="wrong type") as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_wrong_type_message_says_it_is_a_type_error():
    with pytest.raises(ConfigError, match=r"wrong type for config key 'model\.n_layers'"):
        load_config(None, ["model.n_layers=abc"])


@pytest.mark.parametrize(
    ("override", "key", "choices"),
    [
        ("stage=foo", "stage", "vae, ldm"),
        ("model.latent_mode=x", "model.latent_mode", "layernorm, gaussian"),
        ("model.input_embedding=sum", "model.input_embedding", "scale, concat"),
        ("prior.cond_dropout=always", "prior.cond_dropout", "independent, one_at_a_time, joint"),
        ("sample.method=rk4", "sample.method", "euler, heun, dopri5"),
        ("sample.library_size=sampled", "sample.library_size", "auto, latent, condition"),
    ],
)
def test_invalid_choice_lists_the_valid_ones(override, key, choices):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)
    assert choices in str(err.value)


def test_d_model_not_divisible_by_heads():
    with pytest.raises(ConfigError, match=r"model\.d_model=30 must be divisible by model\.n_heads=4"):
        load_config(None, ["model.d_model=30"])
    with pytest.raises(ConfigError, match=r"model\.n_cross_heads"):
        load_config(None, ["model.d_model=32", "model.n_heads=4", "model.n_cross_heads=3"])
    with pytest.raises(ConfigError, match=r"prior\.d_model"):
        load_config(None, ["prior.d_model=30"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.test_fraction=1.0", "data.test_fraction"),
        ("prior.cond_drop_prob=1.5", "prior.cond_drop_prob"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.balance_conditions=1.5", "train.balance_conditions"),
        ("train.balance_conditions=-0.5", "train.balance_conditions"),
        ("train.max_steps=0", "train.max_steps"),
        ("optim.vae.betas=[0.9]", "optim.vae.betas"),
        ("sample.n_steps=0", "sample.n_steps"),
        ("sample.sde_noise=-0.5", "sample.sde_noise"),
    ],
)
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_ldm_stage_needs_a_vae_checkpoint():
    with pytest.raises(ConfigError, match=r"train\.vae_checkpoint"):
        load_config(None, ["stage=ldm"])
    cfg = load_config(None, ["stage=ldm", "train.vae_checkpoint=runs/x/vae.pt"])
    assert cfg.train.vae_checkpoint == "runs/x/vae.pt"


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.n_layers"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_quickstart_yaml_loads_with_its_values():
    cfg = load_config(QUICKSTART)
    assert cfg.model.d_model == 32
    assert cfg.model.mlp_ratio == 2.0
    assert cfg.prior.d_model == 128
    assert cfg.optim.vae.max_steps == 600
    assert cfg.optim.ldm.max_steps == 1500
    assert cfg.optim.ldm.schedule == "cosine"
    assert cfg.train.ckpt_dir == "runs/quickstart"
    assert cfg.data.builtin == "pbmc68k_reduced"


def test_to_dict_is_plain_and_reloads_to_the_same_config():
    cfg = load_config(QUICKSTART, ["model.n_layers=3"])
    data = to_dict(cfg)
    assert data["model"]["n_layers"] == 3
    assert isinstance(data["data"]["condition_keys"], list)
    dotted = [f"{s}.{k}={v}" for s in ("model", "prior", "train") for k, v in data[s].items() if v is not None]
    assert asdict(load_config(None, dotted))["model"] == asdict(cfg)["model"]


def test_cli_misspelled_override_exits_2_with_one_line(capsys):
    code = main(["train", str(QUICKSTART), "model.n_layer=4"])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "model.n_layer" in lines[0]
    assert lines[0].startswith("scldm-scale train: error:")
    assert "Traceback" not in captured.err


def test_cli_wrong_type_exits_2(capsys):
    assert main(["train", str(QUICKSTART), "model.n_layers=abc"]) == 2
    assert "model.n_layers" in capsys.readouterr().err


@dataclass
class _Section:
    rate: float = option(0.5, "a rate")
    mode: str = option("a", "a mode", choices=("a", "b"))
    name: str | None = option(None, "a name")
    verbose: bool = option(False, "talk")
    plots: bool = option(True, "draw")
    keys: list[str] = option(["x", "y"], "keys")
    tags: list[str] = option([], "a tag")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    for name in ("rate", "mode", "name", "verbose", "keys"):
        add_option(parser, _Section, name)
    add_option(parser, _Section, "plots", "--no-plots")
    add_option(parser, _Section, "tags", "--tag", action="append")
    return parser


def test_flags_are_views_of_fields():
    parser = _parser()
    assert from_flags(_Section, parser.parse_args([])) == _Section()
    argv = ["--rate", "2", "--mode", "b", "--name", "n", "--verbose", "--no-plots", "--keys", "p,q,", "--tag", "t"]
    assert from_flags(_Section, parser.parse_args(argv)) == _Section(2.0, "b", "n", True, False, ["p", "q"], ["t"])
    assert from_flags(_Section, parser.parse_args([]), rate=3.0).rate == 3.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])  # the field's choices


def test_choices_come_from_the_schema_metadata():
    with pytest.raises(ConfigError, match=r"sample\.method='rk4' is not one of euler, heun, dopri5"):
        load_config(None, ["sample.method=rk4"])


def test_generate_flags_default_to_the_sample_section():
    args = build_parser("generate").parse_args(["generate", "model", "--n-cells", "3", "--out", "x.h5ad"])
    assert from_flags(SampleConfig, args) == SampleConfig()
    assert args.seed == Config().seed
    args = build_parser("evaluate").parse_args(["evaluate", "--real", "r", "--generated", "g", "--out", "o"])
    assert from_flags(EvalConfig, args) == EvalConfig()


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["generate"], ["(default: heun)", "(default: 50)"]),
        (["evaluate"], ["(default: real_train_cells,independent_nb,additive_shift)", "(default: 2000)"]),
        (["embed"], ["(default: 256)"]),
        (["bench", "kernels"], ["(default: bf16)"]),
    ],
)
def test_help_shows_the_defaults(capsys, command, shown):
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in shown:
        assert default in text


def test_command_line_values_are_parsed_with_errors_naming_the_flag():
    assert parse_pairs(["a=1", "b=x"], "--condition") == {"a": "1", "b": "x"}
    assert parse_pairs(["a=1.5"], "--cfg", float) == {"a": 1.5}
    with pytest.raises(ConfigError, match="--cfg 'a=x': 'x' is not a number"):
        parse_pairs(["a=x"], "--cfg", float)
    with pytest.raises(ConfigError, match="--condition expects KEY=VALUE"):
        parse_pairs(["a"], "--condition")
    assert parse_ints("2048,8192,", "--genes") == [2048, 8192]
    with pytest.raises(ConfigError, match="--genes expects comma-separated integers"):
        parse_ints("2k", "--genes")


def test_a_key_given_twice_to_a_repeatable_flag_is_refused():
    assert parse_pairs(["cell_type=A", "tissue=lung"], "--condition") == {"cell_type": "A", "tissue": "lung"}
    with pytest.raises(ConfigError, match="--condition gives 'cell_type' twice"):
        parse_pairs(["cell_type=A", "cell_type=B"], "--condition")
