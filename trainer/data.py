"""Data: load splits with `datasets`, check columns and labels, tokenise once, shard.

Sources: ``builtin:NAME`` (generated), local csv / tsv / json / jsonl / parquet files,
CoNLL-style ``.conll`` / ``.iob`` / ``.bio`` files (token classification), or a hub dataset id. A validation split is carved from train with a fixed seed when none is given.
Tokenisation runs once per node (local rank 0 first, others reuse its cache).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import LOADER_KEYS, ConfigError, RunConfig
from .datacheck import Source, check_cells, check_file, max_length_problem
from .tasks import LabelInfo, build_task

LOCAL_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".conll": "conll",
    ".iob": "conll",
    ".bio": "conll",
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
        rows = builtin_data.GENERATORS[name](n, seed=seed * 7919 + 17)
        return datasets.Dataset.from_dict(rows), None  # generated: nothing to check
    if kind == "file":
        p = Path(spec).expanduser()
        if not p.exists():
            raise ConfigError(
                f"data.{which}={spec!r}: file not found (working directory {os.getcwd()})"
            )
        fmt = LOCAL_FORMATS.get(p.suffix.lower())
        source = Source(which, spec, fmt or "", encoding=cfg.data.encoding)
        if fmt is None and not p.is_dir():
            raise ConfigError(
                f"data.{which}={spec!r}: unsupported file type {p.suffix!r}; use one of {sorted(LOCAL_FORMATS)}"
            )
        check_file(p, source, tsv=p.suffix.lower() == ".tsv")  # folder, empty, encoding
        if fmt == "conll":
            ds = read_conll(
                p, cfg.data.tokens_column, cfg.data.tags_column, which, cfg.data.encoding
            )
            return ds, source
        kwargs: dict[str, Any] = {} if fmt == "parquet" else {"encoding": cfg.data.encoding}
        if p.suffix.lower() == ".tsv":
            kwargs.update(delimiter="\t", quoting=3)  # GLUE-style: no quoting
        try:
            return datasets.load_dataset(fmt, data_files=str(p), split="train", **kwargs), source
        except Exception as e:  # malformed file: say which, with the parser's own reason
            raise ConfigError(
                f"data.{which}={spec!r}: could not read as {fmt}: {root_cause(e)}"
            ) from None
    try:
        ds = datasets.load_dataset(spec, cfg.data.hub_config, split=split, revision=None)
        return ds, Source(which, spec, "hub")
    except Exception as e:
        raise ConfigError(
            f"data.{which}={spec!r}: not a local file and could not be loaded from the hub ({type(e).__name__}: {e}). "
            "Check the path, or the dataset id and data.hub_config"
        ) from None


def root_cause(e: BaseException) -> str:
    """The innermost reason of a chained exception (datasets wraps the parser's error in
    "An error occurred while generating the dataset")."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}"


def read_conll(
    path: Path, tokens_column: str, tags_column: str, which: str, encoding: str = "utf-8"
):
    """CoNLL-style text: one word per line, the word in the first column and its tag in the
    last (space or tab separated), a blank line between sentences, ``-DOCSTART-`` lines
    ignored."""
    import datasets

    sentences: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    with open(path, encoding=encoding) as f:
        for number, line in enumerate(f, 1):
            cols = line.split()
            if not cols or cols[0] == "-DOCSTART-":
                if words:
                    sentences.append((words, tags))
                words, tags = [], []
                continue
            if len(cols) < 2:
                raise ConfigError(
                    f"data.{which}={str(path)!r} line {number}: {line.strip()!r} has one column; "
                    "expected the word first and its tag last"
                )
            words.append(cols[0])
            tags.append(cols[-1])
    if words:
        sentences.append((words, tags))
    return datasets.Dataset.from_dict(
        {tokens_column: [w for w, _ in sentences], tags_column: [t for _, t in sentences]},
        features=datasets.Features(
            {
                tokens_column: datasets.Sequence(datasets.Value("string")),
                tags_column: datasets.Sequence(datasets.Value("string")),
            }
        ),
    )


def load_raw_splits(cfg: RunConfig, notes: list[str] | None = None) -> dict[str, Any]:
    """train / validation / (test) as `datasets.Dataset`, validation carved if absent.

    Each loaded source is first checked cell by cell (``trainer.datacheck``) and read by
    the task (``Task.read_source``), both where row numbers are still the file's, before
    the carve-out; all problems are raised together. ``notes`` receives warnings (rows
    dropped under ``data.on_empty_text=drop``)."""
    d = cfg.data
    task = build_task(cfg)
    problems: list[str] = []

    def load(spec: str, split: str, which: str):
        try:
            ds, source = _load_one(cfg, spec, split, which)
        except ConfigError as e:
            problems.extend(e.problems)
            return None
        try:
            if source is not None:
                ds = check_cells(cfg, task, ds, source)
                if notes is not None:
                    notes.extend(source.notes)
            return task.read_source(ds, which)
        except ConfigError as e:
            problems.extend(e.problems)
            return ds

    train = load(d.train, d.train_split, "train")
    validation = load(d.validation, d.validation_split, "validation") if d.validation else None
    test = load(d.test, d.test_split, "test") if d.test else None
    if problems:
        raise ConfigError(problems)
    if validation is None:
        parts = train.train_test_split(
            test_size=d.validation_fraction, seed=d.split_seed, shuffle=True
        )
        train, validation = parts["train"], parts["test"]
    splits = {"train": train, "validation": validation}
    if test is not None:
        splits["test"] = test
    if d.max_train_samples:
        splits["train"] = splits["train"].select(
            range(min(d.max_train_samples, len(splits["train"])))
        )
    if d.max_eval_samples:
        for k in ("validation", "test"):
            if k in splits:
                splits[k] = splits[k].select(range(min(d.max_eval_samples, len(splits[k]))))
    return splits


def check_splits(
    cfg: RunConfig,
    splits: dict[str, Any],
    model_num_labels: int | None = None,
    notes: list[str] | None = None,
) -> LabelInfo | None:
    """Columns exist and labels fit; all problems at once, naming split, column and value."""
    task = build_task(cfg)
    problems = []
    for split, ds in splits.items():
        if len(ds) == 0:
            problems.append(f"data.{split}: the split is empty")
        for key, col in task.required_columns().items():
            if col not in ds.column_names:
                problems.append(f"{key} {col!r} not in {split} columns {ds.column_names}")
    if problems:
        raise ConfigError(problems)
    return task.check_labels(splits, model_num_labels, notes)


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
        "data": d.model_dump(
            mode="json", exclude={"cache_dir", "group_by_length", "batch_by_tokens", *LOADER_KEYS}
        ),
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
    task = build_task(cfg)
    out = {}
    for name, ds in splits.items():
        keep = ["input_ids", "attention_mask", "labels"]
        keep += list(task.eval_columns) if name != "train" else []
        tok = ds.map(
            lambda batch: task.tokenize(batch, tokenizer, labels),
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


def prepare(cfg: RunConfig, is_local_leader: bool, barrier=None) -> Prepared:
    """Tokenise once per node: local rank 0 builds into the cache (atomic rename), the
    other ranks wait and load the same files.

    The wait is an exchange on the long group (``barrier`` is no longer needed): a ConfigError of a leader (bad data
    that pre-flight did not see, e.g. under a bare torchrun) reaches every rank, so all
    raise it and exit 2 with one message, instead of the others waiting out the long
    timeout or being torn down with a traceback each."""
    import datasets
    from transformers import AutoTokenizer

    from .distributed import all_gather_object
    from .models import tokenizer_id

    path = cache_root(cfg) / cache_key(cfg, tokenizer_id(cfg))
    error = None
    if is_local_leader and not (path / "DONE").exists():
        try:
            _build_cache(cfg, path)
        except ConfigError as e:
            error = e.problems
    failed = [problems for problems in all_gather_object(error, long=True) if problems]
    if failed:
        raise ConfigError(failed[0])
    dd = datasets.load_from_disk(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    info = json.loads((path / "labels.json").read_text())
    return Prepared(
        splits={k: dd[k] for k in dd},
        tokenizer=tokenizer,
        labels=LabelInfo(**info) if info else None,
        path=path,
    )


def _build_cache(cfg: RunConfig, path: Path) -> None:
    import datasets

    from .models import build_tokenizer

    task = build_task(cfg)
    problem = max_length_problem(cfg)  # also here: bare torchrun / srun runs no pre-flight
    if problem:
        raise ConfigError(problem)
    raw = load_raw_splits(cfg)
    labels = check_splits(cfg, raw, task.model_num_labels(cfg))
    tokenizer = build_tokenizer(cfg, task, lambda: task.vocabulary_texts(raw["train"]))
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

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        by_tokens: bool = False,
        grouped_steps: int | None = None,
        split_by_length: bool = True,
    ):
        if num_samples < global_batch:
            raise ConfigError(
                f"train.global_batch_size={global_batch} is larger than the training set ({num_samples} rows): "
                "lower the batch size or add data"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = num_samples // global_batch
        self.lengths = lengths  # token count of every sample, for the three levers below
        self.by_tokens = by_tokens  # data.batch_by_tokens: micro-batches of variable size
        self.grouped_steps = grouped_steps  # data.length_grouped_steps: steps of similar length
        # data.group_by_length or data.batch_by_tokens: a step's samples split by length
        self.split_by_length = split_by_length and lengths is not None
        self._perm_epoch: int | None = None
        self._perm: list[int] = []
        self._window_key: tuple[int, int] | None = None
        self._window: list[list[int]] = []

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
        if self.grouped_steps and self.lengths is not None:
            window = self.grouped_window(epoch, s // self.grouped_steps)
            return window[s % self.grouped_steps]
        return self.permutation(epoch)[s * self.global_batch : (s + 1) * self.global_batch]

    def grouped_window(self, epoch: int, w: int) -> list[list[int]]:
        """``data.length_grouped_steps`` (K): the steps ``w*K .. w*K+K-1`` of ``epoch``. Their
        samples (those the plain plan gives them) sorted longest first, ties by index, cut
        into steps of ``global_batch`` and shuffled by a generator seeded from (seed, epoch,
        w): the same on every rank and world size, and a resume recomputes it from the step.
        The epoch's last window holds the steps that are left (fewer than K)."""
        if self._window_key != (epoch, w):
            K, G = self.grouped_steps, self.global_batch
            k = min(K, self.steps_per_epoch - w * K)
            pool = self.permutation(epoch)[w * K * G : (w * K + k) * G]
            pool = sorted(pool, key=lambda i: (-self.lengths[i], i))
            steps = [pool[j * G : (j + 1) * G] for j in range(k)]
            mix = ((self.seed * 1_000_003 + epoch) * 1_000_003 + w) % (1 << 63)
            order = torch.randperm(k, generator=torch.Generator().manual_seed(mix)).tolist()
            self._window = [steps[j] for j in order]
            self._window_key = (epoch, w)
        return self._window

    def micro_batches(self, step: int, rank: int, world: int, micro: int) -> list[list[int]]:
        idx = self.step_indices(step)
        accum = self.global_batch // (micro * world)
        if self.split_by_length and self.by_tokens:
            return batch_by_tokens(idx, self.lengths, step, rank, world, accum)
        if self.split_by_length:
            return group_by_length(idx, self.lengths, step, rank, world, micro, accum)
        return [
            idx[(m * world + rank) * micro : (m * world + rank + 1) * micro] for m in range(accum)
        ]


def build_plan(cfg: RunConfig, train, global_batch: int) -> GlobalBatchPlan:
    """The training split's step-keyed plan, with its samples' lengths where a step's samples
    are split by length (``data.group_by_length``, ``data.batch_by_tokens``) or steps are
    grouped by length (``data.length_grouped_steps``)."""
    d = cfg.data
    grouped = d.length_grouped_steps
    lengths = sample_lengths(train) if d.group_by_length or d.batch_by_tokens or grouped else None
    split = d.group_by_length or d.batch_by_tokens
    return GlobalBatchPlan(
        len(train), global_batch, cfg.train.seed, lengths, d.batch_by_tokens, grouped, split
    )


def group_by_length(
    idx: list[int],
    lengths: Sequence[int],
    step: int,
    rank: int,
    world: int,
    micro: int,
    accum: int,
) -> list[list[int]]:
    """``rank``'s micro-batches of one step's samples ``idx``, grouped by length.

    The step's samples stay those of the plan (exact resume, any world size); only their
    split changes: sorted longest first (ties by index, so every rank computes the same
    order), cut into ``accum × world`` contiguous chunks, so a micro-batch pads to a length
    close to its shortest sample. Micro-step ``m`` gives its ``world`` neighbouring chunks to
    the ranks, which therefore run forward and backward of similar lengths in lock step; who
    gets which rotates with ``m + step``, so over steps every rank carries as many tokens.
    """
    order = sorted(idx, key=lambda i: (-lengths[i], i))
    out = []
    for m in range(accum):
        c = m * world + (rank + m + step) % world
        out.append(order[c * micro : (c + 1) * micro])
    return out


def batch_by_tokens(
    idx: list[int], lengths: Sequence[int], step: int, rank: int, world: int, accum: int
) -> list[list[int]]:
    """``rank``'s micro-batches of one step's samples ``idx``, of variable size
    (``data.batch_by_tokens``).

    As in ``group_by_length`` the samples stay the plan's and are sorted longest first (ties
    by index); the ``accum × world`` contiguous chunks are cut by ``balanced_chunks`` so that
    the largest chunk's padded tokens are the fewest possible: many short samples share a
    micro-batch, few long ones another, and no rank waits on a micro-batch padded far beyond
    the others. Micro-step ``m`` takes the ``m``-th ``world`` chunks by padded size (largest
    first: the peak memory shows at once; chunks of similar size run in lock step, which
    makes the step's sum of slowest micro-batches the smallest), and who gets which rotates
    with ``m + step``. The engines weigh each micro-batch's mean loss by its size, so the
    step's loss and gradients stay the mean over its samples.
    """
    order = sorted(idx, key=lambda i: (-lengths[i], i))
    bounds = balanced_chunks([lengths[i] for i in order], accum * world)
    by_size = sorted(bounds, key=lambda b: (-_padded(lengths, order, b), b))
    out = []
    for m in range(accum):
        start, stop = by_size[m * world + (rank + m + step) % world]
        out.append(order[start:stop])
    return out


def _padded(lengths: Sequence[int], order: list[int], bounds: tuple[int, int]) -> int:
    """Token slots of ``order[start:stop]`` padded to its longest (the first: sorted)."""
    start, stop = bounds
    return (stop - start) * lengths[order[start]]


def balanced_chunks(lengths: Sequence[int], k: int) -> list[tuple[int, int]]:
    """``k`` non-empty contiguous (start, stop) chunks of ``lengths`` (sorted longest first)
    whose largest padded size (samples × longest) is the smallest possible.

    Binary search on the budget: a greedy fill (each chunk as long as the budget allows)
    needs the fewest chunks for a budget, so the smallest budget it fits in ``k`` chunks is the
    optimum; the equal split (``len // k`` each) is a feasible upper bound, so a micro-batch
    never holds more padded tokens than the equal split's worst one (nor more attention
    scores: n × L² ≤ budget × L). Chunks are then split, the largest first, until there are
    exactly ``k`` (a split never raises a chunk's padded size)."""
    n = len(lengths)
    assert 1 <= k <= n, (k, n)
    size = -(-n // k)
    lo = max(lengths[0], 1)
    hi = max((min(i + size, n) - i) * lengths[i] for i in range(0, n, size))
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_greedy(lengths, mid)) <= k:
            hi = mid
        else:
            lo = mid + 1
    chunks = _greedy(lengths, lo)
    while len(chunks) < k:
        widest = max(
            (c for c in chunks if c[1] - c[0] > 1),
            key=lambda c: ((c[1] - c[0]) * lengths[c[0]], -c[0]),
        )
        i = chunks.index(widest)
        chunks[i : i + 1] = _halve(lengths, widest)
    return chunks


def _greedy(lengths: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Chunks filled up to ``budget`` padded tokens each (``budget`` ≥ the longest length)."""
    chunks, start, n = [], 0, len(lengths)
    while start < n:
        stop = min(n, start + budget // max(lengths[start], 1))
        chunks.append((start, stop))
        start = stop
    return chunks


def _halve(lengths: Sequence[int], chunk: tuple[int, int]) -> list[tuple[int, int]]:
    """``chunk`` cut in two where the larger part's padded size is the smallest."""
    start, stop = chunk
    cut = min(
        range(start + 1, stop),
        key=lambda c: (max((c - start) * lengths[start], (stop - c) * lengths[c]), c),
    )
    return [(start, cut), (cut, stop)]


def sample_lengths(dataset) -> list[int]:
    """Token count of every row of a tokenised split (read from its Arrow column, honouring
    a selection), for ``data.group_by_length``."""
    import pyarrow.compute as pc

    column = dataset.with_format("arrow")[:]["input_ids"]
    return pc.list_value_length(column).to_pylist()


def eval_shards(
    n: int, rank: int, world: int, micro: int, lengths: Sequence[int] | None = None
) -> Iterator[tuple[list[int], list[bool]]]:
    """Strided shard of ``range(n)``, padded so every rank runs the same number of batches.

    A rank whose shard runs out early forwards one placeholder row (index 0, marked
    invalid), so metrics count every sample exactly once while ZeRO-3's collective
    forward stays in lock step. With ``lengths`` the samples are first sorted longest first
    (ties by index): a batch then pads to about its own samples' length instead of the
    longest of a random draw, and the ranks' batches ``b`` hold neighbouring lengths. The
    metrics are sums over samples, so only the loss's float rounding can tell.
    """
    per_rank = -(-n // world)
    batches = -(-per_rank // micro)
    order = sorted(range(n), key=lambda i: (-lengths[i], i)) if lengths is not None else range(n)
    mine = list(order[rank::world])
    for b in range(batches):
        chunk = mine[b * micro : (b + 1) * micro]
        valid = [True] * len(chunk)
        if not chunk:
            chunk, valid = [0], [False]
        yield chunk, valid


class StepBatchSampler:
    """The batch sampler of the training ``DataLoader``: this rank's micro-batches of
    optimizer steps ``start .. stop-1`` in order, ``accum`` per step, straight from the
    step-keyed plan (a resume starts at its step; nothing is iterated through)."""

    def __init__(
        self, plan: GlobalBatchPlan, rank: int, world: int, micro: int, start: int, stop: int
    ):
        self.plan, self.rank, self.world, self.micro = plan, rank, world, micro
        self.start, self.stop = start, stop
        self.accum = plan.global_batch // (micro * world)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield from self.plan.micro_batches(step, self.rank, self.world, self.micro)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.accum


def loader_options(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """``DataLoader`` keywords: collation runs in worker processes (1 on CPU, where it only
    has to stay off the step; 2 on GPU, pinned, so the next batch is ready and its copy to the
    device can overlap). A private generator seeds the workers, so creating a loader never
    draws from the global RNG that dropout uses (exact resume depends on that)."""
    d = cfg.data
    workers = d.num_workers if d.num_workers != "auto" else (2 if device.type == "cuda" else 1)
    pin = d.pin_memory if d.pin_memory != "auto" else device.type == "cuda"
    opts: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": pin,
        "generator": torch.Generator(),
    }
    if workers:
        opts.update(
            prefetch_factor=d.prefetch_factor,
            multiprocessing_context="fork",
            worker_init_fn=functools.partial(die_with_rank, os.getpid()),
        )
    return opts


def die_with_rank(rank_pid: int, worker_id: int) -> None:
    """A loader worker dies with its rank (Linux ``PR_SET_PDEATHSIG``): a rank killed with
    SIGKILL must not leave workers behind that hold its run-directory lock, files and sockets
    for seconds, or print tracebacks from their broken pipes after the launcher's last lines."""
    sys.excepthook = quiet_lost_rank
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != rank_pid:  # the rank died before the request took effect
        os._exit(0)


def quiet_lost_rank(kind, value, tb) -> None:
    """A loader worker's ``sys.excepthook``. The worker hands batches to its rank by file
    descriptor through a server thread (``multiprocessing.resource_sharer``) that reports its
    errors here; a connection the rank dropped mid-transfer — the rank stopping at Ctrl-C, a
    preemption or a lost peer — is no error of the worker's, and its traceback would follow
    the launcher's last line. Anything else is printed as usual (a worker's own errors reach
    the rank through the DataLoader, not this hook)."""
    if issubclass(kind, (ConnectionError, EOFError)):
        return
    sys.__excepthook__(kind, value, tb)


def train_loader(dataset, sampler: StepBatchSampler, collate, options: dict[str, Any]):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, **options)


def eval_loader(
    dataset,
    rank: int,
    world: int,
    micro: int,
    collate,
    options: dict[str, Any],
    by_length: bool = True,
):
    """(loader, valid masks): the eval shards of this rank, placeholders marked invalid;
    ``by_length``: batches of length-sorted samples (the same metrics, less padding)."""
    from torch.utils.data import DataLoader

    lengths = sample_lengths(dataset) if by_length and len(dataset) else None
    shards = list(eval_shards(len(dataset), rank, world, micro, lengths))
    loader = DataLoader(
        dataset,
        batch_sampler=[idx for idx, _ in shards],
        collate_fn=collate,
        **options,
    )
    return loader, [torch.tensor(valid) for _, valid in shards]
