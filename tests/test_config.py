from __future__ import annotations

import pytest

from trainer.config import (
    ConfigError,
    builtin_config_path,
    field_help,
    load_config,
    parse_overrides,
)

from conftest import ROOT


def write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_precedence_cli_over_file_over_defaults(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1.0e-4\n  micro_batch_size: 4\n")
    cfg = load_config(p, ["train.lr=3e-5"])
    assert cfg.train.lr == pytest.approx(3e-5)  # CLI beats file
    assert cfg.train.micro_batch_size == 4  # file beats default
    assert cfg.train.seed == 42  # default


def test_all_problems_reported_together_with_key_and_value(tmp_path):
    p = write(
        tmp_path,
        "trian:\n  lr: 1\nzero:\n  stage: 5\nprecision: fp8\ntrain:\n  micro_batch_size: many\n",
    )
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert len(e.value.problems) == 4, msg
    assert "trian: unknown key" in msg
    assert "zero.stage=5" in msg
    assert "precision='fp8'" in msg
    assert "train.micro_batch_size='many'" in msg


def test_unknown_nested_key_and_override_typo():
    with pytest.raises(ConfigError, match=r"train.learning_rate: unknown key"):
        load_config(None, ["train.learning_rate=1e-3"])


def test_cross_field_rules():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["zero.stage=2", "zero.offload_params=true", "engine=ddp"])
    msg = str(e.value)
    assert "zero.offload_params=true needs zero.stage=3" in msg
    assert "engine=ddp cannot shard" in msg


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["train.lr"])
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=null"]) == {
        "a": {"b": 3, "c": [1, 2]},
        "d": None,
    }


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="mapping at the top"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_demo_config_is_the_embedded_default():
    assert (ROOT / "configs" / "demo.yaml").read_text() == builtin_config_path("demo").read_text()
    cfg = load_config(None)
    assert cfg.launch.nproc_per_node == 2 and cfg.model.name_or_path == "builtin:tiny-bert"


def test_every_shipped_config_validates():
    for p in (ROOT / "configs").glob("*.yaml"):
        load_config(p)


def test_field_help_documents_every_key():
    lines = field_help()
    keys = {line.split(" ")[0] for line in lines}
    for k in (
        "train.lr",
        "zero.stage",
        "eval.every_steps",
        "checkpoint.every_steps",
        "logging.every_steps",
        "data.max_length",
    ):
        assert k in keys
    assert all(": " in line for line in lines if line.startswith("train.lr"))


def test_config_hash_ignores_logging_but_not_lr():
    a = load_config(None)
    assert a.config_hash() == load_config(None, ["logging.every_steps=3"]).config_hash()
    assert a.config_hash() != load_config(None, ["train.lr=1e-5"]).config_hash()


def test_stop_at_needs_periodic_evaluations_and_a_reachable_value():
    cfg = load_config(None, ["eval.every_steps=5", "eval.stop_at=0.84"])
    assert cfg.eval.stop_at == pytest.approx(0.84)
    assert load_config(None, ["eval.every_steps=5", "eval.metric=loss", "eval.stop_at=0.3"])
    with pytest.raises(ConfigError) as e:
        load_config(None, ["eval.every_steps=null", "eval.stop_at=84"])
    assert e.value.problems == [
        "eval.stop_at=84 is checked at periodic evaluations: set eval.every_steps",
        "eval.stop_at=84 can never be reached: accuracy is a fraction in [0, 1] "
        "(eval.stop_at=0.84 for 84 %)",
    ]
    for bad, says in (("high", "eval.stop_at='high'"), (".nan", "eval.stop_at=nan")):
        with pytest.raises(ConfigError, match=f"^{says}"):
            load_config(None, ["eval.every_steps=5", f"eval.stop_at={bad}"])
    with pytest.raises(ConfigError, match="eval.stop_at=-0.1 can never be reached: loss is >= 0"):
        load_config(None, ["eval.every_steps=5", "eval.metric=loss", "eval.stop_at=-0.1"])
