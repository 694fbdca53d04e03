"""What a sweep point left behind, as one flat row: ``sweep_status.json`` + the run's files.

A point's figures come from the run's own records — ``results.json`` (``throughput``,
``memory``, ``cost``), ``env.json`` (world, batch, device) and ``config.yaml`` — never
recomputed here, so the CSV and the report say what the run said. Where a summary figure
is absent (an older run, a failed point), the window figures of ``metrics.jsonl`` after
the warm-up steps stand in, and the cell stays empty when there is nothing to read.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from trainer.files import write_json_atomic

STATUS_FILE = "sweep_status.json"
COLUMNS = [
    "name",
    "status",
    "reason",
    "nodes",
    "nproc_per_node",
    "world_size",
    "zero_stage",
    "offload_optimizer",
    "offload_params",
    "engine",
    "precision",
    "micro_batch_size",
    "grad_accum",
    "global_batch_size",
    "max_length",
    "parameters",
    "steps",
    "steps_timed",
    "step_time_s",
    "tokens_per_s",
    "samples_per_s",
    "flops_per_token",
    "tflops_per_device",
    "mfu",
    "peak_tflops",
    "peak_memory_bytes",
    "model_states_bytes_measured",
    "model_states_bytes_predicted",
    "price_per_device_hour",
    "cost_per_1m_tokens",
    "device_hours_per_1m_tokens",
    "device_name",
    "wall_s",
]


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_status(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / STATUS_FILE)


def write_status(run_dir: Path, status: str, reason: str, **extra: Any) -> None:
    """The point's state for a re-run and for the CSV; written atomically (rename)."""
    old = read_status(run_dir)
    old.update(extra, status=status, reason=reason, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_json_atomic(run_dir / STATUS_FILE, old)


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    """``kind: train`` records of metrics.jsonl, the later one kept when a step was logged twice."""
    by_step: dict[int, dict[str, Any]] = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if rec.get("kind") == "train":
            by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def window_values(run_dir: Path, key: str, warmup: int) -> list[float]:
    """A logged window figure of every log window that starts after the warm-up steps."""
    out, start = [], 1
    for r in train_records(run_dir):
        if start > warmup and isinstance(r.get(key), (int, float)):
            out.append(float(r[key]))
        start = r["step"] + 1
    return out


def window_mean(run_dir: Path, key: str, warmup: int) -> float | None:
    """Mean of a logged window figure over the windows after the warm-up."""
    vals = window_values(run_dir, key, warmup)
    return sum(vals) / len(vals) if vals else None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _finite(v: Any) -> Any:
    return v if not isinstance(v, float) or math.isfinite(v) else None


def point_row(run_dir: Path, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """One CSV row for a point directory (any of its files may be missing)."""
    status = read_status(run_dir)
    results = read_json(run_dir / "results.json")
    env = read_json(run_dir / "env.json")
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    tp = results.get("throughput") or {}
    mem = results.get("memory") or {}
    cost = results.get("cost") or {}
    batch = env.get("batch") or {}
    warmup = tp.get(
        "warmup_steps_excluded", (cfg.get("logging") or {}).get("warmup_steps_excluded", 0)
    )
    world = _first(results.get("world_size"), env.get("world_size"))
    nodes = status.get("nodes") or len(set(env.get("hosts") or [])) or None
    rss = mem.get("host_peak_rss_gb_train") or []
    row: dict[str, Any] = {
        "name": run_dir.name,
        "status": status.get("status", "done" if results else "not run"),
        "reason": status.get("reason", ""),
        "nodes": nodes,
        "nproc_per_node": world // nodes if world and nodes else None,
        "world_size": world,
        "zero_stage": (cfg.get("zero") or {}).get("stage"),
        "offload_optimizer": (cfg.get("zero") or {}).get("offload_optimizer"),
        "offload_params": (cfg.get("zero") or {}).get("offload_params"),
        "engine": cfg.get("engine"),
        "precision": cfg.get("precision"),
        "micro_batch_size": _first(
            batch.get("micro"), (cfg.get("train") or {}).get("micro_batch_size")
        ),
        "grad_accum": batch.get("grad_accum"),
        "global_batch_size": batch.get("global"),
        "max_length": (cfg.get("data") or {}).get("max_length"),
        "parameters": _first(results.get("parameters"), env.get("parameters")),
        "steps": results.get("steps"),
        "steps_timed": tp.get("steps_timed"),
        "step_time_s": _first(
            tp.get("step_time_s"),
            tp.get("mean_step_time_s"),
            window_mean(run_dir, "step_time_s", warmup),
        ),
        "tokens_per_s": _first(
            tp.get("tokens_per_s"), window_mean(run_dir, "tokens_per_s", warmup)
        ),
        "samples_per_s": _first(
            tp.get("samples_per_s"), window_mean(run_dir, "samples_per_s", warmup)
        ),
        "flops_per_token": tp.get("flops_per_token"),
        "tflops_per_device": _first(
            tp.get("tflops_per_device"), window_mean(run_dir, "tflops_per_device", warmup)
        ),
        "mfu": _first(tp.get("mfu"), window_mean(run_dir, "mfu", warmup)),
        "peak_tflops": tp.get("peak_tflops"),
        "peak_memory_bytes": _first(
            mem.get("peak_memory_bytes"), int(max(rss) * 2**30) if rss else None
        ),
        "model_states_bytes_measured": mem.get("model_states_bytes_measured"),
        "model_states_bytes_predicted": mem.get("model_states_bytes_predicted"),
        "price_per_device_hour": cost.get("price_per_device_hour"),
        "cost_per_1m_tokens": cost.get("cost_per_1m_tokens"),
        "device_hours_per_1m_tokens": None,
        "device_name": env.get("device_name"),
        "wall_s": status.get("wall_s"),
    }
    if row["tokens_per_s"] and world:
        row["device_hours_per_1m_tokens"] = world * 1e6 / row["tokens_per_s"] / 3600
    for key, value in (values or {}).items():
        if key not in row:
            row[key] = value
    return {k: _finite(v) for k, v in row.items()}


def write_results_csv(out: Path, sweep) -> list[dict[str, Any]]:
    """``out/results.csv``: the standard columns, then any grid key not among them."""
    rows = []
    for p in sweep.points:
        row = point_row(out / p.name, p.values)
        row["nodes"] = row["nodes"] or p.nodes
        rows.append(row)
    extra = [k for k in sweep.grid_keys if k not in COLUMNS]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + extra, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return rows


def read_results_csv(path: Path) -> list[dict[str, Any]]:
    """The CSV back with numbers as numbers (empty cells as None)."""

    def parse(v: str) -> Any:
        if v == "":
            return None
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return {"True": True, "False": False}.get(v, v)

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]
