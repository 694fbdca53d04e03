"""Which AdamW a run uses, and whether DeepSpeed would have to compile it first.

DeepSpeed's own optimizers are C++/CUDA extensions: pre-built only when DeepSpeed was
installed with ``DS_BUILD_FUSED_ADAM=1`` / ``DS_BUILD_CPU_ADAM=1`` (``installed_ops`` in
``deepspeed/git_version_info_installed.py``), otherwise JIT-compiled on first use — which
needs ``nvcc`` matching torch's CUDA for FusedAdam (a pip-installed torch ships none) and a
C++ compiler for CPUAdam, plus ninja, and takes minutes behind a file lock. So the default
path never compiles:

    train.optimizer_impl  device  zero.offload_optimizer  optimizer
    auto | torch          CPU     no       torch AdamW(fused=True)           no build: a torch kernel
    auto | torch          CPU     yes      torch AdamW (foreach)
    auto | torch          GPU     no       torch AdamW(fused=True)           no build: a torch kernel
    auto                  GPU     yes      DeepSpeed CPUAdam if pre-built,
                                           else torch AdamW on the CPU shards (correct, slower; noted)
    torch                 GPU     yes      torch AdamW on the CPU shards (noted)
    deepspeed             GPU     no       DeepSpeed FusedAdam                build unless pre-built
    deepspeed             any     yes      DeepSpeed CPUAdam                  build unless pre-built
    deepspeed             CPU     no       DeepSpeed's CPU FusedAdam          build unless pre-built

Only ``zero.offload_optimizer`` counts, as in DeepSpeed (``zero_use_cpu_optimizer``: CPUAdam
when ``offload_optimizer.device`` is cpu/nvme, else FusedAdam): ``zero.offload_params``
alone moves the 16-bit parameters to the CPU but keeps the fp32 partitions and the
optimizer step on the GPU, so it gets the GPU row. This is the one rule: the DeepSpeed
config (``"optimizer"`` section or not) and the torch optimizer the engines build
(``trainer.engine.build_optimizer``) both follow ``optimizer_plan``.

A DeepSpeed optimizer that would need a build on a machine without its compiler is a
config error before any rank starts, with the fix named. ``detect_build_env`` reads; the
rest are pure functions of a ``BuildEnv``.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import RunConfig

OPS = ("fused_adam", "cpu_adam")
BUILD_VARS = {"fused_adam": "DS_BUILD_FUSED_ADAM", "cpu_adam": "DS_BUILD_CPU_ADAM"}


@dataclass(frozen=True)
class BuildEnv:
    """What a DeepSpeed op needs, as found on one machine."""

    deepspeed: str | None  # version; None: not installed
    install_accelerator: str  # the accelerator DeepSpeed's ops were built for ("cuda", "cpu", "")
    prebuilt: Mapping[str, bool] = field(default_factory=dict)  # installed_ops
    torch_cuda: str | None = None  # torch.version.cuda
    cuda_home: str | None = None  # as torch.utils.cpp_extension finds it
    nvcc: str | None = None  # "12.4" when CUDA_HOME/bin/nvcc runs, else None
    cxx: str | None = None  # host C++ compiler
    ninja: bool = False
    remote: bool = False  # describes another machine's install (zerotune submit): compilers unknown

    def is_prebuilt(self, op: str, on_gpu: bool) -> bool:
        """DeepSpeed loads a pre-built op only if it was built for the accelerator in use."""
        return bool(self.prebuilt.get(op)) and self.install_accelerator == (
            "cuda" if on_gpu else "cpu"
        )


@dataclass(frozen=True)
class OptimizerPlan:
    deepspeed: bool  # DeepSpeed builds the optimizer from its config's "optimizer" section
    fused: bool  # torch AdamW(fused=True)
    op: str | None  # the DeepSpeed op it loads (fused_adam / cpu_adam), None for torch
    description: str
    problem: str | None = None  # refuse: a JIT build that cannot succeed here
    note: str | None = None  # worth saying before the run (slow, or compiles once)


def _cuda_fix(op: str) -> str:
    return (
        f"set train.optimizer_impl=torch (torch's fused AdamW, nothing to build), or install deepspeed with "
        f"{BUILD_VARS[op]}=1 (pip install deepspeed --no-build-isolation, where a matching CUDA toolkit exists)"
    )


def build_requirements(op: str, on_gpu: bool, build: BuildEnv) -> list[str]:
    """What is missing to JIT-build ``op`` here (empty: it can be built)."""
    missing = []
    if op == "fused_adam" and on_gpu:
        if build.nvcc is None:
            missing.append(
                "a CUDA compiler: none found ("
                + (
                    f"CUDA_HOME={build.cuda_home} has no working bin/nvcc"
                    if build.cuda_home
                    else "CUDA_HOME unset and no nvcc on PATH"
                )
                + ")"
            )
        elif build.torch_cuda and build.nvcc.split(".")[0] != build.torch_cuda.split(".")[0]:
            missing.append(
                f"nvcc {build.nvcc} matching torch's CUDA {build.torch_cuda} (DeepSpeed refuses another major version)"
            )
    elif build.cxx is None:
        missing.append("a C++ compiler (c++ / g++, or $CXX)")
    if not build.ninja:
        missing.append("ninja (pip install ninja)")
    return missing


def optimizer_plan(cfg: RunConfig, on_gpu: bool, build: BuildEnv | None = None) -> OptimizerPlan:
    """Which AdamW this config gets on this device (the table above). ``build``: what the
    machine has pre-built and can compile; read here (``detect_build_env``) only when a
    DeepSpeed optimizer is in question."""
    impl = cfg.train.optimizer_impl
    # DeepSpeed's own rule (zero_use_cpu_optimizer): the optimizer offload alone decides
    offload = cfg.zero.offload_optimizer
    if cfg.engine == "ddp":  # DDP has no DeepSpeed optimizer
        return OptimizerPlan(False, True, None, "torch AdamW (fused)")
    if impl == "deepspeed" or (offload and impl == "auto" and on_gpu):
        build = build or detect_build_env()
    if offload:
        op = "cpu_adam"
        use_ds = impl == "deepspeed" or (
            impl == "auto" and on_gpu and build.is_prebuilt(op, on_gpu)
        )
    else:
        op = "fused_adam"
        use_ds = impl == "deepspeed"
    if not use_ds:
        note = None
        if offload and on_gpu:
            how = "pre-built op not found" if impl == "auto" else "train.optimizer_impl=torch"
            note = (
                f"zero.offload_optimizer: torch AdamW steps the CPU shards ({how}): correct but several times slower "
                "than DeepSpeed's CPUAdam; for CPUAdam install deepspeed with DS_BUILD_CPU_ADAM=1, or set "
                "train.optimizer_impl=deepspeed to JIT-build it once with the host C++ compiler"
            )
        # torch's fused AdamW runs on CPU tensors too: 5.5x faster than foreach for
        # MiniLM's 22.6M parameters on this CPU (docs/PERFORMANCE.md)
        fused = not offload
        return OptimizerPlan(
            False, fused, None, "torch AdamW" + (" (fused)" if fused else ""), note=note
        )
    name = {"fused_adam": "FusedAdam", "cpu_adam": "CPUAdam"}[op]
    where = "GPU" if on_gpu else "CPU"
    if build.is_prebuilt(op, on_gpu):
        return OptimizerPlan(True, False, op, f"DeepSpeed {name} (pre-built {op})")
    missing = [] if build.remote else build_requirements(op, on_gpu, build)
    why = (
        f"train.optimizer_impl={impl} with zero.offload_optimizer on {where} uses DeepSpeed's {name}"
        if offload
        else f"train.optimizer_impl={impl} on {where} uses DeepSpeed's {name}"
    )
    state = (
        f"its op {op!r} is not pre-built in this DeepSpeed "
        f"(installed_ops[{op!r}]={bool(build.prebuilt.get(op))}, built for {build.install_accelerator or 'no accelerator'})"
    )
    if missing:
        fix = (
            _cuda_fix(op)
            if op == "fused_adam" and on_gpu
            else (
                f"set train.optimizer_impl=auto or torch, or install deepspeed with {BUILD_VARS[op]}=1, "
                "or install the missing tools"
            )
        )
        return OptimizerPlan(
            True,
            False,
            op,
            f"DeepSpeed {name} (JIT build)",
            problem=f"{why}; {state} and a JIT build needs {' and '.join(missing)}: {fix}",
        )
    return OptimizerPlan(
        True,
        False,
        op,
        f"DeepSpeed {name} (JIT build)",
        note=f"{why}; {state}: the first start compiles it (minutes, once per TORCH_EXTENSIONS_DIR)",
    )


# --------------------------------------------------------------------------------------
# Reading this machine
# --------------------------------------------------------------------------------------


def read_installed_ops(package_dir: Path) -> tuple[str | None, str, dict[str, bool]]:
    """(version, accelerator, installed_ops) from ``git_version_info_installed.py`` without
    importing deepspeed (whose import picks an accelerator and may touch CUDA)."""
    path = package_dir / "git_version_info_installed.py"
    values: dict[str, object] = {}
    if path.is_file():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if isinstance(target, ast.Name):
                    with contextlib.suppress(ValueError):
                        values[target.id] = ast.literal_eval(node.value)
    ops = values.get("installed_ops")
    return (
        str(values["version"]) if "version" in values else None,
        str(values.get("accelerator_name", "")),
        {k: bool(v) for k, v in ops.items()} if isinstance(ops, dict) else {},
    )


def parse_nvcc_version(output: str) -> str | None:
    """``nvcc --version`` → ``"12.4"``."""
    m = re.search(r"release (\d+)\.(\d+)", output)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def find_cuda_home(
    environ: Mapping[str, str], which=shutil.which, exists=os.path.exists
) -> str | None:
    """torch.utils.cpp_extension's rule, which DeepSpeed's op builder uses."""
    home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(nvcc))
    return "/usr/local/cuda" if exists("/usr/local/cuda") else None


def _nvcc_version(cuda_home: str | None) -> str | None:
    if not cuda_home:
        return None
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvcc_version(out)


@functools.lru_cache(maxsize=1)
def detect_build_env() -> BuildEnv:
    import torch

    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.origin:
        version, accelerator, prebuilt = None, "", {}
    else:
        version, accelerator, prebuilt = read_installed_ops(Path(spec.origin).parent)
    cuda_home = find_cuda_home(os.environ)
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    try:
        import ninja  # noqa: F401  (the pip package puts the binary next to the interpreter)

        has_ninja = True
    except ImportError:
        has_ninja = shutil.which("ninja") is not None
    return BuildEnv(
        deepspeed=version,
        install_accelerator=accelerator,
        prebuilt=prebuilt,
        torch_cuda=torch.version.cuda,
        cuda_home=cuda_home,
        nvcc=_nvcc_version(cuda_home),
        cxx=cxx,
        ninja=has_ninja,
    )


def remote(build: BuildEnv) -> BuildEnv:
    """The same install seen from a login node: pre-built ops hold, compilers are unknown."""
    return replace(build, remote=True)


def compatible_ops() -> dict[str, bool]:
    """DeepSpeed's own ``is_compatible()`` for the optimizer ops (imports deepspeed)."""
    from deepspeed.accelerator import get_accelerator

    out = {}
    for op, builder_name in (("fused_adam", "FusedAdamBuilder"), ("cpu_adam", "CPUAdamBuilder")):
        try:
            builder = get_accelerator().create_op_builder(builder_name)
            out[op] = bool(builder is not None and builder.is_compatible(False))
        except Exception:  # a probe that fails means "not compatible", as DeepSpeed treats it
            out[op] = False
    return out


def describe(
    build: BuildEnv, on_gpu: bool, compatible: Mapping[str, bool] | None = None
) -> list[str]:
    """Lines for ``zerotune doctor``: every optimizer op and what a build would need."""
    lines = [
        f"deepspeed {build.deepspeed or 'not installed'}, ops built for "
        f"{build.install_accelerator or 'none'}; torch CUDA {build.torch_cuda or 'none (CPU build)'}; "
        f"CUDA_HOME {build.cuda_home or 'unset'}, nvcc {build.nvcc or 'none'}; "
        f"c++ {build.cxx or 'none'}; ninja {'yes' if build.ninja else 'no'}"
    ]
    for op in OPS:
        missing = build_requirements(op, on_gpu, build)
        compat = (
            "" if compatible is None else f", compatible {'yes' if compatible.get(op) else 'no'}"
        )
        lines.append(
            f"op {op}: pre-built {'yes' if build.is_prebuilt(op, on_gpu) else 'no'}{compat}, JIT build "
            + ("possible" if not missing else f"impossible (needs {' and '.join(missing)})")
        )
    return lines
