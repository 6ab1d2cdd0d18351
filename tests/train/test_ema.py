"""The EMA in `scldm-scale plan`: fp32, partitioned like the parameters (the 2-rank test of the partitioned
EMA itself is in test_distributed.py)."""

import pytest

from scldm_scale.config import CONFIG_DIR
from scldm_scale.plan import format_plan, load_plan_config, make_plan


def test_plan_counts_the_prior_ema_per_strategy_divided_where_the_params_are():
    cfg = load_plan_config([CONFIG_DIR / "quickstart.yaml"], ["stage=ldm", "train.precision=bf16"])
    plan = make_plan(cfg, world_size=4)
    rows = {r["strategy"]: r for r in plan["memory_gib"]}
    full = 4 * plan["parameters"] / 2**30  # fp32 bytes of the whole prior
    for name in ("single", "ddp", "zero1", "zero2"):
        assert rows[name]["ema"] == pytest.approx(full)
    for name in ("zero3", "fsdp"):
        assert rows[name]["ema"] == pytest.approx(full / 4)
    assert rows["zero3"]["total"] == pytest.approx(
        sum(rows["zero3"][k] for k in ("params", "grads", "optimizer", "ema", "other", "activations"))
    )
    assert "      ema " in format_plan(plan)  # its own column
    vae = make_plan(load_plan_config([CONFIG_DIR / "quickstart.yaml"], ["stage=vae"]), world_size=4)
    assert all(r["ema"] == 0 for r in vae["memory_gib"])  # the VAE stage trains without an EMA
