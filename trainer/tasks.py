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
from .datacheck import CellProblem, column, plural
from .distributed import all_gather_object, all_reduce_sum
from .entities import entity_counts, entity_metrics, entity_report, entity_types, tag_problem

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
    # columns the evaluation reads besides the model's inputs: kept in the tokenised
    # validation / test splits only, collated, and never passed to the model
    eval_columns: ClassVar[tuple[str, ...]] = ()
    packs: ClassVar[bool] = False  # data.packing: several sequences per training row
    # the model's loss is a mean over a batch's samples, so data.batch_by_tokens can weigh a
    # micro-batch by its sample count (a token-level mean would need its token count)
    sample_mean_loss: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.data: DataConfig = cfg.data

    # -- config ------------------------------------------------------------------------
    @classmethod
    def config_problems(cls, cfg: RunConfig) -> list[str]:
        problems = []
        metric = cfg.eval.metric
        if metric is not None and metric not in cls.metrics:
            problems.append(
                f"eval.metric={metric!r} is not produced by task {cls.name!r}: "
                f"choose one of {list(cls.metrics)}"
            )
        if cfg.data.packing and not cls.packs:
            problems.append(
                f"data.packing=true: task {cls.name!r} does not pack sequences (causal_lm does): "
                "set data.packing=false"
            )
        if cfg.data.batch_by_tokens and not cls.sample_mean_loss:
            problems.append(
                f"data.batch_by_tokens=true: task {cls.name!r} averages its loss over tokens, not "
                "samples, so micro-batches of unequal size would weigh its tokens unequally: set "
                "data.batch_by_tokens=false and use data.group_by_length=true"
            )
        return problems

    @classmethod
    def metric_mode(cls, metric: str) -> str:
        return "max" if metric in cls.maximize else "min"

    # -- data --------------------------------------------------------------------------
    def required_columns(self) -> dict[str, str]:
        """config key → column every split must have."""
        raise NotImplementedError

    def read_source(self, ds, which: str):
        """A loaded source (``data.<which>``, before the validation carve-out) as the task
        reads it; raises ConfigError naming the rows (as the file counts them) it cannot use."""
        return ds

    def vocabulary_texts(self, ds) -> list[str]:
        """The texts the builtin word tokenizer learns its vocabulary from."""
        return ds[self.data.text_column]

    def text_columns(self) -> dict[str, str]:
        """config key → column whose every cell must be non-empty text (checked with the
        file's row numbers before tokenising: a None reaches the tokenizer as a crash)."""
        return {}

    def cell_problems(self, ds) -> list[CellProblem]:
        """Cells of one loaded source the task cannot use, besides its text columns."""
        return []

    def check_labels(
        self, splits: dict[str, Any], model_num_labels: int | None, notes: list[str] | None = None
    ) -> LabelInfo | None:
        """The label set of the carved splits; ConfigError if unusable, ``notes`` get warnings."""
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

    def train_collate(self, pad_id: int) -> Collator:
        """The training batches' collator (``collate`` unless the task packs them)."""
        return self.collate(pad_id)

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
    sample_mean_loss = True  # cross-entropy (MSE for one label) averaged over the batch's rows

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

    def text_columns(self) -> dict[str, str]:
        d = self.data
        cols = {"data.text_column": d.text_column}
        if d.text_pair_column:
            cols["data.text_pair_column"] = d.text_pair_column
        return cols

    def cell_problems(self, ds) -> list[CellProblem]:
        """Missing labels, labels that are not class ids, ids outside the head (when its
        size is known before the labels are seen: model.num_labels or the model's head)."""
        col = self.data.label_column
        if col not in ds.column_names:
            return []
        values = column(ds, col)
        missing = [
            i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())
        ]
        out = []
        if missing:
            out.append(
                CellProblem(
                    col,
                    missing,
                    plural(len(missing), "missing label"),
                    "fill in the class of each row or remove those rows",
                )
            )
        present = [(i, v) for i, v in enumerate(values) if i not in set(missing)]
        if all(isinstance(v, str) for _, v in present):
            ids = [i for i, v in present if v.strip().lstrip("-").isdigit()]
            if not ids or len(ids) == len(present):
                return out  # class names throughout (digit strings: a header-less guess)
            bad = [i for i, v in present if not v.strip().lstrip("-").isdigit()]
        else:
            bad = [i for i, v in present if not is_class_id(v)]
        if bad:
            out.append(
                CellProblem(
                    col,
                    bad,
                    plural(len(bad), "non-integer label")
                    + f" among integer ones (e.g. {values[bad[0]]!r})",
                    "use integer ids 0..K-1 throughout, or class names throughout",
                )
            )
            return out
        num = self.cfg.model.num_labels or self.model_num_labels(self.cfg)
        negative = [i for i, v in present if v < 0]
        beyond = [i for i, v in present if num and v >= num]
        for rows, what in ((negative, "negative"), (beyond, f"out-of-range (0..{(num or 0) - 1})")):
            if rows:
                source = "model.num_labels" if self.cfg.model.num_labels else "the model's head"
                fix = (
                    "class ids start at 0"
                    if what == "negative"
                    else f"num_labels={num} from {source}"
                )
                out.append(
                    CellProblem(
                        col,
                        rows,
                        plural(len(rows), f"{what} label") + f" (e.g. {values[rows[0]]!r})",
                        f"{fix}; fix the data or set model.num_labels",
                    )
                )
        return out

    def read_source(self, ds, which: str):
        """A label column with an empty cell is read as floats; once the cells are checked
        (integral), the ids are ints again."""
        import datasets

        col = self.data.label_column
        if getattr(ds.features.get(col), "dtype", None) in ("float16", "float32", "float64"):
            ds = ds.cast_column(col, datasets.Value("int64"))
        return ds

    def check_labels(
        self, splits: dict[str, Any], model_num_labels: int | None, notes: list[str] | None = None
    ) -> LabelInfo:
        """Integer ids must be 0..K-1 with every class present, unless the head size is
        given (model.num_labels, or the model's own head): a gap would train a class that
        never occurs and macro-F1 would average it in. One class only is refused."""
        col = self.data.label_column
        where = f"data.train={self.data.train!r} column {col!r}"
        configured = self.cfg.model.num_labels
        values = {s: column(ds, col) for s, ds in splits.items()}
        train_classes = sorted(set(values["train"]), key=str)
        if len(train_classes) == 1:
            raise ConfigError(
                f"{where}: every training row has label {train_classes[0]!r}: a classifier needs "
                "at least two classes; check data.label_column and the file"
            )
        problems = []
        if all(isinstance(v, str) for vals in values.values() for v in vals):
            names = sorted({v for vals in values.values() for v in vals})
            return LabelInfo(num_labels=configured or len(names), names=names)
        bad = [(s, v) for s, vals in values.items() for v in vals if not is_class_id(v)]
        if bad:
            s, v = bad[0]
            raise ConfigError(
                f"data.label_column {col!r} in {s}: label {v!r} is not an integer class id (or use string labels throughout)"
            )
        observed = {int(v) for vals in values.values() for v in vals}
        num = configured or model_num_labels or max(max(observed) + 1, 2)
        absent = sorted(set(range(num)) - {int(v) for v in values["train"]})
        if absent and not (configured or model_num_labels):
            gaps = sorted(set(range(num)) - observed)
            if gaps:
                raise ConfigError(
                    f"{where}: the labels are {sorted(observed)[:10]}, so class(es) {gaps[:10]} have no rows: "
                    f"a {num}-class head would train classes that never occur and macro-F1 would count them. "
                    f"Renumber the labels 0..{len(observed) - 1} (or use class names), or set "
                    f"model.num_labels={num} if the data really lacks those classes"
                )
        if absent and notes is not None:
            notes.append(
                f"{where}: class(es) {absent[:10]} of the {num} have no training rows "
                "(the head is sized by model.num_labels or the model)"
            )
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


def is_class_id(v: Any) -> bool:
    """An int (not a bool), or a float with an integral value (a column read with a gap)."""
    if isinstance(v, bool):
        return False
    return isinstance(v, int) or (isinstance(v, float) and v.is_integer())


def classification_metrics(
    preds: list[int], labels: list[int], num_labels: int, names: list[str] | None = None
) -> dict[str, Any]:
    """Per-class figures for every class; macro-F1 averages the classes that occur in the
    gold labels or the predictions (as scikit-learn does), so a class with no rows at all
    does not pull it down with a 0."""
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
        if tp + fp + fn:  # the class occurs in the gold labels or the predictions
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
    packs = True

    def train_collate(self, pad_id: int) -> Collator:
        return PackingCollator() if self.data.packing else self.collate(pad_id)

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

    def text_columns(self) -> dict[str, str]:
        return self.required_columns()

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


class PackingCollator:
    """``data.packing``: a micro-batch's sequences end to end in one row, without padding.

    transformers' ``DataCollatorWithFlattening``: ``position_ids`` restart at 0 for each
    sequence, and the first label of each is ``IGNORE_INDEX``, so no token is predicted from
    the sequence before it. No ``attention_mask`` goes to the model: from restarting
    position ids transformers builds a block-diagonal causal mask (sdpa / eager:
    ``masking_utils.find_packed_sequence_indices``; flash-attention: variable-length
    kernels), so attention stays inside each sequence and the loss equals the padded
    batch's — the same predicted tokens, the same mean. Which samples form the micro-batch
    is still the step-keyed plan's choice (exact resume unchanged); packing only removes
    the padding. Every token of the row is real (``trainer.throughput.sequence_lengths``).
    """

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(
            return_position_ids=True, separator_id=IGNORE_INDEX, return_tensors="pt"
        )

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
        return {k: v for k, v in self.flatten(rows).items() if k != "attention_mask"}


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
# Token classification: a list of words → one BIO / IOBES tag per word (NER)
# --------------------------------------------------------------------------------------

MISSED = -1  # a word cut off by max_length: the model never saw it, it counts as "O"
MAX_PROBLEMS = 20  # rows named per error message; the rest are counted


class TokenClassificationTask(Task):
    """The first sub-token of each word carries the word's tag, the others are ignored
    (``IGNORE_INDEX``). Evaluation is per word and over every word of a row: the tokenised
    validation / test rows keep each word's gold tag (``word_labels``) and where its first
    sub-token is (``word_ids``), so a word beyond ``max_length`` is a miss, not dropped."""

    name = "token_classification"
    auto_model = "AutoModelForTokenClassification"
    metrics = ("f1", "precision", "recall", "token_accuracy", "loss")
    default_metric = "f1"
    maximize = frozenset({"f1", "precision", "recall", "token_accuracy"})
    cls_sep_template = True
    pad_labels = True
    eval_columns = ("word_ids", "word_labels")

    def required_columns(self) -> dict[str, str]:
        d = self.data
        return {"data.tokens_column": d.tokens_column, "data.tags_column": d.tags_column}

    def read_source(self, ds, which: str):
        d = self.data
        if d.tags_column in ds.column_names:
            ds = decode_tag_ids(ds, d.tags_column)
        if not {d.tokens_column, d.tags_column} <= set(ds.column_names):
            return ds  # check_splits names the missing column
        problems = []
        for row, (words, tags) in enumerate(zip(ds[d.tokens_column], ds[d.tags_column]), 1):
            problem = self._row_problem(words, tags)
            if problem:
                problems.append(f"data.{which} row {row}: {problem}")
        if problems:
            raise ConfigError(capped(problems))
        return ds

    def _row_problem(self, words: Any, tags: Any) -> str | None:
        d = self.data
        for col, cell, what in ((d.tokens_column, words, "words"), (d.tags_column, tags, "tags")):
            if not isinstance(cell, list):
                return (
                    f"{col!r} holds {cell!r:.80} ({type(cell).__name__}), expected a list of {what}"
                )
        if len(words) != len(tags):
            return (
                f"{len(words)} words in {d.tokens_column!r} but {len(tags)} tags in "
                f"{d.tags_column!r} (words {words!r:.80})"
            )
        for w in words:
            if not isinstance(w, str):
                return f"word {w!r} in {d.tokens_column!r} is not a string"
        for t in tags:
            problem = tag_problem(t)
            if problem:
                return f"{d.tags_column!r}: {problem}"
        return None

    def check_labels(
        self, splits: dict[str, Any], model_num_labels: int | None, notes: list[str] | None = None
    ) -> LabelInfo:
        """The label set is the training file's tags, sorted; a tag the validation or test
        data has beyond it is an error (the model could never predict it)."""
        d = self.data
        col = d.tags_column
        carved = d.validation is None  # validation rows then come from the training file
        known = {t for tags in splits["train"][col] for t in tags}
        if carved and "validation" in splits:
            known |= {t for tags in splits["validation"][col] for t in tags}
        names = sorted(known)
        problems = []
        if not names:
            problems.append(f"data.train: no tags in {col!r} (every row is empty)")
        configured = self.cfg.model.num_labels
        if names and configured and configured != len(names):
            problems.append(
                f"model.num_labels={configured} but the training data has {len(names)} tags "
                f"{names}: leave model.num_labels unset for token_classification"
            )
        for split in ("validation", "test"):
            if split not in splits or (split == "validation" and carved):
                continue
            for row, tags in enumerate(splits[split][col], 1):
                unknown = [t for t in tags if t not in known]
                if unknown:
                    problems.append(
                        f"data.{split} row {row}: tag {unknown[0]!r} in {col!r} does not occur "
                        f"in the training data (its tags: {names})"
                    )
        if problems:
            raise ConfigError(capped(problems))
        return LabelInfo(num_labels=len(names), names=names)

    def vocabulary_texts(self, ds) -> list[str]:
        return [" ".join(words) for words in ds[self.data.tokens_column]]

    def tokenize(self, batch, tokenizer, labels):
        d = self.data
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                f"task token_classification needs a fast tokenizer (it maps sub-words to words); "
                f"{type(tokenizer).__name__} is not one: set model.tokenizer to a fast one"
            )
        enc = tokenizer(
            batch[d.tokens_column],
            is_split_into_words=True,
            truncation=True,
            max_length=d.max_length,
        )
        index = {n: i for i, n in enumerate(labels.names)}
        out: dict[str, list] = {"labels": [], "word_ids": [], "word_labels": []}
        for i, tags in enumerate(batch[d.tags_column]):
            gold = [index[t] for t in tags]
            firsts = first_subtokens(enc.word_ids(i))
            out["labels"].append([gold[w] if w != IGNORE_INDEX else IGNORE_INDEX for w in firsts])
            out["word_ids"].append(firsts)
            out["word_labels"].append(gold)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **out}

    def collate(self, pad_id: int) -> Collator:
        return WordCollator(pad_id, pad_labels=True)

    def head_config(self, labels: LabelInfo | None) -> dict[str, Any]:
        return {
            "num_labels": labels.num_labels,
            "id2label": dict(enumerate(labels.names)),
            "label2id": {n: i for i, n in enumerate(labels.names)},
        }

    def evaluation(self, device, labels):
        return TokenClassificationEvaluation(device, labels)

    report_file = "entity_report"

    def report_text(self, report):
        return entity_report(report)

    def report_results(self, split, report):
        suffix = "" if split == "validation" else f"_{split}"
        return {
            f"{split}_per_type": report["per_type"],
            f"entity_report{suffix}": entity_report(report),
        }


def capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    return problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more like these"]


def decode_tag_ids(ds, col: str):
    """Hub datasets often store tags as class ids (a sequence of ``ClassLabel``): use the
    names, so the label set, the checks and the saved ``id2label`` speak in tags."""
    names = getattr(getattr(ds.features.get(col), "feature", None), "names", None)
    if not names:
        return ds
    import datasets

    features = ds.features.copy()
    features[col] = datasets.Sequence(datasets.Value("string"))
    return ds.map(
        lambda b: {col: [[names[i] for i in row] for row in b[col]]},
        batched=True,
        features=features,
        desc=f"tag names for {col}",
    )


def first_subtokens(word_ids: list[int | None]) -> list[int]:
    """Per token: the index of its word at the word's first sub-token, IGNORE_INDEX at the
    word's other sub-tokens and at special tokens (``word_ids`` from a fast tokenizer)."""
    out, prev = [], None
    for w in word_ids:
        out.append(w if w is not None and w != prev else IGNORE_INDEX)
        prev = w
    return out


class WordCollator(Collator):
    """Also pads the per-word columns of the evaluation, where the rows carry them."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = super().__call__(rows)
        if "word_ids" in rows[0]:
            tokens = out["input_ids"].shape[1]
            words = max(len(r["word_labels"]) for r in rows)
            pad = [IGNORE_INDEX]
            out["word_ids"] = torch.tensor(
                [r["word_ids"] + pad * (tokens - len(r["word_ids"])) for r in rows],
                dtype=torch.long,
            )
            out["word_labels"] = torch.tensor(
                [r["word_labels"] + pad * (words - len(r["word_labels"])) for r in rows],
                dtype=torch.long,
            )
        return out


class TokenClassificationEvaluation(Evaluation):
    """``update`` keeps, per row and on the device, the predicted tag id of every word (at
    its first sub-token; ``MISSED`` where max_length cut the word) beside the gold ids.
    ``compute`` reads the entities of each row on its rank and sums the integer counts
    (true / false positives, false negatives per type) over ranks: exact at any world size."""

    def __init__(self, device: torch.device, labels: LabelInfo):
        self.device, self.names = device, labels.names
        self.types = entity_types(labels.names)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # (predicted, gold) per word

    def update(self, logits, batch, valid):
        logits = logits.float()
        y = batch["labels"].to(logits.device)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none"
        ).view(y.shape)  # ignore_index -100: 0 there
        labelled = y != IGNORE_INDEX
        self.loss_sum += loss[valid].double().sum()
        self.tokens += labelled[valid].sum()
        word_ids = batch["word_ids"].to(logits.device)
        gold = batch["word_labels"].to(logits.device)
        predicted = torch.full_like(gold, MISSED)
        r, c = (word_ids != IGNORE_INDEX).nonzero(as_tuple=True)
        predicted[r, word_ids[r, c]] = logits.argmax(dim=-1)[r, c]
        self.rows.append((predicted[valid], gold[valid]))

    def tag_sequences(self) -> tuple[list[list[str]], list[list[str]]]:
        """(gold, predicted) tags per row of this rank; a missed word is predicted "O"."""
        gold_seqs, pred_seqs = [], []
        for predicted, gold in self.rows:
            for p, g in zip(predicted.tolist(), gold.tolist()):
                n = len(g) - g.count(IGNORE_INDEX)  # the row's words (padding at the end)
                gold_seqs.append([self.names[i] for i in g[:n]])
                pred_seqs.append([self.names[i] if i != MISSED else "O" for i in p[:n]])
        return gold_seqs, pred_seqs

    def compute(self) -> EvalResult:
        gold, pred = self.tag_sequences()
        counts = entity_counts(gold, pred)
        correct = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
        words = sum(len(g) for g in gold)
        local = [float(self.loss_sum), int(self.tokens), correct, words, len(gold)]
        local += [counts.get(t, [0, 0, 0])[k] for t in self.types for k in range(3)]
        total = all_reduce_sum(local, self.device)  # integers in float64: exact sums
        loss_sum, tokens, correct, words, rows = total[:5]
        summed = {
            t: [int(x) for x in total[5 + 3 * j : 8 + 3 * j]] for j, t in enumerate(self.types)
        }
        m = entity_metrics(summed)
        per_type = m.pop("per_type")
        metrics = {
            **m,
            "token_accuracy": correct / words if words else 0.0,
            "loss": loss_sum / max(tokens, 1),
            "num_words": int(words),
            "num_samples": int(rows),
        }
        return EvalResult(metrics, {**metrics, "per_type": per_type})


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (ClassificationTask, CausalLMTask, TokenClassificationTask)
}


def build_task(cfg: RunConfig) -> Task:
    return TASKS[cfg.task](cfg)
