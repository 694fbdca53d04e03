"""DeepSpeed config generation and the one-source-of-truth rules."""

from __future__ import annotations

import json

import pytest

from trainer.batch import resolve_batch
from trainer.config import ConfigError, load_config
from trainer.deepspeed_config import accumulation_note, build_deepspeed_config


def cfg(*overrides):
    return load_config(None, list(overrides))


@pytest.mark.parametrize(
    "world, micro, glob, accum", [(2, 8, 64, 4), (1, 8, 64, 8), (4, 16, None, 1), (8, 2, 16, 1)]
)
def test_grad_accum_derived_from_global_batch(world, micro, glob, accum):
    c = cfg(
        f"train.micro_batch_size={micro}", f"train.global_batch_size={glob if glob else 'null'}"
    )
    plan = resolve_batch(c, world)
    assert plan.accum == accum and plan.global_batch == micro * accum * world


def test_non_dividing_batch_names_values_and_suggests():
    with pytest.raises(ConfigError) as e:
        resolve_batch(cfg("train.micro_batch_size=16", "train.global_batch_size=100"), 2)
    msg = str(e.value)
    assert "train.global_batch_size=100" in msg and "= 32" in msg and "96 or 128" in msg


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_generated_config(stage, precision):
    c = cfg(
        f"zero.stage={stage}",
        f"precision={precision}",
        "train.global_batch_size=64",
        "train.micro_batch_size=8",
        "train.max_grad_norm=0.5",
    )
    ds = build_deepspeed_config(c, resolve_batch(c, 2), on_gpu=False)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert (
        ds["fp16"]["enabled"] is (precision == "fp16") and ds["fp16"]["loss_scale"] == 0
    )  # dynamic
    assert "optimizer" not in ds  # CPU: torch AdamW client optimizer, no JIT build
    # GPU: torch's fused AdamW as the client optimizer, nothing to build (tests/test_ops.py)
    assert "optimizer" not in build_deepspeed_config(c, resolve_batch(c, 2), on_gpu=True)


def test_offload_flags():
    c = cfg("zero.stage=3", "zero.offload_optimizer=true", "zero.offload_params=true")
    z = build_deepspeed_config(c, resolve_batch(c, 1), on_gpu=False)["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"


def test_user_json_auto_values_filled_from_yaml(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": "auto", "overlap_comm": True},
                "comms_logger": {"enabled": False},
            }
        )
    )
    c = cfg(
        f"deepspeed_config={p}",
        "zero.stage=3",
        "train.global_batch_size=32",
        "train.micro_batch_size=4",
    )
    ds = build_deepspeed_config(c, resolve_batch(c, 2), on_gpu=False)
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["comms_logger"] == {"enabled": False}  # user extras kept


def test_user_json_conflict_names_both(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(
        json.dumps(
            {"zero_optimization": {"stage": 3}, "gradient_clipping": 2.0, "bf16": {"enabled": True}}
        )
    )
    c = cfg(f"deepspeed_config={p}", "zero.stage=2")
    with pytest.raises(ConfigError) as e:
        build_deepspeed_config(c, resolve_batch(c, 2), on_gpu=False)
    msg = str(e.value)
    assert len(e.value.problems) == 3
    assert "zero_optimization.stage=3 conflicts with YAML zero.stage=2" in msg
    assert "gradient_clipping=2.0 conflicts with YAML train.max_grad_norm=1.0" in msg
    assert "bf16.enabled=True conflicts with YAML precision='fp32'" in msg


def test_shipped_presets_merge(tmp_path):
    from conftest import ROOT

    for p in (ROOT / "configs" / "deepspeed").glob("*.json"):
        stage = json.loads(p.read_text())["zero_optimization"]["stage"]
        c = cfg(f"deepspeed_config={p}", f"zero.stage={stage if stage != 'auto' else 2}")
        build_deepspeed_config(c, resolve_batch(c, 2), on_gpu=False)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("accum", [1, 4])
def test_bf16_accumulates_gradients_in_fp32_where_deepspeed_allows(stage, precision, accum):
    """DeepSpeed 0.19 takes grad_accum_dtype fp32 with bf16 at ZeRO-2/3 (sharded fp32
    gradients) and refuses it at ZeRO-0 (NotImplementedError: unsupported mix); at ZeRO-1 it
    means BF16_Optimizer (fp32 gradients of the whole model on every rank), asked for only
    when there is something to accumulate. fp32 needs none, fp16 keeps DeepSpeed's."""
    c = cfg(
        f"zero.stage={stage}",
        f"precision={precision}",
        "train.micro_batch_size=8",
        f"train.global_batch_size={8 * 2 * accum}",
    )
    plan = resolve_batch(c, 2)
    assert plan.accum == accum
    ds = build_deepspeed_config(c, plan, on_gpu=False)
    if precision == "bf16" and (stage >= 2 or (stage == 1 and accum > 1)):
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    else:
        assert "data_types" not in ds
    note = accumulation_note(c, ds)
    if precision == "bf16" and stage == 1 and accum > 1:
        assert "+4 B/param, not sharded" in note and "gradient accumulation 4" in note
    else:
        assert note is None


def test_preflight_notes_the_zero1_bf16_accumulation_memory():
    from launcher.preflight import check

    sets = ["zero.stage=1", "precision=bf16", "train.micro_batch_size=8"]
    noted = check(None, [*sets, "train.global_batch_size=32"], nproc=2, check_data=False)
    assert noted.ok and any("BF16_Optimizer" in n for n in noted.notes), noted.notes
    quiet = check(None, [*sets, "train.global_batch_size=16"], nproc=2, check_data=False)
    assert quiet.ok and not any("BF16_Optimizer" in n for n in quiet.notes), quiet.notes


def test_user_json_may_choose_bf16_accumulation(tmp_path):
    """The fp32 accumulation costs fp32 gradients of the whole model per rank at ZeRO-1; a
    user JSON can trade that back for memory."""
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"data_types": {"grad_accum_dtype": "bf16"}}))
    c = cfg("zero.stage=1", "precision=bf16", f"deepspeed_config={user}")
    ds = build_deepspeed_config(c, resolve_batch(c, 2), on_gpu=False)
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"}
