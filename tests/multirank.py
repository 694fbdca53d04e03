"""Run a test function on N gloo ranks inside the test process (after OLMo-core's
``run_distributed_test``): no launcher, no torchrun, no re-import.

    from multirank import run_distributed

    def _check(x):                       # runs on every rank, process group ready
        return all_gather_object(get_rank() * x)

    def test_gather():
        assert run_distributed(_check, 2, 10) == [[0, 10], [0, 10]]

Each rank is a forked child (the ``fork`` start method: modules already imported by the
test are reused, so a rank starts in well under a second). It exports ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` (a free port), uses one
torch thread, inits gloo, runs ``fn(*args, **kwargs)``, destroys the group and sends the
(picklable) return value back; ``run_distributed`` returns them in rank order. A rank that
raises fails the test with that rank's traceback; a rank that hangs fails it after
``timeout`` seconds; every child is killed before ``run_distributed`` returns.

Forking is safe because the parent never creates a process group itself (checked; it then
falls back to ``spawn``, which needs ``fn`` importable at module level) and each child sets
torch to one thread before any work. ``ZEROTUNE_TEST_START_METHOD=spawn`` forces spawn (slower:
every rank imports torch, transformers and DeepSpeed again). DeepSpeed in a child uses its CPU accelerator and no
shm-comm op, so nothing is JIT-compiled. Children are not daemonic: DeepSpeed's universal
conversion starts worker pools of its own.
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing as mp
import os
import pickle
import socket
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist

# After one rank failed, how long the others get to report their own error before they are
# killed (they are usually stuck in a collective waiting for the failed one).
GRACE_S = 3.0
# How long ranks that all returned get to exit by themselves before they are killed.
EXIT_S = 30.0


class RankFailure(AssertionError):
    """One or more ranks raised, exited without a result, or hung."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_start_method() -> str:
    """``fork`` unless the parent holds a process group (or CUDA), which a child must not inherit."""
    env = os.environ.get("ZEROTUNE_TEST_START_METHOD")
    if env:
        return env
    if dist.is_available() and dist.is_initialized():
        return "spawn"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return "spawn"
    return "fork"


def use_cpu_deepspeed() -> None:
    """DeepSpeed on its CPU accelerator without JIT builds, also when a GPU is present."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # read when DeepSpeed is first imported
    if "deepspeed" not in sys.modules:
        return
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator, set_accelerator

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if get_accelerator().device_name() != "cpu":  # pragma: no cover - imported on a GPU machine
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        set_accelerator(CPU_Accelerator())


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    timeout: float,
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    conn,
) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
    torch.set_num_threads(1)
    # what the parent had is live for good: gc passes here (ZeRO-3 runs one per engine) need
    # not walk the test process's whole heap again
    gc.freeze()
    use_cpu_deepspeed()
    try:
        dist.init_process_group(
            "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        # plain pickle: torch's multiprocessing pickler would share tensors through file
        # descriptors that vanish with this process
        message = pickle.dumps(("ok", fn(*args, **kwargs)))
    except BaseException:
        message = pickle.dumps(("error", traceback.format_exc()))
    try:
        conn.send_bytes(message)
    finally:
        conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout: float = 120.0,
    start_method: str | None = None,
    **kwargs: Any,
) -> list[Any]:
    """``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; the return values in rank order."""
    method = start_method or default_start_method()
    ctx = mp.get_context(method)
    port = free_port()
    procs, conns = [], []
    for rank in range(world_size):
        recv, send = ctx.Pipe(duplex=False)
        p = ctx.Process(
            target=_rank_main,
            args=(rank, world_size, port, timeout, fn, args, kwargs, send),
            name=f"rank{rank}",
        )
        p.start()
        send.close()
        procs.append(p)
        conns.append(recv)

    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        pending = set(range(world_size))
        while pending:
            now = time.monotonic()
            if now >= deadline:
                break
            waiting = {conns[r]: r for r in pending} | {procs[r].sentinel: r for r in pending}
            for ready in wait(list(waiting), timeout=deadline - now):
                rank = waiting[ready]
                if rank not in pending:
                    continue
                conn = conns[rank]
                if ready is conn or conn.poll():
                    try:
                        status, payload = pickle.loads(conn.recv_bytes())
                    except EOFError:
                        status, payload = "error", None
                    if status == "ok":
                        results[rank] = payload
                    else:
                        errors[rank] = payload or _died(procs[rank])
                else:  # exited without sending anything
                    procs[rank].join(1)
                    errors[rank] = _died(procs[rank])
                pending.discard(rank)
            if errors and pending:
                deadline = min(deadline, time.monotonic() + GRACE_S)
        if pending and not errors:
            errors.update(
                {r: f"hung: no result after {timeout:.0f} s (killed)" for r in sorted(pending)}
            )
    finally:
        # after a clean run the ranks are tearing down (process group, coverage data): let
        # them finish; after a failure they may be stuck in a collective
        exit_by = time.monotonic() + (EXIT_S if len(results) == world_size else 0.0)
        for p in procs:
            p.join(max(0.0, exit_by - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(10)
        for c in conns:
            c.close()
    if errors:
        parts = [f"--- rank {r} of {world_size} ({method}):\n{errors[r]}" for r in sorted(errors)]
        hung = sorted(set(range(world_size)) - set(results) - set(errors))
        if hung:
            parts.append(f"--- ranks {hung}: killed after another rank failed")
        raise RankFailure(f"{fn.__name__} failed on {len(errors)} rank(s)\n" + "\n".join(parts))
    return [results[r] for r in range(world_size)]


def _died(p) -> str:
    code = p.exitcode
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return f"process exited without a result ({how})"
