"""``logging.profile_steps``: torch.profiler over a few optimizer steps of a real run.

    zerotune train configs/x.yaml --set logging.profile_steps=5-7
    tensorboard --logdir RUN_DIR/profile          # the trace (PyTorch profiler plugin)
    cat RUN_DIR/profile/rank0.txt                 # operators by self time over those steps

Steps ``first..last`` (1-based, inclusive) are recorded on every rank: the profiler starts
one step before them (its warm-up step, not recorded), so the first recorded step is a
normal one. Each rank writes its Chrome/TensorBoard trace (``tensorboard_trace_handler``)
and a table of operators by self time over the recorded steps (its first line says how
many) — the work between two steps (logging, the flags' all-reduce, progress) is in it too, since
the profiler records from one ``step()`` call to the next. Off (``None``) costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config's check (parse_steps) runs in the launcher: no torch import
    import torch


def parse_steps(spec: str) -> tuple[int, int]:
    """``"5-7"`` → (5, 7); ``"5"`` → (5, 5). ValueError names what is expected."""
    first, _, last = spec.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise ValueError(
            f"logging.profile_steps={spec!r}: expected FIRST-LAST optimizer steps, e.g. 5-7"
        ) from None
    if a < 2 or b < a:
        raise ValueError(
            f"logging.profile_steps={spec!r}: expected 2 <= FIRST <= LAST (step FIRST-1 is the "
            "profiler's warm-up), e.g. 5-7"
        )
    return a, b


class StepProfiler:
    """Drives ``torch.profiler.profile`` from the loop: ``start(done)`` before the first step of
    this process, ``step(n)`` after optimizer step n, ``stop()`` at the end. The profiler is
    built just before step FIRST-1 (its warm-up) and stopped after step LAST; each step is
    marked ``zerotune.step#N`` (N the optimizer step) in the trace."""

    def __init__(self, spec: str | None, run_dir: Path, rank: int, device: torch.device):
        self.window = parse_steps(spec) if spec else None
        self.out = run_dir / "profile"
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.prof = self.mark = None

    def start(self, done: int) -> None:
        """``done`` optimizer steps are behind this process (a resume); a window whose warm-up
        step is among them records nothing."""
        if self.window and done == self.window[0] - 2:
            self._begin(done)

    def step(self, step: int) -> None:
        if self.window is None:
            return
        if self.prof is None:
            if step == self.window[0] - 2:
                self._begin(step)
            return
        self.prof.step()
        if step >= self.window[1]:
            self.stop()
        else:
            self._mark(step + 1)

    def stop(self) -> None:
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        self._mark(None)
        prof.stop()

    def _begin(self, done: int) -> None:
        import torch

        first, last = self.window
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=0, warmup=1, active=last - first + 1, repeat=1),
            on_trace_ready=self._ready,
        )
        self.prof.start()
        self._mark(done + 1)

    def _mark(self, step: int | None) -> None:
        import torch

        if self.mark is not None:
            self.mark.__exit__(None, None, None)
            self.mark = None
        if step is not None:
            self.mark = torch.profiler.record_function(f"zerotune.step#{step}")
            self.mark.__enter__()

    def _ready(self, prof) -> None:
        import torch

        first, last = self.window
        self.out.mkdir(parents=True, exist_ok=True)
        torch.profiler.tensorboard_trace_handler(str(self.out), worker_name=f"rank{self.rank}")(
            prof
        )
        steps = last - first + 1
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=40)
        (self.out / f"rank{self.rank}.txt").write_text(
            f"optimizer steps {first}-{last} ({steps} recorded, each with the work after the "
            f"step before it); the totals are for all {steps} steps\n{table}\n"
        )
