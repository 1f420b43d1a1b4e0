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


def test_registry_is_passed_not_registered_by_import():
    """load_config takes the method sections it is given; the package's registry is a literal in methods/."""
    from dataclasses import dataclass

    from pmc_unlearn.methods import METHOD_CONFIGS, METHODS, REGISTRY
    from pmc_unlearn.sections import opt

    @dataclass
    class MineConfig:
        alpha: float = opt(1.0, "a knob", gt=0.0)

    c = load_config(method="mine", overrides=["mine.alpha=2"], registry={"mine": MineConfig})
    assert c.method_cfg.alpha == 2.0 and c.to_dict()["mine"] == {"alpha": 2.0}
    with pytest.raises(UserError, match="unknown method; choose one of mine"):
        load_config(method="pmc", registry={"mine": MineConfig})
    assert set(REGISTRY) == set(METHODS) == set(METHOD_CONFIGS) and {"pmc", "sft", "npo", "scrub"} <= set(REGISTRY)
    assert all(METHODS[n] is cls and METHOD_CONFIGS[n] is cfg for n, (cls, cfg) in REGISTRY.items())


def test_config_module_does_not_import_the_methods():
    import subprocess
    import sys

    code = "import sys, pmc_unlearn.config; print(any(m.startswith('pmc_unlearn.methods') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_finetune_data_has_its_own_key(tmp_path, caplog):
    c = load_config(method="sft", overrides=["sft.data=tofu:full"])
    assert c.primary_data == "tofu:full" and c.to_dict()["sft"] == {"data": "tofu:full"}
    assert load_config(method="pmc", overrides=["data.forget=tofu:forget05"]).primary_data == "tofu:forget05"
    # a config written before sft.data existed (a run folder's config.yaml): data.forget is read as sft.data
    old = tmp_path / "config.yaml"
    old.write_text("method: sft\ndata: {forget: tofu:retain90, max_length: 120}\nsft: {}\n")
    with caplog.at_level("WARNING"):
        c = load_config(old)
    assert c.primary_data == "tofu:retain90" and c.data.max_length == 120 and c.data.forget == "tofu:forget01"
    assert "deprecated" in caplog.text and "sft.data" in caplog.text
    # both given: the new key wins, data.forget is left alone
    c = load_config(old, ["sft.data=tofu:full"])
    assert c.primary_data == "tofu:full"


def test_overrides_yaml_and_merge_helpers(tmp_path):
    from pmc_unlearn.sections import deep_merge, load_yaml, parse_override, parse_overrides

    assert parse_overrides(["train.lr=1e-5", "pmc.n_samples=3"]) == {"train": {"lr": "1e-5"}, "pmc": {"n_samples": "3"}}
    assert parse_override("unlearn.npo=null", parse_value=True) == ("unlearn.npo", None)
    assert parse_override("benchmark=tofu", parse_value=True, sectioned=False) == ("benchmark", "tofu")
    with pytest.raises(UserError, match="section.key=value"):
        parse_override("benchmark=tofu")
    a = {"train": {"lr": 1, "epochs": 2}, "x": 1}
    assert deep_merge(a, {"train": {"lr": 3}, "y": {"z": 1}}) == {"train": {"lr": 3, "epochs": 2}, "x": 1, "y": {"z": 1}}
    assert a == {"train": {"lr": 1, "epochs": 2}, "x": 1}
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="--profile .*list.yaml: expected a mapping"):
        load_yaml(tmp_path / "list.yaml", "--profile")
    with pytest.raises(UserError, match="--config .*nope.yaml: file not found"):
        load_yaml(tmp_path / "nope.yaml")
