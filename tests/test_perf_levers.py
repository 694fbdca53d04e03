"""Memory and scale levers (issue 9): activation checkpointing, a ZeRO-3 model built
partitioned under ``deepspeed.zero.Init``, and sequence packing for causal LM.

Real models (a tiny BERT, GPT-2 and Llama built from configs), real DeepSpeed engines on
two in-process gloo ranks (tests/multirank.py), the real training loop for the end-to-end
parts (training, checkpoints, export, exact resume)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from multirank import run_distributed

from conftest import TINY, read_jsonl

SFT = Path(__file__).resolve().parents[1] / "configs" / "sft-tiny.yaml"


@pytest.fixture(scope="module", autouse=True)
def imported_once():
    """What the ranks import, imported before they fork (as in test_loop.py)."""
    import datasets  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401

    if not torch.cuda.is_available():
        import deepspeed  # noqa: F401
        import deepspeed.runtime.zero.stage3  # noqa: F401
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
        import deepspeed.utils.zero_to_fp32  # noqa: F401

    import trainer.export  # noqa: F401
    import trainer.loop  # noqa: F401


def _config(path: Path, *sets: str):
    from trainer.config import load_config

    return load_config(path, list(sets))


def _word_tokenizer(cfg):
    from trainer import builtin_data
    from trainer.models import build_word_tokenizer
    from trainer.tasks import build_task

    words = builtin_data.vocabulary(cfg.data.train.removeprefix("builtin:"))
    return build_word_tokenizer(None, build_task(cfg), words=words)


def _tiny_bert(*sets: str):
    from trainer.models import build_model
    from trainer.tasks import LabelInfo, build_task

    cfg = _config(TINY, "model.dropout=0", *sets)
    task = build_task(cfg)
    tok = _word_tokenizer(cfg)
    model = build_model(cfg, task, tok, task.head_config(LabelInfo(2, None)))
    return model, tok


# ---- activation checkpointing ----------------------------------------------------------


def _forward_backward(model, batch) -> tuple[float, dict[str, torch.Tensor], int, int]:
    """(loss, grads, forward calls inside the first layer, bytes autograd saved for backward)."""
    calls = []
    inside = model.bert.encoder.layer[0].intermediate  # the layer's forward is what is checkpointed
    handle = inside.register_forward_hook(lambda *a: calls.append(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, len(calls), sum(saved)


def test_activation_checkpointing_recomputes_layers_with_the_same_losses_and_gradients():
    plain, tok = _tiny_bert()
    ckpt, _ = _tiny_bert("train.activation_checkpointing=true")
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    enc = tok(["the film was not good"] * 8 + ["a great and moving story"] * 8, padding=True)
    batch = {k: torch.tensor(v) for k, v in enc.items() if k != "token_type_ids"}
    batch["labels"] = torch.tensor([0] * 8 + [1] * 8)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (plain, ckpt)]
    losses = {"plain": [], "ckpt": []}
    for _ in range(3):
        figures = {}
        for name, model, opt in (("plain", plain, opts[0]), ("ckpt", ckpt, opts[1])):
            figures[name] = _forward_backward(model, batch)
            losses[name].append(figures[name][0])
            opt.step()
            opt.zero_grad()
        (_, g_plain, calls_plain, bytes_plain), (_, g_ckpt, calls_ckpt, bytes_ckpt) = (
            figures["plain"],
            figures["ckpt"],
        )
        # the checkpointed layer's insides run twice: forward, then again in the backward
        assert (calls_plain, calls_ckpt) == (1, 2)
        # ... and keeps only its inputs for the backward, not every activation inside it
        assert bytes_ckpt < 0.5 * bytes_plain, (bytes_ckpt, bytes_plain)
        assert max((g_plain[n] - g_ckpt[n]).abs().max().item() for n in g_plain) < 1e-5
    print(f"saved for backward: {bytes_plain} B plain, {bytes_ckpt} B checkpointed")
    assert losses["ckpt"] == pytest.approx(losses["plain"], abs=1e-6)
    assert losses["plain"][-1] < losses["plain"][0]  # it trains


def test_activation_checkpointing_refused_for_a_model_without_it():
    from trainer.config import ConfigError
    from trainer.models import enable_activation_checkpointing

    class NoCheckpointing(torch.nn.Module):
        supports_gradient_checkpointing = False
        config = type("C", (), {"model_type": "custom"})()

    with pytest.raises(ConfigError, match="train.activation_checkpointing=true.*'custom'"):
        enable_activation_checkpointing(NoCheckpointing())


# ---- ZeRO-3: built partitioned -----------------------------------------------------------


def _built_at_zero3() -> dict:
    import deepspeed
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from trainer.models import count_parameters

    model, _ = _tiny_bert("zero.stage=3")
    params = list(model.parameters())
    local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
    full = sum(p.ds_numel * p.ds_tensor.element_size() for p in params)
    placeholders = all(p.numel() == 0 for p in params)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        first = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {
        "local": local,
        "full": full,
        "placeholders": placeholders,
        "counted": count_parameters(model),
        "still_zero3": is_deepspeed_zero3_enabled(),
        "weights": first,
    }


def test_zero3_builds_the_model_partitioned_and_the_same_on_every_rank():
    plain, _ = _tiny_bert()
    ranks = run_distributed(_built_at_zero3, 2, timeout=180)
    numel = sum(p.numel() for p in plain.parameters())
    for r in ranks:
        assert r["placeholders"]  # nothing materialised beyond this rank's partition
        assert r["full"] == 4 * numel
        assert 0.45 < r["local"] / r["full"] < 0.55, r  # ~1/2 of the model per rank of 2
        assert r["counted"] == numel  # env.json / results.json count the whole model
        assert not r["still_zero3"]  # transformers' ZeRO-3 switch is off again after the build
    # rank 0's initial values, broadcast before partitioning: one model, not two halves of two
    assert ranks[0]["weights"].keys() == dict(plain.named_parameters()).keys()
    for name, w in ranks[0]["weights"].items():
        assert torch.equal(w, ranks[1]["weights"][name]), name
    # the fixed weights (the padding row of the embeddings) as a plain build has them
    pad = plain.config.pad_token_id
    emb = "bert.embeddings.word_embeddings.weight"
    assert not ranks[0]["weights"][emb][pad].any() and not plain.get_parameter(emb)[pad].any()


def _train(run_dir: str, cache: str, config: str, overrides: list[str], resume: str) -> int:
    from trainer.config import load_config
    from trainer.env import detect_env
    from trainer.loop import Trainer
    from trainer.process import quiet_libraries

    quiet_libraries()
    sets = [f"data.cache_dir={cache}", "logging.tensorboard=false", "logging.every_steps=1"]
    cfg = load_config(config, sets + overrides)
    env = detect_env(os.environ)
    return int(Trainer(cfg, env, torch.device("cpu"), Path(run_dir), resume).run())


def _run(tmp_path, name: str, config: Path, *overrides: str, resume: str = "auto"):
    d = tmp_path / name
    cache = str(tmp_path / "cache")
    args = (str(d), cache, str(config), list(overrides), resume)
    assert run_distributed(_train, 2, *args, timeout=300) == [0, 0]
    losses = {x["step"]: x["loss"] for x in read_jsonl(d / "metrics.jsonl") if x["kind"] == "train"}
    return d, json.loads((d / "results.json").read_text()), losses


def test_zero3_partitioned_build_with_checkpointing_trains_saves_and_exports(tmp_path):
    """ZeRO-3 (built partitioned) with and without activation checkpointing: the same losses
    to float noise, in sync, checkpoints at 4 and 8, ``final/`` exported whole."""
    from transformers import AutoModelForSequenceClassification

    common = ("zero.stage=3", "train.max_steps=8", "eval.every_steps=8", "checkpoint.every_steps=4")
    _, ref, ref_losses = _run(tmp_path, "plain", TINY, *common)
    d, r, losses = _run(tmp_path, "ckpt", TINY, *common, "train.activation_checkpointing=true")
    assert sorted(losses) == list(range(1, 9))
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    assert r["parameters"] == ref["parameters"] > 0 and r["params_in_sync"]
    assert r["validation"]["accuracy"] == pytest.approx(ref["validation"]["accuracy"], abs=0.01)
    assert sorted(p.name for p in (d / "checkpoints").glob("step_*")) == [
        "step_00000004",
        "step_00000008",
    ]
    exported = AutoModelForSequenceClassification.from_pretrained(d / "final")
    assert sum(p.numel() for p in exported.parameters()) == r["parameters"]


# ---- sequence packing ----------------------------------------------------------------------


def _echo_rows(cfg, tok, n: int) -> list[dict]:
    from trainer import builtin_data
    from trainer.tasks import build_task

    raw = builtin_data.GENERATORS["echo"](n, seed=3)
    enc = build_task(cfg).tokenize(raw, tok, None)
    return [{k: enc[k][i] for k in enc} for i in range(n)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_loss_equals_padded_loss_and_attention_stays_inside_each_sequence(arch):
    from trainer.models import build_model
    from trainer.tasks import IGNORE_INDEX, build_task

    cfg = _config(
        SFT, "data.packing=true", "model.dropout=0", f"model.name_or_path=builtin:tiny-{arch}"
    )
    task = build_task(cfg)
    tok = _word_tokenizer(cfg)
    model = build_model(cfg, task, tok, {})
    model.train()  # as in training (dropout 0): the cache must not switch the packed mask off
    rows = _echo_rows(cfg, tok, 12)
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) > 1  # padding would be needed
    padded = task.collate(tok.pad_token_id)(rows)
    packed = task.train_collate(tok.pad_token_id)(rows)
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    assert packed["input_ids"].shape == (1, sum(lengths))  # no padding at all
    starts = [sum(lengths[:i]) for i in range(len(rows))]
    assert [int(packed["position_ids"][0, s]) for s in starts] == [0] * len(rows)
    assert all(int(packed["labels"][0, s]) == IGNORE_INDEX for s in starts)
    with torch.no_grad():  # grad mode does not matter to the mask; no_grad keeps it quick
        loss_padded = float(model(**padded).loss)
        loss_packed = float(model(**packed).loss)
        # another first sequence leaves the second sequence's logits unchanged
        other = {k: v.clone() for k, v in packed.items()}
        other["input_ids"][0, : lengths[0]] = tok.pad_token_id
        a = model(**packed).logits[0, starts[1] : starts[2]]
        b = model(**other).logits[0, starts[1] : starts[2]]
    assert abs(loss_packed - loss_padded) < 1e-5, (loss_packed, loss_padded)
    assert torch.allclose(a, b, atol=1e-5)


def test_packing_is_refused_for_a_task_that_does_not_pack():
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.packing=true: task 'classification'"):
        load_config(TINY, ["data.packing=true"])


def test_packed_training_resumes_exactly_from_a_checkpoint(tmp_path):
    common = (
        "data.packing=true",
        "data.builtin_size=600",
        "train.max_steps=8",
        "eval.every_steps=8",
        "checkpoint.every_steps=4",
        "checkpoint.keep_last=null",
    )
    d, r, losses = _run(tmp_path, "whole", SFT, *common)
    assert losses[8] < losses[1]
    ckpt = d / "checkpoints" / "step_00000004"
    _, _, resumed = _run(tmp_path, "resumed", SFT, *common, resume=str(ckpt))
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in (5, 6, 7, 8)] == [losses[s] for s in (5, 6, 7, 8)]  # bitwise
