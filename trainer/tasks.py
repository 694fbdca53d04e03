"""One object per task: what it reads, how it tokenises and pads, what the model's head is,
how evaluation accumulates and what it reports.

Adding a task is adding a class here and its name to ``TASKS`` (and to ``RunConfig.task``);
the loop, the data pipeline and the config never branch on the task's name.

Evaluation follows ``update`` / ``compute``: ``update`` runs per batch on the device and
keeps only small per-row figures there (predictions, per-row loss sums); ``compute`` reduces
them over ranks once and returns the metrics plus an optional per-split report. Rows marked
invalid (the placeholders that keep ZeRO-3 ranks in lock step) are never counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .config import ConfigError, DataConfig, RunConfig
from .distributed import all_gather_object, all_reduce_sum

IGNORE_INDEX = -100


@dataclass
class LabelInfo:
    num_labels: int
    names: list[str] | None  # string labels mapped to ids in sorted order


@dataclass
class EvalResult:
    metrics: dict[str, float]  # scalars: logged, compared, written to results.json
    report: dict[str, Any] | None = (
        None  # per-split detail (per-class figures), if the task has one
    )


class Task:
    """The interface every task implements (and a few shared defaults)."""

    name: ClassVar[str]
    auto_model: ClassVar[str]  # the transformers Auto class of the head
    metrics: ClassVar[tuple[str, ...]]  # what evaluation produces (eval.metric must be one)
    default_metric: ClassVar[str]
    maximize: ClassVar[frozenset[str]] = frozenset()  # metrics where larger is better
    cls_sep_template: ClassVar[bool] = False  # builtin word tokenizer: [CLS] a [SEP] b [SEP]
    eos_token: ClassVar[bool] = False  # builtin word tokenizer: an [EOS] token
    pad_labels: ClassVar[bool] = False  # labels are per token (padded with IGNORE_INDEX)

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.data: DataConfig = cfg.data

    # -- config ------------------------------------------------------------------------
    @classmethod
    def config_problems(cls, cfg: RunConfig) -> list[str]:
        metric = cfg.eval.metric
        if metric is not None and metric not in cls.metrics:
            return [
                f"eval.metric={metric!r} is not produced by task {cls.name!r}: "
                f"choose one of {list(cls.metrics)}"
            ]
        return []

    @classmethod
    def metric_mode(cls, metric: str) -> str:
        return "max" if metric in cls.maximize else "min"

    # -- data --------------------------------------------------------------------------
    def required_columns(self) -> dict[str, str]:
        """config key → column every split must have."""
        raise NotImplementedError

    def check_labels(
        self, splits: dict[str, Any], model_num_labels: int | None
    ) -> LabelInfo | None:
        return None

    def model_num_labels(self, cfg: RunConfig) -> int | None:
        """The label count a pretrained head declares, where the task has labels."""
        return None

    def tokenize(
        self, batch: dict[str, list], tokenizer, labels: LabelInfo | None
    ) -> dict[str, list]:
        """A batched ``datasets.map`` function → input_ids, attention_mask, labels."""
        raise NotImplementedError

    def collate(self, pad_id: int) -> Collator:
        return Collator(pad_id, self.pad_labels)

    # -- model -------------------------------------------------------------------------
    def head_config(self, labels: LabelInfo | None) -> dict[str, Any]:
        return {}

    # -- evaluation --------------------------------------------------------------------
    def evaluation(self, device: torch.device, labels: LabelInfo | None) -> Evaluation:
        raise NotImplementedError

    report_file: ClassVar[str | None] = None  # RUN_DIR/<report_file>[_<split>].txt

    def report_text(self, report: dict[str, Any]) -> str | None:
        return None

    def report_results(self, split: str, report: dict[str, Any]) -> dict[str, Any]:
        """Entries of a split's report for results.json, named after the split."""
        return {}


class Collator:
    """Dynamic padding to the longest sequence of the batch (picklable: runs in workers)."""

    def __init__(self, pad_id: int, pad_labels: bool):
        self.pad_id = pad_id
        self.pad_labels = pad_labels

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids, mask, labels = [], [], []
        for r in rows:
            pad = longest - len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad_id] * pad)
            mask.append(r["attention_mask"] + [0] * pad)
            labels.append(r["labels"] + [IGNORE_INDEX] * pad if self.pad_labels else r["labels"])
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels),
        }


class Evaluation:
    """Per-split accumulator: ``update`` per batch (on the device), ``compute`` once."""

    def update(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor], valid: torch.Tensor
    ) -> None:
        raise NotImplementedError

    def compute(self) -> EvalResult:
        raise NotImplementedError


# --------------------------------------------------------------------------------------
# Classification: text or text pair → one label
# --------------------------------------------------------------------------------------


class ClassificationTask(Task):
    name = "classification"
    auto_model = "AutoModelForSequenceClassification"
    metrics = ("accuracy", "macro_f1", "loss")
    default_metric = "accuracy"
    maximize = frozenset({"accuracy", "macro_f1"})
    cls_sep_template = True

    def required_columns(self) -> dict[str, str]:
        d = self.data
        cols = {"data.text_column": d.text_column, "data.label_column": d.label_column}
        if d.text_pair_column:
            cols["data.text_pair_column"] = d.text_pair_column
        return cols

    def model_num_labels(self, cfg: RunConfig) -> int | None:
        from .models import is_builtin, load_model_config

        if is_builtin(cfg.model.name_or_path):
            return None
        conf = load_model_config(cfg)
        archs = getattr(conf, "architectures", None) or []
        if any("SequenceClassification" in a for a in archs) and getattr(conf, "id2label", None):
            return len(conf.id2label)
        return None

    def check_labels(self, splits: dict[str, Any], model_num_labels: int | None) -> LabelInfo:
        col = self.data.label_column
        configured = self.cfg.model.num_labels
        values = {s: ds[col] for s, ds in splits.items()}
        problems = []
        if all(isinstance(v, str) for vals in values.values() for v in vals):
            names = sorted({v for vals in values.values() for v in vals})
            return LabelInfo(num_labels=configured or len(names), names=names)
        bad = [
            (s, v)
            for s, vals in values.items()
            for v in vals
            if not isinstance(v, int) or isinstance(v, bool)
        ]
        if bad:
            s, v = bad[0]
            raise ConfigError(
                f"data.label_column {col!r} in {s}: label {v!r} is not an integer class id (or use string labels throughout)"
            )
        observed = max(max(vals) for vals in values.values() if vals) + 1
        num = configured or model_num_labels or max(observed, 2)
        for s, vals in values.items():
            out = sorted({v for v in vals if v < 0 or v >= num})
            if out:
                source = (
                    "model.num_labels"
                    if configured
                    else ("the model's config" if model_num_labels else "the labels")
                )
                problems.append(
                    f"data.label_column {col!r} in {s}: labels {out[:5]} outside 0..{num - 1} "
                    f"(num_labels={num} from {source}); fix the data or set model.num_labels"
                )
        if problems:
            raise ConfigError(problems)
        return LabelInfo(num_labels=num, names=None)

    def tokenize(self, batch, tokenizer, labels):
        d = self.data
        pair = batch[d.text_pair_column] if d.text_pair_column else None
        enc = tokenizer(batch[d.text_column], pair, truncation=True, max_length=d.max_length)
        y = batch[d.label_column]
        if labels and labels.names:
            index = {n: i for i, n in enumerate(labels.names)}
            y = [index[v] for v in y]
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": y}

    def head_config(self, labels: LabelInfo | None) -> dict[str, Any]:
        extra: dict[str, Any] = {"num_labels": labels.num_labels}
        if labels.names:
            extra["id2label"] = dict(enumerate(labels.names))
            extra["label2id"] = {n: i for i, n in enumerate(labels.names)}
        return extra

    def evaluation(self, device, labels):
        return ClassificationEvaluation(device, labels)

    report_file = "classification_report"

    def report_text(self, report):
        return classification_report(report)

    def report_results(self, split, report):
        suffix = "" if split == "validation" else f"_{split}"
        return {
            f"{split}_per_class": report["per_class"],
            f"classification_report{suffix}": classification_report(report),
        }


class ClassificationEvaluation(Evaluation):
    def __init__(self, device: torch.device, labels: LabelInfo):
        self.device, self.labels = device, labels
        self.preds: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, logits, batch, valid):
        logits = logits.float()
        y = batch["labels"].to(logits.device)
        per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        self.loss_sum += per[valid].double().sum()
        self.preds.append(logits.argmax(dim=-1)[valid])  # argmax over the class dimension
        self.targets.append(y[valid])

    def compute(self) -> EvalResult:
        preds = torch.cat(self.preds).tolist() if self.preds else []
        targets = torch.cat(self.targets).tolist() if self.targets else []
        gathered = all_gather_object((preds, targets))
        all_p = [p for g in gathered for p in g[0]]
        all_y = [y for g in gathered for y in g[1]]
        total_loss, total_n = all_reduce_sum([float(self.loss_sum), len(preds)], self.device)
        m = classification_metrics(all_p, all_y, self.labels.num_labels, self.labels.names)
        per_class = m.pop("per_class")
        metrics = {"loss": total_loss / max(total_n, 1), **m}
        return EvalResult(metrics, {**m, "per_class": per_class})


def classification_metrics(
    preds: list[int], labels: list[int], num_labels: int, names: list[str] | None = None
) -> dict[str, Any]:
    n = len(labels)
    correct = sum(int(p == y) for p, y in zip(preds, labels))
    per_class = {}
    f1s = []
    for c in range(num_labels):
        tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1s.append(f1)
        per_class[names[c] if names else str(c)] = {
            "precision": prec,
            "recall": rec,
            "f1": f1,
            "support": tp + fn,
        }
    return {
        "accuracy": correct / n if n else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "num_samples": n,
        "per_class": per_class,
    }


def classification_report(metrics: dict[str, Any]) -> str:
    lines = [f"{'class':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for name, m in metrics["per_class"].items():
        lines.append(
            f"{name:>12} {m['precision']:9.4f} {m['recall']:9.4f} {m['f1']:9.4f} {m['support']:8d}"
        )
    lines.append(
        f"{'accuracy':>12} {'':>9} {'':>9} {metrics['accuracy']:9.4f} {metrics['num_samples']:8d}"
    )
    lines.append(
        f"{'macro f1':>12} {'':>9} {'':>9} {metrics['macro_f1']:9.4f} {metrics['num_samples']:8d}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Causal LM: plain text, or prompt/response with the loss on the response only
# --------------------------------------------------------------------------------------


class CausalLMTask(Task):
    name = "causal_lm"
    auto_model = "AutoModelForCausalLM"
    metrics = ("loss", "perplexity")
    default_metric = "loss"
    eos_token = True
    pad_labels = True

    @classmethod
    def config_problems(cls, cfg: RunConfig) -> list[str]:
        problems = super().config_problems(cfg)
        if bool(cfg.data.prompt_column) != bool(cfg.data.response_column):
            problems.append(
                "data.prompt_column and data.response_column go together: set both or neither"
            )
        return problems

    def required_columns(self) -> dict[str, str]:
        d = self.data
        if d.prompt_column:
            return {
                "data.prompt_column": d.prompt_column,
                "data.response_column": d.response_column,
            }
        return {"data.text_column": d.text_column}

    def tokenize(self, batch, tokenizer, labels):
        d = self.data
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids_out, labels_out = [], []
        if d.prompt_column:
            prompts = tokenizer(batch[d.prompt_column], add_special_tokens=False)["input_ids"]
            responses = tokenizer(batch[d.response_column], add_special_tokens=False)["input_ids"]
            for p, r in zip(prompts, responses):
                ids_out.append((p + r + eos)[: d.max_length])
                labels_out.append(([IGNORE_INDEX] * len(p) + r + eos)[: d.max_length])
        else:
            for ids in tokenizer(batch[d.text_column], add_special_tokens=False)["input_ids"]:
                ids_out.append((ids + eos)[: d.max_length])
                labels_out.append(list(ids_out[-1]))
        mask = [[1] * len(ids) for ids in ids_out]
        return {"input_ids": ids_out, "attention_mask": mask, "labels": labels_out}

    def evaluation(self, device, labels):
        return LMEvaluation(device)


class LMEvaluation(Evaluation):
    """Next-token loss summed per row on the device; only two numbers leave it per batch."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, logits, batch, valid):
        s, n = token_loss_sum(logits, batch["labels"].to(logits.device))
        self.loss_sum += s[valid].double().sum()
        self.tokens += n[valid].sum()

    def compute(self) -> EvalResult:
        total_loss, total_n = all_reduce_sum([float(self.loss_sum), int(self.tokens)], self.device)
        return EvalResult(lm_metrics(total_loss, int(total_n)))


def lm_metrics(loss_sum: float, tokens: int) -> dict[str, float]:
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num_tokens": tokens}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token loss and token counts (labels == -100 ignored).

    Computed where the logits are (the device); only the per-row sums leave it, instead of
    the whole ``[batch, seq, vocab]`` logits tensor being copied to the host.
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    mask = shift_labels != IGNORE_INDEX
    return (loss * mask).sum(dim=1), mask.sum(dim=1)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

TASKS: dict[str, type[Task]] = {t.name: t for t in (ClassificationTask, CausalLMTask)}


def build_task(cfg: RunConfig) -> Task:
    return TASKS[cfg.task](cfg)
