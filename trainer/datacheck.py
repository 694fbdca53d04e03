"""Checks of local data files and their cells, before anything is tokenised.

A file that is a folder, empty, not in ``data.encoding``, or has cells a task cannot use
(an empty text, a missing label, a JSONL line without a key) is named here with the rows
as the user counts them: ``line N`` of the file for TSV and JSON-lines files (whose rows
are lines), ``data row N`` (1-based, header not counted) for CSV, whose quoted cells may
span lines. Pre-flight and the rank that tokenises run the same checks, so a rank never
meets a cell the tokenizer chokes on.

Cost: one pass over a text file's bytes (to find the first undecodable line and which
lines are rows) and one over the checked columns; nothing else of the data is read.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig

SHOWN_ROWS = 5  # offending rows named per message; the rest are counted
TEXT_FORMATS = {"csv", "json", "conll"}  # read as text in data.encoding (parquet is binary)


@dataclass
class Source:
    """A local data file as the messages name it."""

    which: str  # train / validation / test
    spec: str  # data.<which> as given
    fmt: str  # csv / json / parquet / conll
    encoding: str = "utf-8"
    lines: list[int] | None = None  # file line of each data row, where rows are lines
    notes: list[str] = field(default_factory=list)  # warnings for the user (dropped rows)

    @property
    def key(self) -> str:
        return f"data.{self.which}={self.spec!r}"

    def rows(self, indices: list[int]) -> str:
        """``lines 3, 7 and 2 more`` / ``data rows 2, 6 (1-based, header not counted)``."""
        shown = [self.lines[i] if self.lines else i + 1 for i in indices[:SHOWN_ROWS]]
        more = f" and {len(indices) - SHOWN_ROWS} more" if len(indices) > SHOWN_ROWS else ""
        numbers = ", ".join(map(str, shown)) + more
        if self.lines is not None:
            return f"line{'s' if len(indices) > 1 else ''} {numbers}"
        if self.fmt == "csv":
            return (
                f"data row{'s' if len(indices) > 1 else ''} {numbers} (1-based, header not counted)"
            )
        return f"record{'s' if len(indices) > 1 else ''} {numbers} (1-based)"


@dataclass
class CellProblem:
    """Rows of one column a task cannot use: ``what`` they hold and what to do about it."""

    column: str
    rows: list[int]  # 0-based indices into the loaded file
    what: str  # e.g. "missing label"
    fix: str
    droppable: bool = False  # empty text: data.on_empty_text=drop may leave the rows out


# --------------------------------------------------------------------------------------
# The file itself
# --------------------------------------------------------------------------------------


def check_file(path: Path, source: Source, tsv: bool) -> None:
    """Folder, empty, undecodable, header only: one ConfigError naming the file; for TSV and
    JSON-lines files also records which line each data row is (``source.lines``)."""
    if path.is_dir():
        raise ConfigError(
            f"{source.key} is a directory, not a file: name a .csv / .tsv / .jsonl / .json / "
            ".parquet file inside it"
        )
    if path.stat().st_size == 0:
        raise ConfigError(f"{source.key} is empty (0 bytes): point it at a file with data rows")
    if source.fmt not in TEXT_FORMATS:
        return
    encoding = source.encoding
    content, bad = _scan_lines(path, encoding)
    if bad is not None:
        line, err = bad
        raise ConfigError(
            f"{source.key} is not valid {encoding} text: line {line} ({err}). Save the file as "
            f"{encoding}, or set data.encoding to its encoding (e.g. data.encoding=latin-1, cp1252, utf-16)"
        )
    if not content:
        raise ConfigError(f"{source.key} is empty (blank lines only): add data rows")
    if source.fmt == "csv" and len(content) == 1:
        raise ConfigError(
            f"{source.key} has a header line but no data rows: add rows below the header"
        )
    is_json_lines = source.fmt == "json" and not _starts_with(path, encoding, "[")
    if tsv or is_json_lines:
        source.lines = content[1:] if tsv else content


def _scan_lines(path: Path, encoding: str) -> tuple[list[int], tuple[int, str] | None]:
    """(numbers of the non-blank lines, (line, reason) of the first undecodable one or None)."""
    name = codecs.lookup(encoding).name
    if name.startswith(("utf-16", "utf-32")):  # not line-splittable as bytes: decode whole
        try:
            text = path.read_text(encoding=encoding)
        except UnicodeDecodeError as e:
            head = path.read_bytes()[: e.start]
            return [], (head.count(b"\n") + 1, e.reason)
        return [n for n, line in enumerate(text.splitlines(), 1) if line.strip()], None
    content = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                byte = raw[e.start : e.start + 1].hex()
                return content, (number, f"byte 0x{byte} at column {e.start + 1}: {e.reason}")
            if line.strip():
                content.append(number)
    return content, None


def _starts_with(path: Path, encoding: str, char: str) -> bool:
    with open(path, encoding=encoding) as f:
        head = f.read(4096).lstrip("\ufeff \t\r\n")
    return head.startswith(char)


# --------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------


def column(ds, col: str) -> list[Any]:
    """A column as a Python list, read through Arrow in one go (iterating ``ds[col]``, a
    lazy ``Column`` in datasets 4, formats row by row: 1 s for SST-2's 67k rows)."""
    return ds.select_columns([col]).to_dict()[col]


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def empty_or_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def text_problems(ds, columns: dict[str, str], source: Source) -> list[CellProblem]:
    """Empty, missing (null / no key) and non-text cells of the text columns present."""
    out = []
    for key, col in columns.items():
        if col not in ds.column_names:
            continue  # check_splits names the missing column
        values = column(ds, col)
        empty = [i for i, v in enumerate(values) if empty_or_missing(v)]
        other = [
            i for i, v in enumerate(values) if not empty_or_missing(v) and not isinstance(v, str)
        ]
        if empty:
            out.append(
                CellProblem(
                    col,
                    empty,
                    plural(len(empty), "empty or missing text cell"),
                    _missing_keys(source, col, empty)
                    + "fill them in or remove those rows, or set data.on_empty_text=drop to leave them out",
                    droppable=True,
                )
            )
        if other:
            sample = values[other[0]]
            out.append(
                CellProblem(
                    col,
                    other,
                    plural(len(other), "cell")
                    + f" that {'are' if len(other) > 1 else 'is'} not text "
                    f"(e.g. {sample!r:.40} of type {type(sample).__name__})",
                    f"check that {key}={col!r} is the text column, or quote those values as strings",
                )
            )
    return out


def _missing_keys(source: Source, col: str, rows: list[int]) -> str:
    """For JSON lines: whether the first shown lines lack the key (vs an explicit null)."""
    if source.lines is None or source.fmt != "json":
        return ""
    wanted = {source.lines[i] for i in rows[:SHOWN_ROWS]}
    lacking = []
    with open(Path(source.spec).expanduser(), encoding=source.encoding, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if number in wanted:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and col not in record:
                    lacking.append(number)
            if number >= max(wanted):
                break
    if not lacking:
        return ""
    numbers = ", ".join(map(str, lacking))
    return f"{'lines' if len(lacking) > 1 else 'line'} {numbers} {'have' if len(lacking) > 1 else 'has'} no key {col!r}; "


def check_cells(cfg: RunConfig, task, ds, source: Source):
    """The task's text columns (``Task.text_columns``) and its own cells (labels:
    ``Task.cell_problems``) of one loaded source; returns it, perhaps with rows dropped."""
    problems = text_problems(ds, task.text_columns(), source) + task.cell_problems(ds)
    return apply_cell_checks(cfg, ds, source, problems)


def apply_cell_checks(cfg: RunConfig, ds, source: Source, problems: list[CellProblem]):
    """Raise the problems as one ConfigError, or drop empty-text rows under
    ``data.on_empty_text=drop`` (a note says how many and which) when those are all."""
    droppable = [p for p in problems if p.droppable]
    if cfg.data.on_empty_text == "drop" and droppable and len(droppable) == len(problems):
        drop = sorted({i for p in droppable for i in p.rows})
        source.notes.append(
            f"{source.key}: dropped {len(drop)} of {len(ds)} rows with empty or missing text "
            f"({source.rows(drop)}; data.on_empty_text=drop)"
        )
        if len(drop) == len(ds):
            raise ConfigError(
                f"{source.key}: every row has an empty or missing text: nothing to train on"
            )
        keep = sorted(set(range(len(ds))) - set(drop))
        return ds.select(keep)
    if problems:
        raise ConfigError(
            [
                f"{source.key} column {p.column!r}: {p.what} at {source.rows(p.rows)}; {p.fix}"
                for p in problems
            ]
        )
    return ds


# --------------------------------------------------------------------------------------
# Settings the model bounds
# --------------------------------------------------------------------------------------

# position tables that reserve the first padding_idx + 1 entries (RoBERTa's offset)
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "xlm-roberta-xl"}
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_positions", "n_ctx")


def max_length_problem(cfg: RunConfig) -> str | None:
    """``data.max_length`` beyond the positions the model has (an index error inside the
    first forward otherwise). Builtin models size their table to max_length unless
    ``model.builtin`` fixes it; other models say it in their config."""
    from .models import BUILTIN_MODELS, is_builtin, load_model_config

    name = cfg.model.name_or_path
    if is_builtin(name):
        arch = BUILTIN_MODELS.get(name.split(":", 1)[1], {})
        keys = [k for k in POSITION_KEYS if k in cfg.model.builtin]
        limit = cfg.model.builtin[keys[0]] if keys else None
        model_type = arch.get("model_type")
    else:
        conf = load_model_config(cfg)
        model_type = getattr(conf, "model_type", None)
        limit = next((getattr(conf, k) for k in POSITION_KEYS if getattr(conf, k, None)), None)
        if limit and model_type in OFFSET_POSITIONS:
            limit -= (getattr(conf, "pad_token_id", None) or 1) + 1
    if limit is None or cfg.data.max_length <= limit:
        return None
    return (
        f"data.max_length={cfg.data.max_length} is beyond the {limit} positions of "
        f"model.name_or_path={name!r}: set data.max_length={limit} or lower"
    )


def check_data(cfg: RunConfig, warnings: list[str]) -> int:
    """The pre-flight's data check: the task and the model's labels and positions, the
    adapter settings, the tokenizer, every split's files and cells. The training rows (after
    any validation carve-out); every problem found is raised together as one ConfigError.

    Reads the data and the tokenizer, writes nothing of the run: ``zerotune validate`` and
    ``zerotune submit`` run it in the launcher, ``zerotune train`` in its rank 0 before the
    gate (``trainer/gate.py``), where datasets and transformers are imported anyway."""
    from .adapters import preflight_problem
    from .data import check_splits, load_raw_splits
    from .models import build_tokenizer, builtin_problem, is_builtin
    from .tasks import build_task

    task = build_task(cfg)
    problems: list[str] = []
    num_labels = None
    try:
        num_labels = task.model_num_labels(cfg)
        problems += filter(None, [max_length_problem(cfg)])
    except ConfigError as e:
        problems.extend(e.problems)
    problems += filter(None, [preflight_problem(cfg)])
    if not is_builtin(cfg.model.tokenizer or cfg.model.name_or_path):
        try:
            build_tokenizer(cfg, task)
        except ConfigError as e:
            problems.extend(e.problems)
    elif is_builtin(cfg.model.name_or_path) and builtin_problem(cfg.model.name_or_path):
        problems.append(builtin_problem(cfg.model.name_or_path))
    splits = None
    try:
        splits = load_raw_splits(cfg, warnings)
    except ConfigError as e:
        problems.extend(e.problems)
    if splits is not None:
        try:
            check_splits(cfg, splits, num_labels, warnings)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    return len(splits["train"])


def data_findings(cfg: RunConfig) -> dict:
    """``check_data`` as a record (JSON: it crosses from rank 0 to the launcher through the
    gate): ``train_rows`` (None when the data failed), ``warnings``, ``problems``."""
    warnings: list[str] = []
    try:
        rows = check_data(cfg, warnings)
    except ConfigError as e:
        return refused(e.problems, warnings)
    return {"train_rows": rows, "warnings": warnings, "problems": []}


def refused(problems: list[str], warnings: list[str] | None = None) -> dict:
    """The record of a check that failed: also a rank's own config error before its check
    (``trainer/main.py``), which the launcher then says, once."""
    return {"train_rows": None, "warnings": warnings or [], "problems": list(problems)}
