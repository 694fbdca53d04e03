"""Side effects of the environment: export variables, agree a master, init the process group.

Every helper here also works as one process without a group (rank 0 of 1).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError
from .devices import (
    DS_ACCELERATOR,
    accelerator_warning,
    backend_for_device,
    deepspeed_rank_vars,
    device_index,
    shared_gpu_problem,
    visible_gpu_count,
)
from .env import MASTER_ADDR, MASTER_PORT, DistEnv, detect_env

# Waits on one rank's long work (checkpoint hashing and commit, universal conversion,
# tokenisation, resume verification) run on a gloo side group with this timeout instead of
# the main group's launch.timeout_minutes: they take as long as the files are large, and an
# NCCL collective that times out kills the job.
LONG_WAIT_TIMEOUT = datetime.timedelta(hours=6)
_long_group: Any = None  # the side group (made on every rank of a world > 1)
DEVICE_KEY = "zerotune/device/"  # rendezvous-store keys of the ranks' device records
READ_KEY = "zerotune/device-records-read"  # how many ranks have read them all


# The backend's own timeout is the backstop, a little after the heartbeat watchdog's
# (``trainer.watchdog``, launch.timeout_minutes), which names the stuck rank and its phase
BACKEND_TIMEOUT_MARGIN = datetime.timedelta(minutes=1)
# NCCL: a collective past the process group's timeout aborts the communicator and ends the
# process (instead of hanging in the kernel); the launcher then ends the job
NCCL_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def backend_setup(
    backend: str, timeout_minutes: float
) -> tuple[datetime.timedelta, dict[str, str]]:
    """(the process group's timeout, the variables the backend reads at init) for a backend."""
    timeout = datetime.timedelta(minutes=timeout_minutes) + BACKEND_TIMEOUT_MARGIN
    return timeout, dict(NCCL_ENV) if backend == "nccl" else {}


class AgreedConfigError(ConfigError):
    """A ConfigError that every rank raises with the same text (found from all ranks' records
    before any process group exists): one rank reports it for all."""


def device_for(env: DistEnv) -> torch.device:
    """The one binding rule (``trainer.devices.device_index``); ConfigError if GPUs would be shared."""
    index = device_index(env.local_rank, env.local_world_size, visible_gpu_count())
    return torch.device("cpu") if index is None else torch.device("cuda", index)


_warned: set[str] = set()


def configure_cpu_deepspeed(device: torch.device | None = None) -> None:
    """Keep DeepSpeed from JIT-compiling on CPU (the accelerator, shm-comm op, caches), and
    warn when an inherited ``DS_ACCELERATOR`` contradicts the device (once, on rank 0)."""
    on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
    warning = accelerator_warning(os.environ, on_gpu)
    if warning and warning not in _warned and _is_rank0():
        _warned.add(warning)
        print(f"zerotune: warning: {warning}", file=sys.stderr, flush=True)
    if not on_gpu:
        os.environ.setdefault(DS_ACCELERATOR, "cpu")
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR",
        os.path.join(os.path.expanduser("~"), ".cache", "zerotune", "torch_extensions"),
    )
    try:
        # imported before the process group exists (after a gloo group, its import lets the
        # process abort at exit now and then: "terminate called without an active exception")
        import deepspeed.ops

        # The shm-comm op serves the CPU accelerator only. Its entry in DeepSpeed's table of
        # compatible ops is all that DeepSpeed reads of the table in a training process
        # (deepspeed/comm/torch.py, with .get(NAME, False)); the table itself is probed lazily
        # on first access, by running the compiler for every op (~50 ms): set, not probed.
        if not on_gpu:
            ops = vars(deepspeed.ops)
            if "__compatible_ops__" in ops:  # probed already (another caller read it)
                ops["__compatible_ops__"]["deepspeed_shm_comm"] = False
            else:
                ops["__compatible_ops__"] = {"deepspeed_shm_comm": False}
    except Exception:  # pragma: no cover - deepspeed missing or layout changed
        pass


def _is_rank0() -> bool:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    try:
        return detect_env(os.environ).rank == 0
    except ValueError:
        return True


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


def export_env(env: DistEnv, device: torch.device | None = None) -> DistEnv:
    """Make the torch ``env://`` variables match ``env``; agree a master if needed.

    ``LOCAL_RANK`` becomes the index of ``device`` (DeepSpeed's GPU index, see
    ``trainer.devices``); ``env.local_rank`` keeps the rank's place on its node.
    """
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
            **deepspeed_rank_vars(
                env,
                device.index if device is not None and device.type == "cuda" else None,
                os.environ,
            ),
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
    """Bind the device, export what torch and DeepSpeed read, agree, init the group.

    Every rank first publishes its record (device, GPU UUID, or the problem its device rule or
    backend found) in the rendezvous store and reads everyone's, before any process group
    exists: ranks that would share a GPU, or mix CPU and GPU (gloo on some ranks, nccl on
    others: a group that never forms), all raise the same ``AgreedConfigError`` at once
    instead of hanging. One rank alone raises ConfigError for its own problem.
    """
    timeout = datetime.timedelta(minutes=timeout_minutes)
    device, backend_name, problem = None, None, None
    try:
        device = device_for(env)
        backend_name = backend_for_device(device.type == "cuda", backend)
    except ConfigError as e:
        problem = str(e)
    env = export_env(env, device)
    record = device_record(env, device, problem)
    store = None
    if dist.is_initialized():  # a group made by the caller: exchange over it
        records = all_gather_object(record)
    else:
        store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
        store.set_timeout(timeout)
        records = exchange_records(store, record, env.world_size, timeout)
    problem = shared_gpu_problem(records)
    if problem:
        if store is not None:
            leave_together(store, env.rank, env.world_size, timeout)
        raise (AgreedConfigError if len(records) > 1 else ConfigError)(problem)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        group_timeout, backend_env = backend_setup(backend_name, timeout_minutes)
        for key, value in backend_env.items():
            os.environ.setdefault(key, value)
        dist.init_process_group(
            backend=backend_name,
            store=store,
            rank=env.rank,
            world_size=env.world_size,
            timeout=group_timeout,
        )
    init_long_group()
    return env, device


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def device_record(
    env: DistEnv, device: torch.device | None, problem: str | None = None
) -> dict[str, Any]:
    """What ``shared_gpu_problem`` compares: the physical GPU (UUID) behind this rank's index,
    or the problem that kept this rank from choosing a device or backend."""
    cuda = device is not None and device.type == "cuda"
    return {
        "rank": env.rank,
        "host": socket.gethostname(),
        "device": str(device) if device is not None else None,
        "uuid": gpu_uuid(device) if cuda and not problem else None,
        "problem": problem,
    }


def exchange_records(
    store: dist.Store, record: dict[str, Any], world_size: int, timeout: datetime.timedelta
) -> list[dict[str, Any]]:
    """Every rank's record, in rank order, through the rendezvous store (no process group)."""
    if world_size == 1:
        return [record]
    store.set(f"{DEVICE_KEY}{record['rank']}", json.dumps(record))
    keys = [f"{DEVICE_KEY}{r}" for r in range(world_size)]
    store.wait(keys, timeout)
    return [json.loads(v) for v in store.multi_get(keys)]


def leave_together(
    store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta
) -> None:
    """Before ranks that agreed on a problem exit: rank 0 — whose process hosts the
    rendezvous store under ``env://`` — leaves only once every rank has read the records, so
    no slower rank finds the store gone mid-read (a network error instead of the agreed
    message; seen on a loaded machine). The others leave at once: their reads are done."""
    if world_size == 1:
        return
    done = store.add(READ_KEY, 1)
    deadline = time.monotonic() + timeout.total_seconds()
    while rank == 0 and done < world_size and time.monotonic() < deadline:
        time.sleep(0.01)
        done = store.add(READ_KEY, 0)


def init_long_group(timeout: datetime.timedelta = LONG_WAIT_TIMEOUT) -> None:
    """Create the gloo side group for long waits (collective: every rank calls it once).

    Made on every rank whenever the world has more than one rank, whatever the main backend:
    the rule must not differ between ranks (``new_group`` is a collective), and a gloo main
    group gets the generous timeout this way too. Called by ``init_distributed``;
    ``long_group`` calls it lazily for groups made elsewhere (tests), which is safe because
    every rank reaches a long wait at the same point.
    """
    global _long_group
    if _long_group is None and get_world_size() > 1:
        _long_group = dist.new_group(backend="gloo", timeout=timeout)


def long_group() -> Any:
    """The group for waits that may outlast the collective timeout (None: one rank, no group)."""
    init_long_group()
    return _long_group


def destroy() -> None:
    global _long_group
    _long_group = None
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier(long: bool = False) -> None:
    """``long=True``: some rank may still be busy for a long time (see ``LONG_WAIT_TIMEOUT``)."""
    if get_world_size() > 1:
        if long:
            dist.barrier(group=long_group())
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0, long: bool = False) -> Any:
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=long_group() if long else None)
    return box[0]


def all_gather_object(obj: Any, long: bool = False) -> list[Any]:
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=long_group() if long else None)
    return out


def run_on_rank0(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on rank 0 while the others wait on the long group; every rank
    returns its result. If it raises, every rank raises the same exception (a RuntimeError
    quoting it when it does not pickle) instead of waiting for a timeout."""
    outcome: tuple[str, Any] = ("ok", None)
    error: BaseException | None = None
    if get_rank() == 0:
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except Exception as e:
            error = e
            outcome = ("error", _portable(e))
    status, value = broadcast_object(outcome, long=True)
    if error is not None:
        raise error
    if status == "error":
        raise value
    return value


def _portable(e: BaseException) -> BaseException:
    try:
        return pickle.loads(pickle.dumps(e))
    except Exception:
        return RuntimeError(f"rank 0 failed: {type(e).__name__}: {e}")


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank says True (signals, early stop)."""
    return all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0
