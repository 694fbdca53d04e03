"""Throughput counted, not guessed: what an optimizer step did, how long it took, at what MFU.

Per optimizer step each rank adds the samples and *non-padding* tokens of its micro-batches
(all of them: accumulation included) and its wall time; at a log step the ranks sum samples,
tokens and FLOPs and take the **slowest** rank's time (max, not mean) for the whole window
since the previous log step. So, for a window of ``n`` steps:

    step_time_s   = max over ranks of Σ step seconds / n
    samples_per_s = Σ samples (all ranks) / (n · step_time_s)
    tokens_per_s  = Σ non-padding tokens (all ranks) / (n · step_time_s)
    tflops_per_device = Σ model FLOPs / (n · step_time_s) / world / 1e12
    mfu           = tflops_per_device / peak TFLOP/s of one device

None of these change with gradient accumulation or world size at the same global batch and
data (tests/test_throughput.py). The summary (``results.json["throughput"]``) is the same
over every step this process ran except its first ``warmup`` ones (compile, allocator and
cache warm-up; a resumed run warms up again).

The slowest rank's step time is split into data wait (the loop waiting on the DataLoader), forward,
backward (with ZeRO's gradient reduction hooks) and optimizer (with ZeRO's boundary
reduction / all-gather): ``PhaseTimer`` on CPU is ``perf_counter`` (exact: CPU work is
synchronous); on CUDA it records events and reads them only at log steps, so there is no
extra host-device sync per step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

PHASES = ("data", "forward", "backward", "optimizer")
FIGURES = (
    "step_time_s",
    "samples_per_s",
    "tokens_per_s",
    "samples_per_step",
    "tokens_per_step",
    "attention_seq_len",
    "flops_per_token",
    "tflops_per_device",
    "mfu",
    *(f"{p}_time_s" for p in PHASES),
)


class PhaseTimer:
    """``with timer("forward"): ...`` adds the block's seconds to that phase."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.events: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((phase, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.seconds[phase] += time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last call (CUDA: one sync, here, at a log step)."""
        if self.events:
            torch.cuda.synchronize()
            for phase, start, end in self.events:
                self.seconds[phase] += start.elapsed_time(end) / 1000.0
            self.events.clear()
        out, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
        return out


def sequence_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Non-padding length of each sequence of a micro-batch: from its attention mask, or, in
    a packed row (``data.packing``: no mask), from where its position ids restart at 0."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum(dim=-1)
    positions = batch.get("position_ids")
    if positions is not None:
        flat = positions.reshape(-1)
        starts = torch.nonzero(flat == 0).flatten()
        ends = torch.cat([starts[1:], torch.tensor([flat.numel()], device=starts.device)])
        return ends - starts
    ids = batch["input_ids"]
    return torch.full((ids.shape[0],), ids.shape[-1])


def batch_counts(batch: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(sequences, non-padding tokens, Σ of squared sequence lengths) of one micro-batch."""
    lengths = sequence_lengths(batch).long()
    return int(lengths.numel()), int(lengths.sum()), int((lengths * lengths).sum())


class Window:
    """Running sums of one rank over a log window (or over the whole timed run)."""

    def __init__(self) -> None:
        self.steps = 0
        self.seconds = 0.0
        self.samples = 0
        self.tokens = 0
        self.sq_tokens = 0
        self.phases = dict.fromkeys(PHASES, 0.0)

    def add(
        self, seconds: float, samples: int, tokens: int, sq: int, phases: dict[str, float]
    ) -> None:
        self.steps += 1
        self.seconds += seconds
        self.samples += samples
        self.tokens += tokens
        self.sq_tokens += sq
        for k, v in phases.items():
            self.phases[k] += v


def reduce_window(w: Window, device: torch.device) -> dict[str, float]:
    """Sums over ranks of the counts; the slowest rank's seconds and its phase split."""
    import torch.distributed as dist

    sums = torch.tensor([w.samples, w.tokens, w.sq_tokens], dtype=torch.float64)
    times = torch.tensor([w.seconds, *(w.phases[p] for p in PHASES)], dtype=torch.float64)
    every = [times]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
        sums, times = sums.to(dev), times.to(dev)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        every = [torch.empty_like(times) for _ in range(dist.get_world_size())]
        dist.all_gather(every, times)
    samples, tokens, sq = (float(x) for x in sums.cpu())
    seconds, *phases = (float(x) for x in max(every, key=lambda t: float(t[0])).cpu())
    return {
        "steps": w.steps,
        "seconds": seconds,
        "samples": samples,
        "tokens": tokens,
        "sq_tokens": sq,
        "phases": dict(zip(PHASES, phases)),
    }


class Throughput:
    """The loop's accounting: ``step(...)`` per optimizer step, ``window(...)`` at a log step,
    ``summary(...)`` at the end. ``flops_per_token(seq_len)`` and ``peak`` (TFLOP/s of one
    device, or None) come from trainer.flops / trainer.hardware."""

    def __init__(
        self,
        warmup: int,
        world: int,
        flops_per_token,
        peak: float | None,
        timer: PhaseTimer | None = None,
        peak_source: str = "",
        device_name: str = "",
    ):
        self.warmup, self.world = warmup, world
        self.flops_per_token = flops_per_token
        self.peak, self.peak_source, self.device_name = peak, peak_source, device_name
        self.timer = timer or PhaseTimer(torch.device("cpu"))
        self.steps_run = 0
        self.current = Window()
        self.timed = Window()

    def step(self, seconds: float, micro_batches: list[dict], log: bool) -> int:
        """One optimizer step of this rank: its wall seconds and all its micro-batches; returns
        the step's non-padding tokens on this rank. The phase timer is read at log steps and
        where the warm-up ends (no sync in between)."""
        samples = tokens = sq = 0
        for b in micro_batches:
            n, t, s = batch_counts(b)
            samples, tokens, sq = samples + n, tokens + t, sq + s
        self.steps_run += 1
        take = log or self.steps_run == self.warmup
        phases = self.timer.take() if take else {}
        self.current.add(seconds, samples, tokens, sq, phases)
        if self.steps_run > self.warmup:
            self.timed.add(seconds, samples, tokens, sq, phases)
        return tokens

    def figures(self, r: dict[str, Any]) -> dict[str, Any]:
        """Window (or summary) figures from ``reduce_window``'s sums."""
        steps, seconds = r["steps"], r["seconds"]
        if not steps or seconds <= 0:
            return dict.fromkeys(FIGURES)
        step_time = seconds / steps
        seq_len = r["sq_tokens"] / r["tokens"] if r["tokens"] else 0.0
        fpt = self.flops_per_token(seq_len) if r["tokens"] else None
        tflops = fpt * r["tokens"] / seconds / self.world / 1e12 if fpt is not None else None
        out = {
            "step_time_s": step_time,
            "samples_per_s": r["samples"] / seconds,
            "tokens_per_s": r["tokens"] / seconds,
            "samples_per_step": r["samples"] / steps,
            "tokens_per_step": r["tokens"] / steps,
            "attention_seq_len": seq_len,
            "flops_per_token": fpt,
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak if tflops is not None and self.peak else None,
        }
        out.update({f"{p}_time_s": r["phases"][p] / steps for p in PHASES})
        return out

    def window(self, device: torch.device) -> dict[str, Any]:
        """The log window's figures (a collective: every rank calls it), then a new window."""
        r = reduce_window(self.current, device)
        self.current = Window()
        return self.figures(r)

    def summary(self, device: torch.device) -> dict[str, Any]:
        """The timed steps' figures (a collective)."""
        r = reduce_window(self.timed, device)
        out = self.figures(r)
        out.update(
            mean_step_time_s=out.get("step_time_s"),  # the name results.json had before
            steps_timed=r["steps"],
            warmup_steps_excluded=self.warmup,
            peak_tflops=self.peak,
            peak_source=self.peak_source,
            device=self.device_name,
        )
        return out


# ---- what the figures are measured against ---------------------------------------------------


def device_label(cfg: Any, device: torch.device) -> str:
    """The device name the peak and price tables are keyed by (``scaling.device_name`` wins)."""
    if cfg.scaling.device_name:
        return cfg.scaling.device_name
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def matmul_precision(cfg: Any, device: torch.device) -> str:
    """The peak column a run's matmuls use: bf16 / fp16, or fp32 with TF32 allowed on CUDA."""
    if cfg.precision != "fp32":
        return cfg.precision
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def build_throughput(cfg: Any, model: torch.nn.Module, device: torch.device, world: int):
    """The loop's ``Throughput``: FLOPs per token from the model's config (PEFT: the trainable
    fraction), the peak of one device (a CPU's probe runs on rank 0 only, the others wait, so
    they do not share its cores while it measures)."""
    from .distributed import run_on_rank0
    from .flops import flops_per_token
    from .hardware import peak_tflops

    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    trainable = sum(
        int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad
    )
    fixed = cfg.scaling.flops_per_token
    lm_head = cfg.task == "causal_lm"
    config = model.config

    def per_token(seq_len: float) -> float:
        if fixed is not None:
            return float(fixed)
        return flops_per_token(config, seq_len, trainable / max(1, total), lm_head=lm_head)

    name = device_label(cfg, device)
    peak, source = run_on_rank0(
        peak_tflops, name, matmul_precision(cfg, device), cfg.scaling.peak_tflops_per_device
    )
    return Throughput(
        cfg.logging.warmup_steps_excluded,
        world,
        per_token,
        peak,
        timer=PhaseTimer(device),
        peak_source=source,
        device_name=name,
    )


def cost_figures(
    cfg: Any,
    tp: Throughput,
    summary: dict[str, Any],
    wall_s: float,
    total_steps: int,
) -> dict[str, Any]:
    """``results.json["cost"]``: this run's device-hours and money, $ per 1 M training tokens at
    the measured rate, and the time and money of the configured run (and of
    ``scaling.target_tokens``) at that rate."""
    from .hardware import PRICE_SOURCE, PRICES_AS_OF, price_per_device_hour

    price, source = price_per_device_hour(
        tp.device_name, cfg.scaling.price_per_device_hour, cores=torch.get_num_threads()
    )
    devices = tp.world
    out: dict[str, Any] = {
        "device": tp.device_name,
        "devices": devices,
        "price_per_device_hour": price,
        "price_source": f"{source} ({PRICE_SOURCE})" if source.startswith("table") else source,
        "prices_as_of": PRICES_AS_OF,
        "device_hours": devices * wall_s / 3600.0,
        "run_cost": devices * wall_s / 3600.0 * price if price is not None else None,
    }
    tokens_per_s = summary.get("tokens_per_s")
    step_time = summary.get("step_time_s")
    rate = devices * price / 3600.0 if price is not None else None  # $ per second of the run
    out["cost_per_1m_tokens"] = rate * 1e6 / tokens_per_s if rate and tokens_per_s else None
    if step_time:
        out["configured_run_steps"] = total_steps
        out["configured_run_hours"] = total_steps * step_time / 3600.0
        out["configured_run_cost"] = total_steps * step_time * rate if rate is not None else None
    target = cfg.scaling.target_tokens
    if target and tokens_per_s:
        out["target_tokens"] = target
        out["target_tokens_hours"] = target / tokens_per_s / 3600.0
        out["target_tokens_cost"] = target / tokens_per_s * rate if rate is not None else None
    return out
