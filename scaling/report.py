"""``zerotune report DIR``: a sweep's ``results.csv`` → ``report.md``, PNGs and TensorBoard hparams.

    zerotune report runs/sweep-demo
    tensorboard --logdir runs/sweep-demo/tensorboard      # HPARAMS tab: one session per point

Plots (matplotlib, Agg): throughput against world size with the ideal (linear) line from
the smallest point of each series; scaling efficiency against that point —
``(tokens/s per device) / (tokens/s per device at the smallest world)`` — *strong* where
the series keeps the global batch, *weak* where the global batch grows with the world;
per-rank model-state memory by ZeRO stage, predicted beside measured (and the peak); time
against cost per 1 M tokens with its Pareto front (no other point is both faster and
cheaper). A series is the points that share every grid value except the world size
(``launch.nproc_per_node``, ``nodes``) and the global batch.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from .collect import read_results_csv

MIB_KEYS = ("peak_memory_bytes", "model_states_bytes_measured", "model_states_bytes_predicted")
WORLD_KEYS = {"launch.nproc_per_node", "nodes", "train.global_batch_size"}
PNGS = {
    "throughput": "throughput_vs_world_size.png",
    "efficiency": "scaling_efficiency.png",
    "memory": "memory_by_zero_stage.png",
    "cost": "time_vs_cost.png",
}


def _num(v: Any) -> float | None:
    return (
        float(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else None
    )


def series(rows: list[dict], grid_keys: list[str]) -> dict[str, list[dict]]:
    """Points grouped by every grid value but the world-size ones, each sorted by world."""
    keys = [k for k in grid_keys if k not in WORLD_KEYS] or ["zero_stage"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = ", ".join(f"{k.split('.')[-1]}={r.get(k, r.get(k.split('.')[-1]))}" for k in keys)
        groups.setdefault(label, []).append(r)
    return {k: sorted(v, key=lambda r: r["world_size"]) for k, v in groups.items()}


def scaling_kind(points: list[dict]) -> str:
    """strong (global batch fixed), weak (global batch ∝ world) or mixed."""
    globs = {p["global_batch_size"] for p in points}
    if len(globs) == 1:
        return "strong"
    per_rank = {p["global_batch_size"] / p["world_size"] for p in points}
    return "weak" if len(per_rank) == 1 else "mixed"


def efficiency(points: list[dict]) -> list[float]:
    """Per-device throughput relative to the smallest world of the series."""
    base = points[0]["tokens_per_s"] / points[0]["world_size"]
    return [p["tokens_per_s"] / p["world_size"] / base for p in points]


def time_and_cost(r: dict) -> tuple[float, float, str]:
    """(hours per 1 M tokens, cost per 1 M tokens, cost unit): dollars, or device-hours
    where the run had no price."""
    hours = 1e6 / r["tokens_per_s"] / 3600
    if _num(r.get("cost_per_1m_tokens")) is not None:
        return hours, r["cost_per_1m_tokens"], "$"
    return hours, r["world_size"] * hours, "device-hours"


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both time and cost, by time."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _plots(rows: list[dict], groups: dict[str, list[dict]], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (label, pts) in enumerate(groups.items()):
        color = f"C{i}"
        w = [p["world_size"] for p in pts]
        ax.plot(w, [p["tokens_per_s"] for p in pts], "o-", color=color, label=label)
        base = pts[0]["tokens_per_s"] / pts[0]["world_size"]
        ax.plot(w, [base * x for x in w], "--", color=color, alpha=0.5)
    ax.plot([], [], "k--", alpha=0.5, label="ideal (linear from the smallest point)")
    ax.set(xlabel="world size (ranks)", ylabel="tokens / s", title="Throughput against world size")
    ax.set_xticks(sorted({r["world_size"] for r in rows}))
    ax.legend(fontsize=8)
    made["throughput"] = _save(fig, out / PNGS["throughput"])

    kinds = sorted({scaling_kind(p) for p in groups.values() if len(p) > 1})
    if kinds:
        fig, axes = plt.subplots(1, len(kinds), figsize=(6.4 * len(kinds), 4.4), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            for i, (label, pts) in enumerate(groups.items()):
                if len(pts) > 1 and scaling_kind(pts) == kind:
                    ax.plot(
                        [p["world_size"] for p in pts],
                        efficiency(pts),
                        "o-",
                        color=f"C{i}",
                        label=label,
                    )
            ax.axhline(1.0, color="k", ls="--", alpha=0.5)
            what = {
                "strong": "global batch fixed",
                "weak": "global batch ∝ world",
                "mixed": "batch varies",
            }[kind]
            ax.set(
                xlabel="world size",
                ylabel="efficiency vs the smallest point",
                title=f"{kind} scaling ({what})",
            )
            ax.set_ylim(0, max(1.2, ax.get_ylim()[1]))
            ax.legend(fontsize=8)
        made["efficiency"] = _save(fig, out / PNGS["efficiency"])

    mem = sorted(rows, key=lambda r: (r["zero_stage"], r["world_size"], r["name"]))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(mem)), 4.4))
    x = range(len(mem))
    bars = [
        ("model_states_bytes_predicted", "model states, predicted", -0.27),
        ("model_states_bytes_measured", "model states, measured", 0.0),
        ("peak_memory_bytes", "peak memory (rank max)", 0.27),
    ]
    for key, label, dx in bars:
        ax.bar(
            [i + dx for i in x], [(_num(r.get(key)) or 0) / 2**20 for r in mem], 0.27, label=label
        )
    ax.set_xticks(
        list(x), [f"{r['name']}\nZeRO {r['zero_stage']}" for r in mem], fontsize=7, rotation=30
    )
    ax.set(ylabel="MiB per rank", title="Per-rank memory by ZeRO stage")
    ax.legend(fontsize=8)
    made["memory"] = _save(fig, out / PNGS["memory"])

    tc = [time_and_cost(r) for r in rows]
    front = pareto([(t, c) for t, c, _ in tc])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.scatter([t for t, _, _ in tc], [c for _, c, _ in tc], color="C0")
    for r, (t, c, _) in zip(rows, tc):
        ax.annotate(r["name"], (t, c), fontsize=7, xytext=(3, 3), textcoords="offset points")
    f = sorted(front, key=lambda i: tc[i][0])
    ax.step([tc[i][0] for i in f], [tc[i][1] for i in f], "r-", where="post", label="Pareto front")
    ax.scatter([tc[i][0] for i in f], [tc[i][1] for i in f], color="r", zorder=3)
    unit = tc[0][2] if tc else "$"
    ax.set(
        xlabel="hours per 1 M tokens", ylabel=f"{unit} per 1 M tokens", title="Time against cost"
    )
    ax.legend(fontsize=8)
    made["cost"] = _save(fig, out / PNGS["cost"])
    return made


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def write_hparams(rows: list[dict], grid_keys: list[str], out: Path) -> Path:
    """``out/tensorboard/<point>/``: an hparams session per point (TensorBoard's HPARAMS tab)."""
    from torch.utils.tensorboard import SummaryWriter

    root = out / "tensorboard"
    metrics = ["tokens_per_s", "samples_per_s", "step_time_s", "mfu", "tflops_per_device", "peak_memory_bytes",
               "model_states_bytes_measured", "cost_per_1m_tokens"]  # fmt: skip
    for r in rows:
        logdir = root / r["name"]
        shutil.rmtree(logdir, ignore_errors=True)  # a report written again replaces its own
        hp = {
            k: r.get(k)
            for k in [
                "world_size",
                "zero_stage",
                "precision",
                "micro_batch_size",
                "global_batch_size",
                *grid_keys,
            ]
        }
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hp.items()}
        values = {f"sweep/{m}": float(r[m]) for m in metrics if _num(r.get(m)) is not None}
        with SummaryWriter(log_dir=str(logdir)) as w:
            w.add_hparams(hp, values, run_name=".")
    return root


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def write_report(out: Path) -> Path:
    """Plots, hparams and ``out/report.md``; returns the report's path."""
    import json

    rows = read_results_csv(out / "results.csv")
    meta = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else {}
    grid_keys = meta.get("grid_keys", [])
    done = [r for r in rows if r["status"] == "done" and _num(r.get("tokens_per_s"))]
    groups = series(done, grid_keys)
    made = _plots(done, groups, out) if done else {}
    write_hparams(done, grid_keys, out)
    lines = [f"# Scaling report: {out.name}", ""]
    lines += [f"Base config `{meta.get('base') or 'demo'}`, grid over {', '.join(f'`{k}`' for k in grid_keys) or '—'}; "
              f"{len(done)} of {len(rows)} points done. Made by `zerotune report {out}` from `results.csv`.", ""]  # fmt: skip
    lines += ["| point | status | world | ZeRO | micro × accum | step s | tokens/s | TFLOP/s/dev | MFU | peak MiB | states MiB meas. / pred. | $/1M tokens |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        mib = {k: _fmt(r[k] / 2**20) if _num(r.get(k)) else "—" for k in MIB_KEYS}
        mfu = f"{100 * r['mfu']:.2f} %" if _num(r.get("mfu")) is not None else "—"
        status = r["status"] + (f" ({r['reason']})" if r.get("reason") else "")
        lines.append(
            f"| {r['name']} | {status} | {_fmt(r['world_size'])} | {_fmt(r['zero_stage'])} | "
            f"{_fmt(r['micro_batch_size'])} × {_fmt(r['grad_accum'])} | {_fmt(r['step_time_s'])} | {_fmt(r['tokens_per_s'])} | "
            f"{_fmt(r['tflops_per_device'])} | {mfu} | {mib['peak_memory_bytes']} | "
            f"{mib['model_states_bytes_measured']} / {mib['model_states_bytes_predicted']} | {_fmt(r['cost_per_1m_tokens'])} |"
        )
    lines += ["", "## Scaling", ""]
    for label, pts in groups.items():
        if len(pts) > 1:
            eff = ", ".join(
                f"{p['world_size']} ranks {e:.2f}" for p, e in zip(pts, efficiency(pts))
            )
            lines.append(
                f"- {label} — {scaling_kind(pts)} scaling efficiency vs {pts[0]['world_size']} rank(s): {eff}"
            )
    for key in ("throughput", "efficiency", "memory", "cost"):
        if key in made:
            lines += ["", f"![{key}]({made[key]})"]
    if done:
        tc = [time_and_cost(r) for r in done]
        front = pareto([(t, c) for t, c, _ in tc])
        lines += [
            "",
            "## Cost",
            "",
            f"| point | hours per 1 M tokens | {tc[0][2]} per 1 M tokens | Pareto |",
            "| --- | --- | --- | --- |",
        ]
        for i, (r, (t, c, _)) in enumerate(zip(done, tc)):
            lines.append(f"| {r['name']} | {t:.4g} | {c:.4g} | {'yes' if i in front else ''} |")
        if tc[0][2] != "$":
            lines.append("\nNo device price in the runs' results: cost is in device-hours.")
    lines += [
        "",
        f"TensorBoard: `tensorboard --logdir {out / 'tensorboard'}` (HPARAMS tab, one session per point).",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
