"""Throughput, FLOPs, MFU and cost (issue 8, lines 1, 2 and 5).

The accounting on in-process gloo ranks with hand-fed step times (slowest rank, whole window,
warm-up excluded), the FLOPs formula against a hand count and the built model's parameters,
and the training loop itself at 1 and 2 ranks with and without gradient accumulation at the
same global batch: tokens and samples per step, FLOPs per token and the identities between
the logged figures must not change.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from multirank import run_distributed

from trainer.distributed import get_rank
from trainer.flops import attention_seq_len, count_params, flops_per_token, non_embedding_params
from trainer.hardware import match_device, peak_tflops, price_per_device_hour
from trainer.throughput import Throughput

from conftest import TINY, read_jsonl

CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------


def _configs():
    from transformers import BertConfig, GPT2Config, LlamaConfig

    bert = BertConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64,
    )  # fmt: skip
    gpt2 = GPT2Config(vocab_size=1000, n_embd=128, n_layer=2, n_head=4, n_positions=64)
    llama = LlamaConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=344, max_position_embeddings=64,
    )  # fmt: skip
    return bert, gpt2, llama


def test_flops_per_token_by_hand():
    bert, gpt2, llama = _configs()
    # BERT layer: Q,K,V,O 4·(128·128 + 128) = 66,048; MLP 2·128·256 + 256 + 128 = 65,920;
    # two LayerNorms 4·128 = 512 → 132,480 per layer, 264,960 for 2
    assert non_embedding_params(bert) == 264_960
    # 6·N + 12·L·h·s at s = 32: 6·264,960 + 12·2·128·32 = 1,589,760 + 98,304
    assert flops_per_token(bert, 32) == 1_589_760 + 98_304
    # GPT-2 (MLP 4h = 512): layer 4·(128² + 128) + 2·128·512 + 512 + 128 + 512 = 198,272;
    # its LM head 6·h·V = 6·128·1000 = 768,000 is counted; s = 10
    assert non_embedding_params(gpt2) == 2 * 198_272
    assert flops_per_token(gpt2, 10) == 6 * 2 * 198_272 + 12 * 2 * 128 * 10 + 768_000
    # Llama, grouped-query (2 of 4 heads for K, V; head dim 32): q, o 2·128² + k, v 2·128·64
    # + gated MLP 3·128·344 + two RMSNorms 2·128 = 181,504 per layer
    assert non_embedding_params(llama) == 2 * 181_504
    # PEFT: frozen weights get no weight gradients, (4 + 2f)·N
    assert flops_per_token(bert, 32, trainable_fraction=0.0, lm_head=False) == 4 * 264_960 + 98_304


def test_parameter_count_matches_the_built_models():
    from transformers import AutoModel

    for config in _configs():
        built = sum(p.numel() for p in AutoModel.from_config(config).parameters())
        assert count_params(config) == built, config.model_type


def test_attention_length_is_the_token_weighted_mean():
    # sequences of 10 and 30 tokens: the 30 attend over 30 each, the 10 over 10 each
    assert attention_seq_len([10, 30]) == (100 + 900) / 40
    bert = _configs()[0]
    exact = 10 * flops_per_token(bert, 10) + 30 * flops_per_token(bert, 30)
    assert math.isclose(40 * flops_per_token(bert, attention_seq_len([10, 30])), exact)


def test_peak_and_price_tables_and_overrides():
    assert match_device("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert match_device("NVIDIA H100 PCIe") == "H100 PCIe"
    assert match_device("NVIDIA A100-SXM4-40GB") == "A100 40GB"
    assert match_device("NVIDIA A100-SXM4-80GB") == "A100 80GB"
    assert match_device("NVIDIA H200") == "H200"
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == (989.4, "table: H100 SXM")
    assert peak_tflops("NVIDIA A10G", "bf16", override=100.0) == (100.0, "config")
    value, source = peak_tflops("Tesla V100-SXM2-16GB", "bf16")
    assert value is None and "no bf16" in source
    assert price_per_device_hour("NVIDIA H100 80GB HBM3")[0] > 0
    assert price_per_device_hour("cpu", cores=2)[0] == 2 * price_per_device_hour("cpu", cores=1)[0]


def test_cpu_probe_is_measured_once_and_cached(tmp_path, monkeypatch):
    from trainer import hardware

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    value, source = peak_tflops("cpu", "fp32")
    assert value > 0 and source == "measured: cpu matmul probe"
    cached = json.loads(hardware.cache_file().read_text())
    (key,) = cached
    assert f"threads={torch.get_num_threads()}|fp32" in key
    cached[key] = 123.0  # the second call reads the file, it does not measure again
    hardware.cache_file().write_text(json.dumps(cached))
    assert peak_tflops("cpu", "fp32") == (123.0, "measured: cpu matmul probe")


# --------------------------------------------------------------------------------------
# The accounting, fed by hand on two ranks
# --------------------------------------------------------------------------------------


def _batch(lengths: list[int]) -> dict[str, torch.Tensor]:
    width = max(lengths) + 3  # padding the counts must leave out
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"attention_mask": mask}


def _account() -> dict:
    rank = get_rank()
    tp = Throughput(warmup=1, world=2, flops_per_token=lambda s: 1000.0 + s, peak=1e-6)
    # three steps of two micro-batches; rank 1 is the slow one, and its steps differ
    seconds = {0: [5.0, 1.0, 1.0], 1: [5.0, 2.0, 4.0]}[rank]
    windows = []
    for i, dt in enumerate(seconds):
        tp.step(dt, [_batch([4, 6]), _batch([10])], log=i >= 1)
        if i >= 1:
            windows.append(tp.window(CPU))
    return {"windows": windows, "summary": tp.summary(CPU)}


def test_window_and_summary_use_the_slowest_rank_and_the_whole_window():
    out = run_distributed(_account, 2)
    assert out[0] == out[1]  # every rank logs the same figures
    w1, w2 = out[0]["windows"]
    # window 1 = steps 1 and 2: rank 1's 5 + 2 s (not rank 0's, not the mean, not the last)
    assert w1["step_time_s"] == pytest.approx(3.5)
    # 2 ranks × 3 sequences × (4 + 6 + 10) tokens per step; padding not counted
    assert w1["tokens_per_step"] == 40 and w1["samples_per_step"] == 6
    assert w1["tokens_per_s"] == pytest.approx(80 / 7.0)
    assert w1["samples_per_s"] == pytest.approx(12 / 7.0)
    # attention length Σs²/Σs = (16 + 36 + 100) / 20; FLOPs per token from it
    assert w1["attention_seq_len"] == pytest.approx(152 / 20)
    assert w1["flops_per_token"] == pytest.approx(1000 + 152 / 20)
    assert w1["tflops_per_device"] == pytest.approx(w1["flops_per_token"] * 80 / 7.0 / 2 / 1e12)
    assert w1["mfu"] == pytest.approx(w1["tflops_per_device"] / 1e-6)
    assert w2["step_time_s"] == pytest.approx(4.0)  # the last window is step 3 alone
    s = out[0]["summary"]
    # the summary leaves step 1 out (warm-up) and takes rank 1's steps 2-3: (2 + 4) / 2
    assert s["steps_timed"] == 2 and s["warmup_steps_excluded"] == 1
    assert s["step_time_s"] == pytest.approx(3.0)
    assert s["tokens_per_s"] == pytest.approx(80 / 6.0)
    # the phase split is measured (the data phase was never timed here: zero)
    assert s["data_time_s"] == 0.0


# --------------------------------------------------------------------------------------
# The loop: invariance to accumulation and world size
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imported_once():
    import datasets  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401

    if not torch.cuda.is_available():
        import deepspeed  # noqa: F401
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401

    import trainer.loop  # noqa: F401


def _train(run_dir: str, cache: str, overrides: list[str]) -> int:
    from trainer.config import load_config
    from trainer.env import detect_env
    from trainer.loop import Trainer
    from trainer.process import quiet_libraries

    quiet_libraries()
    sets = [
        f"data.cache_dir={cache}",
        "train.max_steps=6",
        "train.global_batch_size=64",
        "eval.every_steps=100",
        "checkpoint.every_steps=100",
        "checkpoint.export_final=false",
        "data.max_eval_samples=32",
        "logging.every_steps=2",
        "logging.warmup_steps_excluded=1",
        "scaling.peak_tflops_per_device=0.05",
        "scaling.price_per_device_hour=3.6",
        "scaling.target_tokens=1000000",
        *overrides,
    ]
    cfg = load_config(TINY, sets)
    env = detect_env(os.environ)
    return int(Trainer(cfg, env, CPU, Path(run_dir), "never").run())


VARIANTS = {  # name: (ranks, micro batch, ZeRO stage) at global batch 64
    "1rank-accum4": (1, 16, 2),
    "1rank-accum1": (1, 64, 2),
    "2ranks-accum2": (2, 16, 2),
    "2ranks-accum1": (2, 32, 2),
    "2ranks-zero3": (2, 16, 3),  # built partitioned (zero.Init): the prediction still holds
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, imported_once) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("throughput")
    out = {}
    for name, (ranks, micro, stage) in VARIANTS.items():
        d = root / name
        sets = [f"train.micro_batch_size={micro}", f"zero.stage={stage}"]
        if name == "2ranks-accum2":
            sets.append("logging.tensorboard=true")  # read back below
        else:
            sets.append("logging.tensorboard=false")
        codes = run_distributed(_train, ranks, str(d), str(root / "cache"), sets, timeout=300)
        assert set(codes) == {0}
        out[name] = d
    return out


def _train_records(d: Path) -> list[dict]:
    return [r for r in read_jsonl(d / "metrics.jsonl") if r["kind"] == "train"]


def test_tokens_and_flops_per_step_do_not_change_with_accumulation_or_world_size(runs):
    per_run = {name: _train_records(d) for name, d in runs.items()}
    reference = per_run["1rank-accum4"]
    assert [r["step"] for r in reference] == [2, 4, 6]
    for name, recs in per_run.items():
        assert [r["step"] for r in recs] == [2, 4, 6], name
        for r, ref in zip(recs, reference):
            # the same 64 samples per step and the same non-padding tokens, summed over ranks
            # and micro-batches, whatever the split
            assert r["samples_per_step"] == 64, name
            assert r["tokens_per_step"] == ref["tokens_per_step"], name
            assert r["flops_per_token"] == pytest.approx(ref["flops_per_token"], rel=1e-12), name


def test_logged_figures_follow_their_definitions(runs):
    for name, d in runs.items():
        ranks = VARIANTS[name][0]
        for r in _train_records(d):
            t = r["step_time_s"]
            assert r["samples_per_s"] * t == pytest.approx(64), name
            assert r["tokens_per_s"] * t == pytest.approx(r["tokens_per_step"]), name
            flops = r["flops_per_token"] * r["tokens_per_s"] / ranks / 1e12
            assert r["tflops_per_device"] == pytest.approx(flops), name
            assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.05), name
            phases = sum(r[f"{p}_time_s"] for p in ("data", "forward", "backward", "optimizer"))
            assert 0 < phases <= t * 1.0001, name  # the split fits in the step


def test_results_summarise_throughput_memory_and_cost(runs):
    for name, d in runs.items():
        ranks = VARIANTS[name][0]
        r = json.loads((d / "results.json").read_text())
        tp = r["throughput"]
        assert tp["steps_timed"] == 5 and tp["warmup_steps_excluded"] == 1  # 6 steps, 1 left out
        assert tp["peak_tflops"] == 0.05 and tp["peak_source"] == "config"
        assert tp["mfu"] == pytest.approx(tp["tflops_per_device"] / 0.05)
        assert tp["tokens_per_s"] * tp["step_time_s"] == pytest.approx(tp["tokens_per_step"])
        mem = r["memory"]
        assert len(mem["peak_memory_bytes_per_rank"]) == ranks
        assert mem["peak_memory_bytes"] == max(mem["peak_memory_bytes_per_rank"])
        assert mem["host_peak_rss_gb_train"]  # the keys that were there stay
        err = mem["model_states_bytes_predicted"] / mem["model_states_bytes_measured"] - 1
        assert abs(err) < 0.10, (name, err)
        cost = r["cost"]
        assert cost["price_per_device_hour"] == 3.6 and cost["price_source"] == "config"
        assert cost["device_hours"] == pytest.approx(ranks * r["wall_time_s"] / 3600)
        # $3.6 per device-hour = $0.001 per device-second
        assert cost["cost_per_1m_tokens"] == pytest.approx(ranks * 0.001 * 1e6 / tp["tokens_per_s"])
        assert cost["configured_run_hours"] == pytest.approx(6 * tp["step_time_s"] / 3600)
        assert cost["target_tokens_cost"] == pytest.approx(ranks * 0.001 * 1e6 / tp["tokens_per_s"])


def test_tensorboard_has_mfu_and_memory(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["2ranks-accum2"] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/tflops_per_device", "train/mfu", "train/tokens_per_s", "train/step_time_s",
                "memory/model_states_bytes_measured", "memory/model_states_bytes_predicted",
                "memory/peak_memory_bytes"):  # fmt: skip
        assert tag in tags, tag
    mfu = [e.value for e in acc.Scalars("train/mfu")]
    jsonl = [r["mfu"] for r in _train_records(runs["2ranks-accum2"])]
    assert mfu == pytest.approx(jsonl, rel=1e-6)


def test_scaling_overrides_are_checked_with_the_config():
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(TINY, ["scaling.peak_tflops_per_device=0", "scaling.price_per_device_hour=x"])
    assert "scaling.peak_tflops_per_device=0" in str(e.value)
    assert "scaling.price_per_device_hour='x'" in str(e.value)


def test_packed_rows_count_each_sequence():
    """``data.packing``: one row, no mask; sequences of 3, 2 and 4 tokens where the position
    ids restart at 0 — three samples, nine tokens, attention over each sequence alone."""
    from trainer.throughput import batch_counts

    packed = {
        "input_ids": torch.ones(1, 9),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]),
    }
    assert batch_counts(packed) == (3, 9, 9 + 4 + 16)
    assert batch_counts(_batch([4, 6])) == (2, 10, 16 + 36)  # padding left out
