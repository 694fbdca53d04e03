"""Metric sinks behind one small protocol; rank gating lives here, not in the loop.

``build_sinks(rank, ...)`` returns TensorBoard + JSONL + console sinks on rank 0 and none
elsewhere, so the loop just calls ``sinks.log(step, {...})`` on every rank.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Protocol


class MetricSink(Protocol):
    def log(self, step: int, values: dict[str, Any], kind: str) -> None: ...
    def log_hparams(self, hparams: dict[str, Any], final: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class JsonlSink:
    """One JSON object per log step and per evaluation: ``{"step", "kind", "time", ...}``."""

    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def log(self, step, values, kind):
        self.f.write(
            json.dumps(
                {"step": step, "kind": kind, "time": round(time.time(), 3), **values}, default=float
            )
            + "\n"
        )

    def log_hparams(self, hparams, final):
        pass

    def close(self):
        self.f.close()


class TensorBoardSink:
    """Tags are ``<kind>/<name>``: ``train/loss``, ``eval/accuracy``, ``checkpoint/save_seconds``."""

    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logdir))

    def log(self, step, values, kind):
        for k, v in _scalars(values).items():
            self.writer.add_scalar(f"{kind}/{k}", v, step)
        self.writer.flush()

    def log_hparams(self, hparams, final):
        flat = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()
        }
        self.writer.add_hparams(
            flat, {f"hparam/{k}": v for k, v in _scalars(final).items()}, run_name="."
        )
        self.writer.flush()

    def close(self):
        self.writer.close()


class ConsoleSink:
    """A tqdm bar for training and one line per evaluation."""

    def __init__(self, total_steps: int, initial: int, enabled: bool):
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        self.bar = tqdm(
            total=total_steps,
            initial=initial,
            desc="train",
            unit="step",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5 if tty else 30.0,  # log files get a line every 30 s
        )

    def advance(self, step: int) -> None:
        self.bar.update(step - self.bar.n)

    def log(self, step, values, kind):
        if kind == "train":
            self.advance(step)
            shown = {k: values[k] for k in ("loss", "lr", "samples_per_s") if k in values}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif kind in ("eval", "test"):
            shown = " ".join(
                f"{k}={v:.4f}"
                for k, v in _scalars(values).items()
                if k not in {"num_samples", "num_tokens"}
            )
            self.bar.write(f"[{kind} step {step}] {shown}", file=sys.stderr)

    def log_hparams(self, hparams, final):
        pass

    def close(self):
        self.bar.close()


class Sinks:
    """Fan-out to every sink; empty on ranks other than 0."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        for s in self.sinks:
            s.log(step, values, kind)

    def progress(self, step: int) -> None:
        for s in self.sinks:
            if isinstance(s, ConsoleSink):
                s.advance(step)

    def log_hparams(self, hparams: dict[str, Any], final: dict[str, float]) -> None:
        for s in self.sinks:
            s.log_hparams(hparams, final)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def build_sinks(
    rank: int,
    run_dir: Path,
    tensorboard: bool,
    progress_bar: bool,
    total_steps: int,
    initial_step: int,
) -> Sinks:
    if rank != 0:
        return Sinks([])
    sinks: list[MetricSink] = [JsonlSink(run_dir / "metrics.jsonl")]
    if tensorboard:
        sinks.append(TensorBoardSink(run_dir / "tensorboard"))
    sinks.append(ConsoleSink(total_steps, initial_step, progress_bar))
    return Sinks(sinks)


def memory_stats(device) -> dict[str, float]:
    import torch

    out: dict[str, float] = {}
    try:
        import psutil

        out["host_rss_gb"] = psutil.Process().memory_info().rss / 2**30
    except Exception:
        pass
    if device.type == "cuda":
        out["gpu_mem_allocated_gb"] = torch.cuda.memory_allocated(device) / 2**30
        out["gpu_mem_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out
