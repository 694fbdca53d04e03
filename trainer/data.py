"""Data: load splits with `datasets`, check columns and labels, tokenise once, shard.

Sources: ``builtin:NAME`` (generated), local csv / tsv / json / jsonl / parquet files, or a
hub dataset id. A validation split is carved from train with a fixed seed when none is given.
Tokenisation runs once per node (local rank 0 first, others reuse its cache).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, RunConfig

LOCAL_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
BUILTIN = "builtin:"


# --------------------------------------------------------------------------------------
# Raw splits
# --------------------------------------------------------------------------------------


def source_kind(spec: str) -> str:
    if spec.startswith(BUILTIN):
        return "builtin"
    p = Path(spec)
    if p.suffix.lower() in LOCAL_FORMATS or p.exists() or spec.startswith((".", "/", "~")):
        return "file"
    return "hub"


def _load_one(cfg: RunConfig, spec: str, split: str, which: str):
    import datasets

    kind = source_kind(spec)
    if kind == "builtin":
        from . import builtin_data

        name = spec[len(BUILTIN) :]
        if name not in builtin_data.GENERATORS:
            raise ConfigError(
                f"data.{which}={spec!r}: unknown builtin dataset; choose one of {sorted(builtin_data.GENERATORS)}"
            )
        seed = {"train": 0, "validation": 1, "test": 2}[which]
        n = cfg.data.builtin_size if which == "train" else max(cfg.data.builtin_size // 4, 100)
        return datasets.Dataset.from_dict(builtin_data.GENERATORS[name](n, seed=seed * 7919 + 17))
    if kind == "file":
        p = Path(spec).expanduser()
        if not p.is_file():
            raise ConfigError(
                f"data.{which}={spec!r}: file not found (working directory {os.getcwd()})"
            )
        fmt = LOCAL_FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise ConfigError(
                f"data.{which}={spec!r}: unsupported file type {p.suffix!r}; use one of {sorted(LOCAL_FORMATS)}"
            )
        kwargs: dict[str, Any] = {}
        if p.suffix.lower() == ".tsv":
            kwargs = {"delimiter": "\t", "quoting": 3}  # GLUE-style: no quoting
        try:
            return datasets.load_dataset(fmt, data_files=str(p), split="train", **kwargs)
        except Exception as e:  # malformed file: say which
            raise ConfigError(f"data.{which}={spec!r}: could not read as {fmt}: {e}") from None
    try:
        return datasets.load_dataset(spec, cfg.data.hub_config, split=split, revision=None)
    except Exception as e:
        raise ConfigError(
            f"data.{which}={spec!r}: not a local file and could not be loaded from the hub ({type(e).__name__}: {e}). "
            "Check the path, or the dataset id and data.hub_config"
        ) from None


def load_raw_splits(cfg: RunConfig) -> dict[str, Any]:
    """train / validation / (test) as `datasets.Dataset`, validation carved if absent."""
    d = cfg.data
    train = _load_one(cfg, d.train, d.train_split, "train")
    if d.validation:
        validation = _load_one(cfg, d.validation, d.validation_split, "validation")
    else:
        parts = train.train_test_split(
            test_size=d.validation_fraction, seed=d.split_seed, shuffle=True
        )
        train, validation = parts["train"], parts["test"]
    splits = {"train": train, "validation": validation}
    if d.test:
        splits["test"] = _load_one(cfg, d.test, d.test_split, "test")
    if d.max_train_samples:
        splits["train"] = splits["train"].select(
            range(min(d.max_train_samples, len(splits["train"])))
        )
    if d.max_eval_samples:
        for k in ("validation", "test"):
            if k in splits:
                splits[k] = splits[k].select(range(min(d.max_eval_samples, len(splits[k]))))
    return splits


def required_columns(cfg: RunConfig) -> dict[str, str]:
    """config key → column name that every split must have."""
    d = cfg.data
    if cfg.task == "classification":
        cols = {"data.text_column": d.text_column, "data.label_column": d.label_column}
        if d.text_pair_column:
            cols["data.text_pair_column"] = d.text_pair_column
        return cols
    if d.prompt_column:
        return {"data.prompt_column": d.prompt_column, "data.response_column": d.response_column}
    return {"data.text_column": d.text_column}


@dataclass
class LabelInfo:
    num_labels: int
    names: list[str] | None  # string labels mapped to ids in sorted order


def check_splits(
    cfg: RunConfig, splits: dict[str, Any], model_num_labels: int | None = None
) -> LabelInfo | None:
    """Columns exist and labels fit; all problems at once, naming split, column and value."""
    problems = []
    for split, ds in splits.items():
        if len(ds) == 0:
            problems.append(f"data.{split}: the split is empty")
        for key, col in required_columns(cfg).items():
            if col not in ds.column_names:
                problems.append(f"{key} {col!r} not in {split} columns {ds.column_names}")
    if problems or cfg.task != "classification":
        if problems:
            raise ConfigError(problems)
        return None
    col = cfg.data.label_column
    values = {s: ds[col] for s, ds in splits.items()}
    names = None
    if all(isinstance(v, str) for vals in values.values() for v in vals):
        names = sorted({v for vals in values.values() for v in vals})
        num = cfg.model.num_labels or len(names)
    else:
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
        num = cfg.model.num_labels or model_num_labels or max(observed, 2)
        for s, vals in values.items():
            out = sorted({v for v in vals if v < 0 or v >= num})
            if out:
                source = (
                    "model.num_labels"
                    if cfg.model.num_labels
                    else ("the model's config" if model_num_labels else "the labels")
                )
                problems.append(
                    f"data.label_column {col!r} in {s}: labels {out[:5]} outside 0..{num - 1} "
                    f"(num_labels={num} from {source}); fix the data or set model.num_labels"
                )
    if problems:
        raise ConfigError(problems)
    return LabelInfo(num_labels=num, names=names)


# --------------------------------------------------------------------------------------
# Tokenisation (once per node, cached)
# --------------------------------------------------------------------------------------


def _source_fingerprint(spec: str | None) -> Any:
    if spec is None:
        return None
    if source_kind(spec) == "builtin":
        from .builtin_data import VERSION

        return [spec, VERSION]
    if source_kind(spec) == "file":
        st = Path(spec).expanduser().stat()
        return [str(Path(spec).expanduser().resolve()), st.st_size, int(st.st_mtime)]
    return spec


def cache_key(cfg: RunConfig, tokenizer_id: str) -> str:
    d = cfg.data
    payload = {
        "v": 2,
        "task": cfg.task,
        "train": _source_fingerprint(d.train),
        "validation": _source_fingerprint(d.validation),
        "test": _source_fingerprint(d.test),
        "data": d.model_dump(mode="json", exclude={"cache_dir"}),
        "tokenizer": tokenizer_id,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :20
    ]


def cache_root(cfg: RunConfig) -> Path:
    root = (
        cfg.data.cache_dir
        or os.environ.get("ZEROTUNE_CACHE")
        or os.path.join(os.path.expanduser("~"), ".cache", "zerotune")
    )
    return Path(root).expanduser() / "datasets"


def tokenize_splits(
    cfg: RunConfig, splits: dict[str, Any], tokenizer, labels: LabelInfo | None
) -> dict[str, Any]:
    d = cfg.data
    keep = ["input_ids", "attention_mask", "labels"]

    def classify(batch):
        pair = batch[d.text_pair_column] if d.text_pair_column else None
        enc = tokenizer(batch[d.text_column], pair, truncation=True, max_length=d.max_length)
        y = batch[d.label_column]
        if labels and labels.names:
            index = {n: i for i, n in enumerate(labels.names)}
            y = [index[v] for v in y]
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": y}

    def causal(batch):
        eos = tokenizer.eos_token_id
        ids_out, mask_out, labels_out = [], [], []
        if d.prompt_column:
            prompts = tokenizer(batch[d.prompt_column], add_special_tokens=False)["input_ids"]
            responses = tokenizer(batch[d.response_column], add_special_tokens=False)["input_ids"]
            for p, r in zip(prompts, responses):
                ids = (p + r + ([eos] if eos is not None else []))[: d.max_length]
                lab = ([-100] * len(p) + r + ([eos] if eos is not None else []))[: d.max_length]
                ids_out.append(ids)
                labels_out.append(lab)
                mask_out.append([1] * len(ids))
        else:
            enc = tokenizer(batch[d.text_column], add_special_tokens=False)["input_ids"]
            for ids in enc:
                ids = (ids + ([eos] if eos is not None else []))[: d.max_length]
                ids_out.append(ids)
                labels_out.append(list(ids))
                mask_out.append([1] * len(ids))
        return {"input_ids": ids_out, "attention_mask": mask_out, "labels": labels_out}

    fn = classify if cfg.task == "classification" else causal
    out = {}
    for name, ds in splits.items():
        tok = ds.map(
            fn,
            batched=True,
            remove_columns=ds.column_names,
            desc=f"tokenising {name}",
            load_from_cache_file=False,
        )
        out[name] = tok.select_columns([c for c in keep if c in tok.column_names])
    return out


@dataclass
class Prepared:
    splits: dict[str, Any]  # tokenised: input_ids, attention_mask, labels
    tokenizer: Any
    labels: LabelInfo | None
    path: Path


def prepare(cfg: RunConfig, is_local_leader: bool, barrier) -> Prepared:
    """Tokenise once per node: local rank 0 builds into the cache (atomic rename), the
    other ranks wait at the barrier and load the same files."""
    import datasets
    from transformers import AutoTokenizer

    from .tasks import build_tokenizer, model_num_labels, tokenizer_id

    path = cache_root(cfg) / cache_key(cfg, tokenizer_id(cfg))
    if is_local_leader and not (path / "DONE").exists():
        raw = load_raw_splits(cfg)
        labels = check_splits(cfg, raw, model_num_labels(cfg))
        tokenizer = build_tokenizer(cfg, lambda: raw["train"][cfg.data.text_column])
        splits = tokenize_splits(cfg, raw, tokenizer, labels)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "labels.json").write_text(json.dumps(labels.__dict__ if labels else None))
        (tmp / "DONE").write_text("ok")
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race; use theirs
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    dd = datasets.load_from_disk(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    info = json.loads((path / "labels.json").read_text())
    return Prepared(
        splits={k: dd[k] for k in dd},
        tokenizer=tokenizer,
        labels=LabelInfo(**info) if info else None,
        path=path,
    )


# --------------------------------------------------------------------------------------
# Sampling and batching
# --------------------------------------------------------------------------------------


class GlobalBatchPlan:
    """Which samples each rank sees at each optimizer step; a pure function of the step.

    Epoch ``e`` uses one permutation drawn from ``seed + e``. Optimizer step ``s`` of an
    epoch takes the ``global_batch`` consecutive indices ``perm[s*G:(s+1)*G]``, split into
    ``accum × world`` micro-batches. The samples of a step therefore do not depend on the
    world size or accumulation, so a resume at another world size neither skips nor
    repeats anything, and resuming jumps straight to the step (no iterating through skipped
    batches). The last partial global batch of an epoch is dropped.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int):
        if num_samples < global_batch:
            raise ConfigError(
                f"train.global_batch_size={global_batch} is larger than the training set ({num_samples} rows): "
                "lower the batch size or add data"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = num_samples // global_batch
        self._perm_epoch: int | None = None
        self._perm: list[int] = []

    def permutation(self, epoch: int) -> list[int]:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.num_samples, generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within epoch) of global optimizer step ``step`` (0-based)."""
        return divmod(step, self.steps_per_epoch)

    def step_indices(self, step: int) -> list[int]:
        epoch, s = self.position(step)
        return self.permutation(epoch)[s * self.global_batch : (s + 1) * self.global_batch]

    def micro_batches(self, step: int, rank: int, world: int, micro: int) -> list[list[int]]:
        idx = self.step_indices(step)
        accum = self.global_batch // (micro * world)
        return [
            idx[(m * world + rank) * micro : (m * world + rank + 1) * micro] for m in range(accum)
        ]


def eval_shards(
    n: int, rank: int, world: int, micro: int
) -> Iterator[tuple[list[int], list[bool]]]:
    """Strided shard of ``range(n)``, padded so every rank runs the same number of batches.

    A rank whose shard runs out early forwards one placeholder row (index 0, marked
    invalid), so metrics count every sample exactly once while ZeRO-3's collective
    forward stays in lock step.
    """
    per_rank = -(-n // world)
    batches = -(-per_rank // micro)
    mine = list(range(rank, n, world))
    for b in range(batches):
        chunk = mine[b * micro : (b + 1) * micro]
        valid = [True] * len(chunk)
        if not chunk:
            chunk, valid = [0], [False]
        yield chunk, valid


class Collator:
    """Dynamic padding to the longest sequence of the batch."""

    def __init__(self, pad_id: int, task: str):
        self.pad_id = pad_id
        self.task = task

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids, mask, labels = [], [], []
        for r in rows:
            pad = longest - len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad_id] * pad)
            mask.append(r["attention_mask"] + [0] * pad)
            if self.task == "causal_lm":
                labels.append(r["labels"] + [-100] * pad)
        batch = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        batch["labels"] = (
            torch.tensor(labels)
            if self.task == "causal_lm"
            else torch.tensor([r["labels"] for r in rows])
        )
        return batch


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())
