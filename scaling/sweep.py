"""``zerotune sweep SWEEP.yaml``: one ordinary run directory per point of a grid.

    zerotune sweep configs/sweeps/demo.yaml --out runs/sweep-demo          # locally, one point at a time
    zerotune sweep configs/sweeps/demo.yaml --out runs/sweep-demo --slurm  # one `zerotune submit` job per point
    zerotune sweep configs/sweeps/demo.yaml --dry-run                      # validate and list the points

The sweep file::

    base: configs/demo.yaml            # any run config (relative to the current directory)
    set: {train.max_steps: 30}         # overrides for every point
    grid:                              # any config keys; launch.nproc_per_node and nodes too
      launch.nproc_per_node: [1, 2]
      zero.stage: [0, 2, 3]
    timeout_s: 1800                    # optional: a point running longer is stopped (status timeout)
    slurm: {time: "30", cpus_per_task: 1, gpus_per_node: 8, partition: gpu, sbatch_args: []}

Every point is resolved and pre-flight checked before the first one starts: a bad point
stops the sweep with one message naming the point and the key (exit 2), so an hour of runs
never ends on a typo in the last one. A point's directory ``OUT/<name>/`` (names like
``nproc2-zero3``, stable: a function of the grid values) is a normal run directory: its
resolved ``config.yaml`` is written first and trained from, so re-running the sweep resumes
or skips it exactly as ``zerotune train`` would. ``sweep_status.json`` records done / oom /
failed / timeout with the reason; a re-run skips ``done`` points and retries the others
(they resume from their newest checkpoint). ``OUT/results.csv`` gathers every point.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.config import ConfigError, dotted_keys, dump_config, parse_overrides, read_yaml

from .collect import STATUS_FILE, read_status, write_results_csv, write_status

SWEEP_KEYS = {"base", "set", "grid", "timeout_s", "slurm"}
SLURM_KEYS = {"time", "cpus_per_task", "gpus_per_node", "partition", "account", "sbatch_args"}
NODES = "nodes"
NPROC = "launch.nproc_per_node"
# short names of common grid keys in a point's directory name
ALIASES = {
    NPROC: "nproc",
    NODES: "nodes",
    "zero.stage": "zero",
    "zero.offload_optimizer": "offload",
    "zero.offload_params": "offload-params",
    "train.micro_batch_size": "micro",
    "train.global_batch_size": "global",
    "data.max_length": "seq",
    "precision": "",
    "engine": "",
}
# what a failed run's output says when memory ran out (CUDA, host allocator, OOM killer)
OOM_PATTERNS = re.compile(
    r"out of memory|OutOfMemoryError|Cannot allocate memory|std::bad_alloc|SIGKILL|Signals\.SIGKILL",
    re.I,
)
TIMEOUT_EXIT = 124
PY_ERROR = re.compile(r"^(\[rank\d+\]:\s*)?([A-Za-z_.]+(Error|Exception)|KeyboardInterrupt)\b:?")


@dataclass
class Point:
    """One grid point: its stable name, grid values, and how to start it."""

    name: str
    values: dict[str, Any]  # grid key → value
    overrides: list[str]  # --set KEY=VALUE for the base config (set + grid, without nodes)
    nodes: int = 1
    nproc: int | None = None  # None: the config's launch.nproc_per_node
    config_text: str = ""  # the resolved config, written to OUT/<name>/config.yaml


@dataclass
class Sweep:
    base: str | None
    points: list[Point]
    timeout_s: float | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    grid_keys: list[str] = field(default_factory=list)


# ---- the sweep file ------------------------------------------------------------------------
def _override(key: str, value: Any) -> str:
    """``KEY=VALUE`` that ``parse_overrides`` reads back as the same value (YAML flow)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def point_name(values: dict[str, Any]) -> str:
    """``{launch.nproc_per_node: 2, zero.stage: 3}`` → ``nproc2-zero3``."""
    parts = []
    for key, value in values.items():
        alias = ALIASES.get(key, key.split(".")[-1].replace("_", "-"))
        if isinstance(value, bool):
            text = alias if value else f"no-{alias}"
        else:
            text = f"{alias}{value}"
        parts.append(re.sub(r"[^A-Za-z0-9._-]+", "_", text))
    return "-".join(parts) or "base"


def load_sweep(path: str | Path) -> Sweep:
    """Parse and expand a sweep file; ConfigError names the file and the key."""
    raw = read_yaml(path)
    where = f"sweep file {str(path)!r}"
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; a sweep file has {sorted(SWEEP_KEYS)}"
        )
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{where}: base={base!r} must be the path of a run config")
    common = raw.get("set") or {}
    grid = raw.get("grid") or {}
    for name, section in (("set", common), ("grid", grid)):
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: {name} must be a mapping of config keys, got {section!r}")
    grid = dotted_keys(grid)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{where}: grid key {key} must list its values, e.g. {key}: [1, 2]; got {values!r}"
            )
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict) or set(slurm) - SLURM_KEYS:
        raise ConfigError(
            f"{where}: slurm must be a mapping with keys from {sorted(SLURM_KEYS)}, got {slurm!r}"
        )
    timeout = raw.get("timeout_s")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ConfigError(f"{where}: timeout_s={timeout!r} must be a positive number of seconds")
    common = dotted_keys(common)
    points = [_point(dict(zip(grid, combo)), common) for combo in itertools.product(*grid.values())]
    names = [p.name for p in points]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: grid values give the same point name twice: {dupes}")
    return Sweep(base, points, timeout, slurm, list(grid))


def _point(values: dict[str, Any], common: dict[str, Any]) -> Point:
    merged = {**common, **values}
    nodes = merged.pop(NODES, 1)
    overrides = [_override(k, v) for k, v in merged.items()]
    nproc = merged.get(NPROC)
    return Point(point_name(values), values, overrides, nodes, nproc)


# ---- validation: every point before any run ------------------------------------------------
Check = Callable[..., Any]  # launcher.preflight.check (passed in: scaling does not import launcher)


def validate(sweep: Sweep, check: Check, slurm: bool, out: Path | None = None) -> None:
    """Resolve and pre-flight check every point; the first bad one raises, named.

    With ``out``, each point's run directory is checked as ``zerotune train`` would check it
    (writable; an existing run there resumable with this point's config).

    Data files are read once per distinct ``data`` section (loading SST-2 per point would
    cost more than the check is worth); the rest is checked for every point.
    """
    seen_data: set[str] = set()
    for p in sweep.points:
        label = (
            f"sweep point {p.name} ({', '.join(f'{k}={v}' for k, v in p.values.items()) or 'base'})"
        )
        if not isinstance(p.nodes, int) or isinstance(p.nodes, bool) or p.nodes < 1:
            raise ConfigError(f"{label}: nodes={p.nodes!r} must be a positive integer")
        if p.nodes > 1 and not slurm:
            raise ConfigError(
                f"{label}: nodes={p.nodes} needs --slurm (a local sweep runs on this machine only)"
            )
        try:
            data_key = json.dumps(parse_overrides(p.overrides).get("data", {}), sort_keys=True)
            pf = check(
                sweep.base,
                p.overrides,
                p.nproc,
                p.nodes,
                check_data=data_key not in seen_data,
                **({"job_gpus": sweep.slurm.get("gpus_per_node") or 0} if slurm else {}),
                **({"run_dir": out / p.name, "resume": "auto"} if out is not None else {}),
            )
        except ConfigError as e:
            raise ConfigError(f"{label}: {e}") from None
        if pf.problems:
            raise ConfigError(f"{label}: {'; '.join(pf.problems)}")
        seen_data.add(data_key)
        p.nproc = pf.nproc_per_node
        p.config_text = dump_config(pf.cfg)


# ---- running ----------------------------------------------------------------------------
def launcher_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", *args]


def train_cmd(p: Point, run_dir: Path) -> list[str]:
    return launcher_cmd(
        "train",
        str(run_dir / "config.yaml"),
        "--run-dir",
        str(run_dir),
        "--nproc-per-node",
        str(p.nproc),
    )


def classify(code: int, output: str, timed_out: bool) -> tuple[str, str]:
    """(status, reason) of a finished point from its exit code and the tail of its output."""
    if code == 0:
        return "done", ""
    if timed_out or code == TIMEOUT_EXIT:
        return "timeout", "stopped at the sweep's timeout_s" if timed_out else f"exit {code}"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    hits = [line for line in lines if OOM_PATTERNS.search(line)]
    if hits or code in (-9, 137):
        return "oom", (hits[-1] if hits else f"killed (exit {code}): the OOM killer, likely")[:300]
    # the exception line of a rank's traceback says more than the launcher's summary after it
    raised = [line for line in lines if PY_ERROR.search(line)]
    errors = [line for line in lines if re.search(r"error|exception|failed", line, re.I)]
    last = (raised or errors or lines or ["no output"])[-1]
    return "failed", f"exit {code}: " + re.sub(r"^\[rank\d+\]:\s*", "", last)[:300]


def run_local(p: Point, run_dir: Path, timeout_s: float | None) -> tuple[str, str, int]:
    """Run one point through ``zerotune train``; its output goes to ``run_dir/sweep.log``."""
    log = run_dir / "sweep.log"
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(train_cmd(p, run_dir))}\n")
        f.flush()
        proc = subprocess.Popen(
            train_cmd(p, run_dir), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        timed_out = False
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
            code = proc.returncode
        except BaseException:  # Ctrl-C / SIGTERM of the sweep: the point's own session too
            _stop(proc)
            raise
    status, reason = classify(code, _tail(log), timed_out)
    return status, reason, code


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the point's own process group (the launcher and its ranks), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, chars: int = 20000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def progress(
    i: int, n: int, name: str, status: str, reason: str, wall: float | None, row: dict
) -> None:
    figures = []
    if row.get("tokens_per_s"):
        figures.append(f"{row['tokens_per_s']:.0f} tokens/s")
    if row.get("step_time_s"):
        figures.append(f"step {row['step_time_s']:.3f} s")
    if row.get("mfu") is not None:
        figures.append(f"MFU {100 * row['mfu']:.2f} %")
    took = f" in {wall:.1f} s" if wall is not None else ""
    detail = f": {reason}" if reason else ""
    shown = f" — {', '.join(figures)}" if figures and status == "done" else ""
    print(f"sweep [{i}/{n}] {name}: {status}{took}{detail}{shown}", flush=True)


def run_sweep(sweep: Sweep, out: Path, slurm_mode: bool = False, dry_run: bool = False) -> int:
    """Run (or submit) every point not yet done, then gather ``out/results.csv``."""
    from .collect import point_row

    n = len(sweep.points)
    if dry_run:
        for i, p in enumerate(sweep.points, 1):
            shown = ", ".join(f"{k}={v}" for k, v in p.values.items()) or "the base config"
            print(f"sweep [{i}/{n}] {p.name}: {p.nodes} node(s) × {p.nproc} rank(s); {shown}")
        print(f"dry run: {n} point(s) valid; nothing written")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(
        json.dumps(
            {
                "base": sweep.base,
                "grid_keys": sweep.grid_keys,
                "points": [
                    {
                        "name": p.name,
                        "values": p.values,
                        "nodes": p.nodes,
                        "nproc": p.nproc,
                        "overrides": p.overrides,
                    }
                    for p in sweep.points
                ],
            },  # fmt: skip
            indent=1,
            default=str,
        )
    )
    signal.signal(signal.SIGTERM, _interrupt)  # stop the running point, not just the sweep
    if slurm_mode:
        from .slurm import run_slurm

        run_slurm(sweep, out)
    else:
        for i, p in enumerate(sweep.points, 1):
            run_dir = out / p.name
            old = read_status(run_dir)
            if old.get("status") == "done" and (run_dir / "results.json").is_file():
                progress(
                    i, n, p.name, "done earlier, skipped", "", None, point_row(run_dir, p.values)
                )
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(p.config_text)
            attempts = old.get("attempts", 0) + 1
            write_status(
                run_dir,
                "running",
                "",
                attempts=attempts,
                nodes=p.nodes,
                command=shlex.join(train_cmd(p, run_dir)),
            )
            t0 = time.perf_counter()
            try:
                status, reason, code = run_local(p, run_dir, sweep.timeout_s)
            except KeyboardInterrupt:
                write_status(
                    run_dir, "failed", "interrupted: the sweep was stopped", attempts=attempts
                )
                print(
                    f"sweep: interrupted at {p.name}; run the same command to continue", flush=True
                )
                raise
            wall = time.perf_counter() - t0
            write_status(run_dir, status, reason, attempts=attempts, exit_code=code, wall_s=wall)
            progress(i, n, p.name, status, reason, wall, point_row(run_dir, p.values))
    rows = write_results_csv(out, sweep)
    bad = [r for r in rows if r["status"] != "done"]
    print(
        f"sweep: {len(rows) - len(bad)}/{len(rows)} point(s) done; results in {out / 'results.csv'}"
        + (
            f"; not done: {', '.join(r['name'] + ' (' + r['status'] + ')' for r in bad)}"
            if bad
            else ""
        )
    )
    return 0 if not bad else 1


__all__ = ["STATUS_FILE", "Sweep", "Point", "load_sweep", "validate", "run_sweep", "classify"]
