"""Which device a rank trains on, and which backend and accelerator go with it: pure rules.

One rule binds a rank to a GPU, and DeepSpeed is told the same: DeepSpeed 0.19 reads the
``LOCAL_RANK`` variable *as the GPU index* (``engine._set_distributed_vars`` and
``zero.Init`` call ``set_device(int(LOCAL_RANK))``; ``dist.get_local_rank`` is documented as
"local rank (= GPU device ID)"), so the rank exports ``LOCAL_RANK=<device index>``:

    GPUs visible to the rank   ranks on the node   device
    0                          any                 CPU
    ≥ ranks on the node        n                   cuda:<local rank>   (all GPUs visible per task)
    1                          n                   cuda:0              (one GPU bound per task:
                                                                        --gpus-per-task=1, --gpu-bind)
    2 .. ranks − 1             n                   error: ranks would share GPUs

Two ranks on one GPU are an error, never a silent modulo: before spawn (pre-flight) and,
before any process group exists, by comparing every rank's record (device, GPU UUID, or the
problem it found) exchanged through the rendezvous store (``shared_gpu_problem``): so ranks
that disagree — some on CPU, some on GPU, which would pick gloo and nccl and wait for each
other forever — stop together with one message. Side effects (``set_device``, exporting
variables) live in ``trainer.distributed``.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config import ConfigError
from .env import DistEnv

DS_ACCELERATOR = "DS_ACCELERATOR"
ZEROTUNE_REQUIRE_GPU = "ZEROTUNE_REQUIRE_GPU"
# Variables in an sbatch job that say GPUs were requested or allocated (man sbatch, OUTPUT
# ENVIRONMENT VARIABLES: --gpus-per-node, --gpus, --gpus-per-task, --gpus-per-socket; --gres
# shows up as the allocated SLURM_JOB_GPUS / SLURM_GPUS_ON_NODE; Slurm 23+ --tres-per-task),
# each with how its value says "yes": a count above 0, a list of GPU ids, a TRES naming a gpu.
SLURM_GPU_REQUEST_VARS = {
    "SLURM_GPUS_PER_NODE": "count",
    "SLURM_GPUS": "count",
    "SLURM_GPUS_PER_TASK": "count",
    "SLURM_GPUS_PER_SOCKET": "count",
    "SLURM_GPUS_ON_NODE": "count",
    "SLURM_JOB_GPUS": "ids",
    "SLURM_TRES_PER_TASK": "tres",
}
ONE_RANK_PER_GPU = (
    "zerotune runs one rank per GPU: give every rank all of the node's GPUs (srun --gpus-per-node=G "
    "with --ntasks-per-node ≤ G; torchrun / zerotune train --nproc-per-node ≤ G) or exactly one "
    "(srun --gpus-per-task=1)"
)


def visible_gpu_count() -> int:
    """GPUs torch can use in this process (0 without CUDA): the one count every check uses."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_index(local_rank: int, local_world_size: int, visible_gpus: int) -> int | None:
    """The CUDA index this rank uses, ``None`` for CPU; ConfigError when GPUs would be shared."""
    if visible_gpus <= 0:
        return None
    if visible_gpus >= local_world_size and local_rank < visible_gpus:
        return local_rank
    if visible_gpus == 1:
        return 0
    raise ConfigError(
        f"local rank {local_rank} sees {visible_gpus} GPUs but {max(local_world_size, local_rank + 1)} "
        f"ranks run on this node: ranks would share GPUs. {ONE_RANK_PER_GPU}"
    )


def too_many_ranks_problem(
    nproc_per_node: int, gpus: int, whose: str = "this machine has"
) -> str | None:
    """Pre-flight: ranks that a launcher starts with the same GPUs visible to all of them."""
    if gpus and nproc_per_node > gpus:
        return (
            f"--nproc-per-node={nproc_per_node} but {whose} {gpus} GPU(s): use at most {gpus} "
            "(one rank per GPU; ranks never share a GPU)"
        )
    return None


def shared_gpu_problem(ranks: list[Mapping]) -> str | None:
    """``ranks[i]``: ``{"rank", "host", "device", "uuid"}`` of rank i, and ``"problem"`` when
    that rank could not pick a device or backend; what is wrong, if anything.

    A rank's own problem comes first. Two ranks on one host with the same GPU UUID share a GPU
    (e.g. ``srun --gpus-per-node=1 --ntasks-per-node=2``: each task sees one GPU, the same
    one). Ranks on CPU and on GPU in one job cannot work together either (nccl needs a GPU on
    every rank).
    """
    by_problem: dict[str, list[int]] = {}
    for r in ranks:
        if r.get("problem"):
            by_problem.setdefault(r["problem"], []).append(r["rank"])
    if by_problem:
        return "; ".join(
            f"rank(s) {ids} on {', '.join(sorted({r['host'] for r in ranks if r['rank'] in ids}))}: {text}"
            for text, ids in by_problem.items()
        )
    types = {r["rank"]: ("cuda" if r["uuid"] else "cpu") for r in ranks}
    if len(set(types.values())) > 1:
        cpu = sorted(k for k, v in types.items() if v == "cpu")
        return (
            f"rank(s) {cpu} found no GPU while the others use one: every rank of a job must see a GPU "
            "(check CUDA_VISIBLE_DEVICES and the job's GPU request on every node)"
        )
    seen: dict[tuple[str, str], int] = {}
    for r in ranks:
        if not r["uuid"]:
            continue
        key = (r["host"], r["uuid"])
        if key in seen:
            return (
                f"ranks {seen[key]} and {r['rank']} share one GPU ({r['device']}, {r['uuid']}) on {r['host']}: "
                f"{ONE_RANK_PER_GPU}"
            )
        seen[key] = r["rank"]
    return None


def deepspeed_rank_vars(
    env: DistEnv, device_index: int | None, environ: Mapping[str, str]
) -> dict[str, str]:
    """The local-rank variables DeepSpeed reads, set to the device this rank uses.

    ``LOCAL_RANK`` is DeepSpeed's GPU index; on CPU it stays the local rank. DeepSpeed also
    asserts ``OMPI_COMM_WORLD_LOCAL_RANK == LOCAL_RANK`` when the former is set (mpirun), so
    it follows; MPI itself was initialised (if at all) before this and does not read it again.
    """
    value = str(env.local_rank if device_index is None else device_index)
    out = {"LOCAL_RANK": value}
    if "OMPI_COMM_WORLD_LOCAL_RANK" in environ:
        out["OMPI_COMM_WORLD_LOCAL_RANK"] = value
    return out


def backend_problem(requested: str, on_gpu: bool) -> str | None:
    """``launch.backend`` against the device: DeepSpeed's collectives on GPU tensors need nccl."""
    if on_gpu and requested == "gloo":
        return (
            "launch.backend='gloo' on GPU: DeepSpeed's ZeRO collectives (reduce-scatter, all-gather into "
            "a tensor) on CUDA tensors need nccl; use launch.backend=auto (nccl on GPU, gloo on CPU), or "
            "hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPU with gloo"
        )
    if not on_gpu and requested == "nccl":
        return (
            "launch.backend='nccl' without a GPU: nccl moves only CUDA tensors; use launch.backend=auto "
            "(gloo on CPU)"
        )
    return None


def backend_for_device(on_gpu: bool, requested: str = "auto") -> str:
    problem = backend_problem(requested, on_gpu)
    if problem:
        raise ConfigError(problem)
    if requested != "auto":
        return requested
    return "nccl" if on_gpu else "gloo"


def accelerator_warning(environ: Mapping[str, str], on_gpu: bool) -> str | None:
    """An inherited ``DS_ACCELERATOR`` that contradicts the device this rank found."""
    value = environ.get(DS_ACCELERATOR)
    if not value:
        return None
    if on_gpu and value != "cuda":
        return (
            f"{DS_ACCELERATOR}={value} is set in the environment but this rank trains on a GPU: DeepSpeed "
            f"will use its {value} accelerator next to CUDA tensors; unset {DS_ACCELERATOR} (or hide the "
            "GPUs with CUDA_VISIBLE_DEVICES= to train on CPU)"
        )
    if not on_gpu and value != "cpu":
        return (
            f"{DS_ACCELERATOR}={value} is set in the environment but this rank found no GPU: DeepSpeed will "
            f"look for a {value} device that is not there; unset {DS_ACCELERATOR} (zerotune sets cpu itself)"
        )
    return None


def _says_yes(kind: str, value: str) -> bool:
    value = value.strip()
    if kind == "ids":  # "0,1" — GPU 0 is an allocated GPU
        return bool(value)
    if kind == "tres":
        return "gpu" in value
    # counts: "2", "a100:2", "gpu:a100:2"; 0 or empty asks for none
    return bool(value) and value.rsplit(":", 1)[-1] not in {"0", ""}


def requested_gpus(environ: Mapping[str, str]) -> str | None:
    """``NAME=value`` of the variable that says this job needs GPUs, or None.

    ``ZEROTUNE_REQUIRE_GPU=1`` (any value but 0/false/empty) or a Slurm GPU request.
    """
    require = environ.get(ZEROTUNE_REQUIRE_GPU, "").strip().lower()
    if require and require not in {"0", "false", "no"}:
        return f"{ZEROTUNE_REQUIRE_GPU}={environ[ZEROTUNE_REQUIRE_GPU]}"
    for name, kind in SLURM_GPU_REQUEST_VARS.items():
        if _says_yes(kind, environ.get(name, "")):
            return f"{name}={environ[name]}"
    return None


def job_device_check(
    environ: Mapping[str, str],
    visible_gpus: int,
    gpu_names: list[str],
    wants_gpu: str | None,
    torch_build: str = "",
) -> tuple[str, str | None]:
    """(the line a batch job logs about its device, a problem that must stop it or None).

    ``wants_gpu``: why the config itself needs a GPU (e.g. fp16), or None. The job needs GPUs
    when it asked for them (``--gpus-per-node`` etc.), when ``ZEROTUNE_REQUIRE_GPU=1``, or
    when the config needs one; then finding none is an error before any rank starts.
    ``torch_build``: e.g. "torch 2.5.1+cpu (CPU build)", named in the error.
    """
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    where = (
        f"CUDA_VISIBLE_DEVICES={visible if visible is not None else '(unset)'}, "
        f"SLURM_GPUS_ON_NODE={environ.get('SLURM_GPUS_ON_NODE') or '(unset)'}"
    )
    if visible_gpus:
        names = sorted(set(gpu_names))
        return f"device: {visible_gpus} GPU(s) on this node ({', '.join(names)}; {where})", None
    asked = requested_gpus(environ)
    reasons = [r for r in (asked and f"the job asked for GPUs ({asked})", wants_gpu) if r]
    if not reasons:
        return (
            f"device: CPU — this job has no GPU ({where}); request GPUs with --gpus-per-node=N, and set "
            f"{ZEROTUNE_REQUIRE_GPU}=1 to make a missing GPU an error",
            None,
        )
    fixes = []
    if asked and not asked.startswith(ZEROTUNE_REQUIRE_GPU):
        fixes.append(
            "check that this Python's torch is a CUDA build and that the job's GPUs are visible "
            "(nvidia-smi inside the job)"
        )
    else:
        fixes.append(
            "request GPUs (sbatch --gpus-per-node=N, or zerotune submit --gpus-per-node N)"
        )
    if asked and asked.startswith(ZEROTUNE_REQUIRE_GPU):
        fixes.append(f"unset {ZEROTUNE_REQUIRE_GPU} to train on CPU")
    if wants_gpu:
        fixes.append(
            "or change the config to run on CPU (precision=bf16 or fp32, launch.backend=auto)"
        )
    build = f"; {torch_build}" if torch_build else ""
    return (
        f"device: NO GPU on this node ({where})",
        f"torch sees no GPU on this node ({where}{build}), but {'; and '.join(reasons)} — "
        + "; ".join(fixes),
    )


def fp16_problem(precision: str, on_gpu: bool, device_type: str = "cpu") -> str | None:
    """The one rule for fp16 without a GPU (DeepSpeed's loss scaling and torch's GradScaler
    need CUDA): pre-flight, the batch job's check and both engines say it in these words."""
    if precision != "fp16" or on_gpu:
        return None
    return (
        f"precision='fp16' is not supported on this device ({device_type}): "
        "use precision=bf16 (or fp32), e.g. --set precision=bf16"
    )


def config_wants_gpu(precision: str, backend: str = "auto") -> str | None:
    """Why a config cannot run on CPU, or None: a config is a GPU config when it says so."""
    reasons = [fp16_problem(precision, on_gpu=False), backend_problem(backend, on_gpu=False)]
    return " and ".join(r for r in reasons if r) or None
