"""Config: defaults, overrides, validation before any work."""

import pytest

from pmc_unlearn.config import dump_config, load_config
from pmc_unlearn.errors import UserError


def test_defaults_follow_authors_phi_settings():
    c = load_config()
    p = c.method_cfg
    assert (p.retain_weight, p.n_samples, p.temperature, p.top_p) == (1.5, 5, 1.25, 0.95)
    assert (c.train.batch_size, c.train.grad_accum, c.train.weight_decay, c.data.max_length) == (16, 4, 0.01, 200)


def test_overrides_and_yaml_roundtrip(tmp_path):
    c = load_config(overrides=["train.lr=3e-4", "pmc.n_samples=7", "data.system_prompt=null", "model.lora=true"])
    assert c.train.lr == 3e-4 and c.method_cfg.n_samples == 7 and c.model.lora is True
    dump_config(c, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.to_dict() == c.to_dict()


@pytest.mark.parametrize("bad, msg", [
    ("pmc.retain_weight=-1", "pmc.retain_weight.*>= 0"),
    ("pmc.n_samples=0", "pmc.n_samples.*>= 1"),
    ("pmc.top_p=0", "pmc.top_p.*> 0"),
    ("pmc.top_p=1.5", "pmc.top_p.*<= 1"),
    ("pmc.n_samples=2.5", "expected int"),
    ("train.bf16=maybe", "expected bool"),
    ("train.nosuch=1", "unknown config key train.nosuch"),
    ("nosuch.key=1", "unknown config section"),
    ("pmc.selection=best", "choose one of"),
    ("train.lr", "section.key=value"),
])
def test_bad_values_fail(bad, msg):
    with pytest.raises(UserError, match=msg):
        load_config(overrides=[bad])


def test_unknown_method_and_foreign_section():
    with pytest.raises(UserError, match="unknown method"):
        load_config(method="nosuch")
    with pytest.raises(UserError, match="is for method sft"):
        load_config(overrides=["sft.x=1"])
