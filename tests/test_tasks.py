"""Tasks as objects: the registry, metric names checked by the config, per-split reports,
and models loaded with fp32 master weights whatever dtype they were stored in."""

from __future__ import annotations

import typing

import pytest
import torch

from trainer.config import ConfigError, RunConfig, load_config
from trainer.models import build_model, build_word_tokenizer
from trainer.tasks import TASKS, ClassificationEvaluation, LabelInfo, LMEvaluation, build_task


def test_every_config_task_has_a_class_and_back():
    assert set(typing.get_args(RunConfig.model_fields["task"].annotation)) == set(TASKS)


@pytest.mark.parametrize(
    "task, metric, produced",
    [
        ("classification", "perplexity", "['accuracy', 'macro_f1', 'loss']"),
        ("causal_lm", "accuracy", "['loss', 'perplexity']"),
        (
            "token_classification",
            "accuracy",
            "['f1', 'precision', 'recall', 'token_accuracy', 'loss']",
        ),
    ],
)
def test_eval_metric_the_task_does_not_produce_is_a_config_error(task, metric, produced):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"task={task}", f"eval.metric={metric}"])
    msg = str(e.value)
    assert f"eval.metric={metric!r} is not produced by task {task!r}" in msg and produced in msg


@pytest.mark.parametrize(
    "task, metric, mode",
    [
        ("classification", None, "max"),
        ("classification", "loss", "min"),
        ("classification", "macro_f1", "max"),
        ("causal_lm", None, "min"),
        ("causal_lm", "perplexity", "min"),
        ("token_classification", None, "max"),
        ("token_classification", "token_accuracy", "max"),
        ("token_classification", "loss", "min"),
    ],
)
def test_default_metric_and_direction_come_from_the_task(task, metric, mode):
    sets = [f"task={task}"] + ([f"eval.metric={metric}"] if metric else [])
    cfg = load_config(None, sets)
    assert cfg.eval_metric() == (metric or TASKS[task].default_metric, mode)


def test_classification_evaluation_counts_only_valid_rows():
    acc = ClassificationEvaluation(torch.device("cpu"), LabelInfo(2, None))
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    acc.update(logits, {"labels": torch.tensor([0, 0, 1])}, torch.tensor([True, True, False]))
    r = acc.compute()
    assert r.metrics["num_samples"] == 2 and r.metrics["accuracy"] == 0.5
    assert r.report["per_class"]["0"]["support"] == 2 and r.report["per_class"]["1"]["support"] == 0
    expected = (
        torch.nn.functional.cross_entropy(logits[:2], torch.tensor([0, 0]), reduction="sum") / 2
    )
    assert r.metrics["loss"] == pytest.approx(float(expected))


def test_lm_evaluation_sums_tokens_on_the_device_and_skips_placeholders():
    acc = LMEvaluation(torch.device("cpu"))
    logits = torch.zeros(2, 4, 5)  # uniform over 5 tokens: loss log(5) per predicted token
    labels = torch.tensor([[1, 2, -100, -100], [1, 2, 3, 4]])
    acc.update(logits, {"labels": labels}, torch.tensor([True, False]))
    r = acc.compute().metrics
    assert r["num_tokens"] == 1 and r["loss"] == pytest.approx(float(torch.log(torch.tensor(5.0))))


def test_model_stored_in_bf16_loads_fp32_master_weights(tmp_path):
    """transformers 5 keeps a checkpoint's stored dtype by default: without an explicit
    dtype a bf16-stored model would train bf16 weights under precision: fp32."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = load_config(None, [f"model.name_or_path={tmp_path}"])
    task = build_task(cfg)
    tok = build_word_tokenizer(["a b c"], task)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
        )
    ).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert next(type(model).from_pretrained(tmp_path).parameters()).dtype == torch.bfloat16
    built = build_model(cfg, task, tok, task.head_config(LabelInfo(2, None)))
    assert {p.dtype for p in built.parameters()} == {torch.float32}
