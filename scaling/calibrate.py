"""Calibrate the step-time model from what was measured: a run directory and ``zerotune doctor``.

A run directory gives its step time (``results.json["throughput"]``, the summary over the
timed steps; ``metrics.jsonl``'s window figures when the summary lacks it), the
non-padding tokens per sample it trained on (tokens/s ÷ samples/s: dynamic padding makes
this far below ``data.max_length`` on short texts), the peak it measured MFU against
(a CPU's matmul probe of the rank's own threads), its world size and ZeRO stage
(``config.yaml``, ``env.json``). The efficiency is what makes the model reproduce that step
time: ``compute FLOPs per rank / (peak × (measured step − modelled communication))``.

Bandwidth: ``zerotune doctor`` prints ``all-reduce … busbw X GB/s``; ``--bandwidth`` takes
the number, or a file holding doctor's output.
"""

from __future__ import annotations

import re
from pathlib import Path

from trainer.config import ConfigError, load_config

from .collect import read_json, window_mean, window_values
from .estimate import (
    Calibration,
    Hardware,
    bandwidth_for,
    comm_bytes,
    device_peak,
    flops_per_step_per_rank,
    global_batch,
    offload_seconds,
)
from .shape import ModelShape

BUSBW = re.compile(r"busbw\s+([0-9.]+)\s*GB/s")


def parse_bandwidth(value: str) -> tuple[float, str]:
    """(GB/s, source) from a number or from a file with ``zerotune doctor``'s output."""
    try:
        gbps = float(value)
    except ValueError:
        path = Path(value)
        if not path.is_file():
            raise ConfigError(
                f"--bandwidth {value!r}: expected GB/s (e.g. 45) or a file holding `zerotune doctor` output"
            ) from None
        found = BUSBW.findall(path.read_text(errors="replace"))
        if found:
            return float(found[-1]), f"zerotune doctor ({path})"
        raise ConfigError(
            f"--bandwidth {value!r}: no 'busbw N GB/s' line of zerotune doctor in it"
        ) from None
    if not gbps > 0:
        raise ConfigError(f"--bandwidth {value!r}: expected a positive number of GB/s")
    return gbps, "given"


def measured(run_dir: Path, timing: str = "mean") -> dict:
    """The figures of a finished run the calibration uses (ConfigError when it has none).

    ``timing``: ``mean`` — the run's summary step time; ``fastest`` — its fastest log window
    after the warm-up: on a machine shared with other work, contention only ever adds time,
    so the fastest window is the closest to the run's own speed (log every step for this).
    """
    results = read_json(run_dir / "results.json")
    env = read_json(run_dir / "env.json")
    if not (run_dir / "config.yaml").is_file() or not env:
        raise ConfigError(
            f"--calibrate {str(run_dir)!r}: not a run directory (config.yaml and env.json missing); "
            "give the directory of a finished `zerotune train`"
        )
    tp = results.get("throughput") or {}
    warmup = tp.get("warmup_steps_excluded", 0)
    step = (
        tp.get("step_time_s")
        or tp.get("mean_step_time_s")
        or window_mean(run_dir, "step_time_s", warmup)
    )
    if timing == "fastest":
        step = min(window_values(run_dir, "step_time_s", warmup), default=None)
    tokens = tp.get("tokens_per_s") or window_mean(run_dir, "tokens_per_s", warmup)
    samples = tp.get("samples_per_s") or window_mean(run_dir, "samples_per_s", warmup)
    if not step:
        raise ConfigError(
            f"--calibrate {str(run_dir)!r}: no step time in results.json or metrics.jsonl (did the run finish?)"
        )
    return {
        "cfg": load_config(run_dir / "config.yaml"),
        "world": env.get("world_size") or results.get("world_size") or 1,
        "step_time_s": float(step),
        "tokens_per_sample": tokens / samples if tokens and samples else None,
        "peak_tflops": tp.get("peak_tflops"),
        "device_name": env.get("device_name", ""),
        "parameters": env.get("parameters"),
        "threads": env.get("torch_threads") or 1,
        "total_steps": results.get("total_steps") or env.get("total_steps"),
    }


def calibrate(
    run_dir: Path, shape: ModelShape, hw: Hardware, timing: str = "mean"
) -> tuple[Calibration, dict]:
    """Efficiency (and tokens per sample) that reproduce the run's measured step time.

    On a CPU the run's own probe replaces this process's, per thread (its ``torch_threads``):
    a rank's peak is its threads' (``estimate.device_peak``), and what matters is that
    calibration and prediction divide by the same peak.
    """
    m = measured(run_dir, timing)
    cfg, world = m["cfg"], m["world"]
    notes = []
    if hw.name == "cpu" and m["peak_tflops"]:
        per_thread = float(m["peak_tflops"]) / m["threads"]
        hw.peak_tflops = per_thread * hw.cores
        hw.peak_source = f"the run's probe ({run_dir}): {per_thread:.3g} TFLOP/s per thread"
    if m["parameters"] and m["parameters"] != shape.parameters:
        notes.append(
            f"the calibration run has {m['parameters']:,} parameters, the estimated model {shape.parameters:,}"
        )
    tokens = m["tokens_per_sample"] or float(cfg.data.max_length)
    glob, accum, _, problem = global_batch(cfg, world)
    if problem:
        raise ConfigError(f"--calibrate {str(run_dir)!r}: {problem}")
    comm = comm_bytes(shape, cfg.precision, cfg.zero.stage, world, accum, cfg.engine) / (
        bandwidth_for(hw, world) * 1e9
    )
    compute = m["step_time_s"] - comm - offload_seconds(shape, cfg, cfg.zero.stage, world, accum)
    if compute <= 0.05 * m["step_time_s"]:
        notes.append(
            f"modelled communication {comm:.3g} s leaves no compute time in the measured step "
            f"{m['step_time_s']:.3g} s: the bandwidth is too low; compute taken as 5 % of the step"
        )
        compute = 0.05 * m["step_time_s"]
    if not hw.peak_tflops:
        raise ConfigError(f"--calibrate: no peak TFLOP/s for {hw.name} ({hw.peak_source})")
    f_rank = flops_per_step_per_rank(shape, tokens, glob, world)
    eff = f_rank / (device_peak(hw, world) * 1e12 * compute)
    cal = Calibration(
        eff,
        m["tokens_per_sample"],
        f"calibrated on {run_dir} (world {world}, ZeRO {cfg.zero.stage}, {timing} step {m['step_time_s']:.4g} s)",
        notes,
    )
    return cal, m
