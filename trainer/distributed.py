"""Side effects of the environment: export variables, agree a master, init the process group.

Every helper here also works as one process without a group (rank 0 of 1).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from .env import MASTER_ADDR, MASTER_PORT, DistEnv


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def configure_cpu_deepspeed() -> None:
    """Keep DeepSpeed from JIT-compiling on CPU: the accelerator, shm-comm op and caches."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR",
        os.path.join(os.path.expanduser("~"), ".cache", "zerotune", "torch_extensions"),
    )
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # pragma: no cover - deepspeed missing or layout changed
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _agree_master_over_mpi(env: DistEnv) -> tuple[str, int]:
    """Rank 0 picks its address and a free port; mpi4py broadcasts them (no fixed 29500)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(
            "started by mpirun without MASTER_ADDR: install mpi4py (pip install 'zerotune[mpi]') "
            "or export MASTER_ADDR and MASTER_PORT to every rank"
        ) from e
    comm = MPI.COMM_WORLD
    payload = None
    if comm.Get_rank() == 0:
        host = socket.gethostname()
        try:
            addr = socket.gethostbyname(host)
        except OSError:
            addr = "127.0.0.1"
        payload = (addr, free_port())
    agreed = comm.bcast(payload, root=0)
    # done with MPI: finalizing now lets mpirun abort the job promptly if a rank fails later,
    # instead of waiting for the collective timeout
    MPI.Finalize()
    return agreed


def export_env(env: DistEnv) -> DistEnv:
    """Make the torch ``env://`` variables match ``env``; agree a master if needed."""
    addr, port = env.master_addr, env.master_port
    if env.launcher == "mpi" and (addr is None or port is None):
        addr, port = _agree_master_over_mpi(env)
    if addr is None:
        addr = "127.0.0.1"
    if port is None:
        port = free_port()
    os.environ.update(
        {
            "RANK": str(env.rank),
            "LOCAL_RANK": str(env.local_rank),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_WORLD_SIZE": str(env.local_world_size),
            MASTER_ADDR: addr,
            MASTER_PORT: str(port),
        }
    )
    return DistEnv(**{**env.as_dict(), "master_addr": addr, "master_port": port})


def init_distributed(
    env: DistEnv, backend: str = "auto", timeout_minutes: int = 30
) -> tuple[DistEnv, torch.device]:
    env = export_env(env)
    device = device_for(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend_for(device, backend),
            init_method="env://",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return env, device


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank says True (signals, early stop)."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0
