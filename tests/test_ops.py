"""Which AdamW a run gets, and the refusal of JIT builds that cannot succeed: tables over
``BuildEnv`` (what DeepSpeed has pre-built, which compilers exist), so GPU machines with and
without nvcc are described here without one. Faked: the BuildEnv of such machines, and a
GPU for ``build_optimizer`` (it reads the plan only; no step is taken).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from trainer.batch import resolve_batch
from trainer.config import ConfigError, load_config
from trainer.deepspeed_config import build_deepspeed_config
from trainer.engine import build_optimizer
from trainer.ops import (
    BuildEnv,
    build_requirements,
    describe,
    detect_build_env,
    find_cuda_home,
    optimizer_plan,
    parse_nvcc_version,
    read_installed_ops,
    remote,
)

# A fresh GPU machine: pip-installed torch and deepspeed, no CUDA toolkit.
PIP_GPU = BuildEnv(
    deepspeed="0.19.8",
    install_accelerator="cuda",
    prebuilt={"fused_adam": False, "cpu_adam": False},
    torch_cuda="12.4",
    cuda_home=None,
    nvcc=None,
    cxx="/usr/bin/c++",
    ninja=True,
)
TOOLKIT_GPU = BuildEnv(**{**PIP_GPU.__dict__, "cuda_home": "/usr/local/cuda", "nvcc": "12.6"})
WRONG_TOOLKIT_GPU = BuildEnv(**{**TOOLKIT_GPU.__dict__, "nvcc": "11.8"})
PREBUILT_GPU = BuildEnv(**{**PIP_GPU.__dict__, "prebuilt": {"fused_adam": True, "cpu_adam": True}})
# ops pre-built for the CPU accelerator do not load on a GPU (DeepSpeed compares accelerators)
PREBUILT_FOR_CPU = BuildEnv(**{**PREBUILT_GPU.__dict__, "install_accelerator": "cpu"})
NO_CXX = BuildEnv(**{**PIP_GPU.__dict__, "cxx": None})


def cfg(*overrides):
    return load_config(None, list(overrides))


OFFLOAD = ("zero.stage=2", "zero.offload_optimizer=true")
# parameters on the CPU, optimizer on the GPU: DeepSpeed keeps the fp32 partitions and the step
# on the GPU (zero_use_cpu_optimizer reads offload_optimizer only) and would build FusedAdam
OFFLOAD_PARAMS = ("zero.stage=3", "zero.offload_params=true")


@pytest.mark.parametrize(
    "sets, on_gpu, build, ds, fused, problem, note",
    [
        # the default path: nothing is ever compiled
        ((), False, PIP_GPU, False, True, None, None),  # torch's fused AdamW on CPU tensors too
        ((), True, PIP_GPU, False, True, None, None),
        ((), True, PREBUILT_GPU, False, True, None, None),  # one behaviour on every install
        (("train.optimizer_impl=torch",), True, PIP_GPU, False, True, None, None),
        (("engine=ddp", "zero.stage=0"), True, PIP_GPU, False, True, None, None),
        # offload + auto: CPUAdam only when pre-built for this accelerator; else torch, noted
        (OFFLOAD, True, PREBUILT_GPU, True, False, None, None),
        (OFFLOAD, True, PIP_GPU, False, False, None, "several times slower"),
        (OFFLOAD, True, PREBUILT_FOR_CPU, False, False, None, "several times slower"),
        (OFFLOAD, False, PIP_GPU, False, False, None, None),  # CPU training: as before
        # explicit deepspeed: pre-built, buildable (noted), or refused with the fix
        (("train.optimizer_impl=deepspeed",), True, PREBUILT_GPU, True, False, None, None),
        (("train.optimizer_impl=deepspeed",), True, TOOLKIT_GPU, True, False, None, "compiles"),
        (
            ("train.optimizer_impl=deepspeed",),
            True,
            PIP_GPU,
            True,
            False,
            "CUDA_HOME unset and no nvcc",
            None,
        ),
        (
            ("train.optimizer_impl=deepspeed",),
            True,
            WRONG_TOOLKIT_GPU,
            True,
            False,
            "nvcc 11.8 matching torch's CUDA 12.4",
            None,
        ),
        (
            ("train.optimizer_impl=deepspeed", *OFFLOAD),
            True,
            PIP_GPU,
            True,
            False,
            None,
            "compiles",
        ),
        (
            ("train.optimizer_impl=deepspeed", *OFFLOAD),
            True,
            NO_CXX,
            True,
            False,
            "a C++ compiler",
            None,
        ),
        # zerotune submit: the compute nodes' compilers are unknown from the login node
        (("train.optimizer_impl=deepspeed",), True, remote(PIP_GPU), True, False, None, "compiles"),
        # offload_params alone: the GPU rows — fused torch AdamW, never CPUAdam, no note ...
        (OFFLOAD_PARAMS, True, PREBUILT_GPU, False, True, None, None),
        (OFFLOAD_PARAMS, True, PIP_GPU, False, True, None, None),
        ((*OFFLOAD_PARAMS, "train.optimizer_impl=torch"), True, PIP_GPU, False, True, None, None),
        # ... and with optimizer_impl=deepspeed FusedAdam, whose build needs nvcc (not a C++ compiler)
        (
            (*OFFLOAD_PARAMS, "train.optimizer_impl=deepspeed"),
            True,
            PIP_GPU,
            True,
            False,
            "CUDA_HOME unset and no nvcc",
            None,
        ),
        (
            (*OFFLOAD_PARAMS, "train.optimizer_impl=deepspeed"),
            True,
            PREBUILT_GPU,
            True,
            False,
            None,
            None,
        ),
        # both offloads: CPUAdam, as DeepSpeed builds it
        (
            (*OFFLOAD_PARAMS, "zero.offload_optimizer=true"),
            True,
            PREBUILT_GPU,
            True,
            False,
            None,
            None,
        ),
    ],
)
def test_optimizer_plan_table(sets, on_gpu, build, ds, fused, problem, note):
    c = cfg(*sets)
    plan = optimizer_plan(c, on_gpu, build)
    assert (plan.deepspeed, plan.fused) == (ds, fused), plan
    assert plan.problem is None if problem is None else problem in plan.problem
    assert plan.note is None if note is None else note in plan.note
    if plan.deepspeed:  # the op is the one DeepSpeed's engine loads for this config
        assert plan.op == ("cpu_adam" if c.zero.offload_optimizer else "fused_adam"), plan


def test_offload_params_alone_follows_deepspeed_rule():
    """DeepSpeed's own rule, read from its engine: CPUAdam only when offload_optimizer.device
    is cpu/nvme; the generated config for offload_params alone says exactly that."""
    import types

    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for sets in (OFFLOAD_PARAMS, (*OFFLOAD_PARAMS, "zero.offload_optimizer=true"), OFFLOAD):
        c = cfg(*sets)
        ds = build_deepspeed_config(c, resolve_batch(c, 1), on_gpu=True, build=PREBUILT_GPU)
        zero = types.SimpleNamespace(zero_config=DeepSpeedZeroConfig(**ds["zero_optimization"]))
        uses_cpu_adam = DeepSpeedEngine.zero_use_cpu_optimizer(types.SimpleNamespace(_config=zero))
        plan = optimizer_plan(c, True, PREBUILT_GPU)
        assert uses_cpu_adam is c.zero.offload_optimizer, sets
        assert (plan.op == "cpu_adam") is uses_cpu_adam and ("optimizer" in ds) is plan.deepspeed


def test_refusal_names_the_fix():
    plan = optimizer_plan(cfg("train.optimizer_impl=deepspeed"), True, PIP_GPU)
    assert "set train.optimizer_impl=torch" in plan.problem
    assert "DS_BUILD_FUSED_ADAM=1" in plan.problem
    assert "installed_ops['fused_adam']=False" in plan.problem


def test_generated_config_follows_the_plan():
    c = cfg("train.optimizer_impl=deepspeed")
    plan = resolve_batch(c, 2)
    with pytest.raises(ConfigError, match="DS_BUILD_FUSED_ADAM=1"):
        build_deepspeed_config(c, plan, on_gpu=True, build=PIP_GPU)
    assert build_deepspeed_config(c, plan, on_gpu=True, build=PREBUILT_GPU)["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": c.train.lr, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.01},
    }
    c = cfg(*OFFLOAD)
    assert "optimizer" in build_deepspeed_config(c, plan, on_gpu=True, build=PREBUILT_GPU)
    ds = build_deepspeed_config(c, plan, on_gpu=True, build=PIP_GPU)
    assert "optimizer" not in ds and ds["zero_force_ds_cpu_optimizer"] is False  # torch on CPU


def test_user_json_optimizer_gets_the_same_check(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
    c = cfg(f"deepspeed_config={user}")
    with pytest.raises(ConfigError, match='"optimizer" section.*DS_BUILD_FUSED_ADAM'):
        build_deepspeed_config(c, resolve_batch(c, 1), on_gpu=True, build=PIP_GPU)
    build_deepspeed_config(c, resolve_batch(c, 1), on_gpu=True, build=PREBUILT_GPU)


@pytest.mark.parametrize(
    "sets, on_gpu, fused",
    [
        ((), False, True),  # CPU: torch's fused CPU kernel (stepped below)
        ((), True, True),
        (OFFLOAD, True, False),  # its shards live on the CPU
        (OFFLOAD_PARAMS, True, True),  # the fp32 partitions stay on the GPU
        ((*OFFLOAD_PARAMS, "zero.offload_optimizer=true"), True, False),
        (("engine=ddp", "zero.stage=0"), True, True),
    ],
)
def test_build_optimizer_follows_the_plan(sets, on_gpu, fused):
    """Faked: a GPU (on_gpu=True and the BuildEnv of a pip install); torch checks fused
    tensors at step(), which is never taken here."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    plan = optimizer_plan(cfg(*sets), on_gpu, PIP_GPU)
    assert plan.fused is fused and not plan.deepspeed
    opt = build_optimizer(cfg(*sets), model, plan)
    assert isinstance(opt, torch.optim.AdamW)
    assert bool(opt.defaults.get("fused")) is fused
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]  # decay / no-decay kept


def test_read_installed_ops_without_importing_deepspeed(tmp_path):
    (tmp_path / "git_version_info_installed.py").write_text(
        "version='0.19.8'\ngit_hash='x'\ninstalled_ops={'fused_adam': True, 'cpu_adam': False}\n"
        "accelerator_name='cuda'\ntorch_info={'version': '2.5'}\n"
    )
    assert read_installed_ops(tmp_path) == (
        "0.19.8",
        "cuda",
        {"fused_adam": True, "cpu_adam": False},
    )
    assert read_installed_ops(tmp_path / "missing") == (None, "", {})


def test_this_machine_is_read_consistently():
    """The real install here: DeepSpeed without pre-built ops, built for the CPU accelerator."""
    import deepspeed.git_version_info as info

    build = detect_build_env()
    assert build.deepspeed == info.version
    assert dict(build.prebuilt) == dict(info.installed_ops)
    assert build.install_accelerator == info.accelerator_name
    lines = describe(build, on_gpu=False)
    assert lines[1].startswith("op fused_adam: pre-built no")


def test_nvcc_and_cuda_home_rules():
    assert (
        parse_nvcc_version("Cuda compilation tools, release 12.4, V12.4.131\nBuild cuda_12.4")
        == "12.4"
    )
    assert parse_nvcc_version("bash: nvcc: command not found") is None
    assert find_cuda_home({"CUDA_HOME": "/opt/cuda"}) == "/opt/cuda"
    assert find_cuda_home({"CUDA_PATH": "/opt/c"}) == "/opt/c"
    assert find_cuda_home({}, which=lambda _: "/usr/local/cuda-12/bin/nvcc") == "/usr/local/cuda-12"
    assert find_cuda_home({}, which=lambda _: None, exists=lambda _: False) is None
    assert build_requirements("fused_adam", True, TOOLKIT_GPU) == []
    assert build_requirements("cpu_adam", True, NO_CXX) == ["a C++ compiler (c++ / g++, or $CXX)"]


def test_fused_cpu_adamw_steps_cpu_tensors_like_foreach():
    """The CPU default, torch's fused AdamW, really steps CPU tensors (torch raises for a
    device its fused kernel lacks) and lands where foreach AdamW does, within rounding."""
    weights = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        plan = optimizer_plan(cfg(), False, PIP_GPU)
        assert plan.fused
        opt = build_optimizer(cfg(), model, dataclasses.replace(plan, fused=fused))
        assert bool(opt.defaults.get("fused")) is fused
        for _ in range(3):
            model(torch.randn(4, 8)).square().sum().backward()
            opt.step()
            opt.zero_grad()
        weights[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(weights[True], weights[False], atol=1e-6)


def test_cpu_setup_turns_off_the_shm_op_without_probing_every_op():
    """On CPU, DeepSpeed's shm-comm op (a 63 s JIT build at init_distributed) is switched off
    through its table of compatible ops; reading that table first would probe every op by
    running the compiler (~50 ms at each rank's start). A fresh interpreter: no compiler
    runs, the table holds the switch, and DeepSpeed's reader builds no shm op."""
    import subprocess
    import sys

    from conftest import ROOT

    code = """
import subprocess, sys
runs = []
real = subprocess.Popen.__init__
def counted(self, args, *a, **k):
    runs.append(args)
    real(self, args, *a, **k)
subprocess.Popen.__init__ = counted
from trainer.distributed import configure_cpu_deepspeed
configure_cpu_deepspeed()
import deepspeed.ops
from deepspeed.comm.torch import build_shm_op
table = vars(deepspeed.ops)["__compatible_ops__"]
assert table == {"deepspeed_shm_comm": False}, table
assert build_shm_op() is None
assert runs == [], runs
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
