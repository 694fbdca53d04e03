"""Shared helpers: run the real CLI in a subprocess (real torch.distributed.run, real
DeepSpeed, gloo on CPU) and read back what a run left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def cheap_rendezvous_event_names():
    """``zerotune train`` refused by its pre-flight in this process (the ranks start beside
    the data checks: launcher/overlap.py) runs torch's elastic agent inside pytest, and its
    rendezvous names each event it logs after its caller through ``inspect.stack()``,
    reading the source of every frame of pytest's deep stack: ~1.2 s per launch here, 0.08 s
    in a real launcher. The same name, read from the frame itself."""
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    def method_name(depth: int = 2) -> str:
        try:
            return sys._getframe(depth).f_code.co_name
        except ValueError:
            return "no_method_name"

    patch = pytest.MonkeyPatch()
    patch.setattr(dynamic_rendezvous, "get_method_name", method_name)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zerotune-cache")


def base_env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "ZEROTUNE_CACHE": str(cache),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
        }
    )
    env.pop("ZEROTUNE_FAULT", None)
    env.update(extra)
    return env


def zerotune(
    args: list[str], cache: Path, cwd: Path | None = None, timeout: int = 600, **env_extra: str
):
    """Run ``python -m launcher ARGS`` as a user would run ``zerotune ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=cwd or ROOT,
        env=base_env(cache, **env_extra),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_tiny(run_dir: str, cache: str, overrides: list[str], resume: str = "auto") -> int:
    """One rank of a run of the tiny config, in this process (``run_distributed(train_tiny,
    world, run_dir, cache, overrides)``): TensorBoard off, the data cache shared."""
    import torch

    from trainer.config import load_config
    from trainer.env import detect_env
    from trainer.loop import Trainer
    from trainer.process import quiet_libraries

    quiet_libraries()
    sets = [f"data.cache_dir={cache}", "logging.tensorboard=false", *overrides]
    cfg = load_config(TINY, sets)
    env = detect_env(os.environ)
    return int(Trainer(cfg, env, torch.device("cpu"), Path(run_dir), resume).run())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """step → logged train loss; a step logged twice (crash, resume) keeps the later value."""
    out = {}
    for rec in read_jsonl(run_dir / "metrics.jsonl"):
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def check_ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )


class Runs:
    """Tiny-config training runs shared by every test module of the session (each one
    costs ~20 s, mostly start-up), keyed by name."""

    def __init__(self, factory, cache: Path):
        self.factory, self.cache, self.done = factory, cache, {}

    def get(self, name: str, *overrides: str, nproc: int | None = None) -> Path:
        if name not in self.done:
            run_dir = self.factory.mktemp(name) / "run"
            args = ["train", str(TINY), "--run-dir", str(run_dir)]
            args += ["--nproc-per-node", str(nproc)] if nproc else []
            proc = zerotune(args + [x for o in overrides for x in ("--set", o)], self.cache)
            check_ok(proc)
            self.done[name] = run_dir
        return self.done[name]

    def stage(self, stage: int) -> Path:
        """The uninterrupted 2-rank reference run at a ZeRO stage."""
        return self.get(f"zero{stage}", f"zero.stage={stage}")


@pytest.fixture(scope="session")
def runs(tmp_path_factory, cache_dir) -> Runs:
    return Runs(tmp_path_factory, cache_dir)


def mean_loss(losses: dict[int, float], a: int, b: int) -> float:
    return sum(losses[s] for s in range(a, b + 1)) / (b - a + 1)
