"""``zerotune doctor``: can these ranks find each other and talk? Checked, not assumed.

    zerotune doctor --nproc-per-node 2                   # spawns 2 local ranks (torch.distributed.run)
    srun -N 2 --ntasks-per-node 4 python -m launcher doctor
    mpirun -np 8 python -m launcher doctor

Every rank reports launcher, rank/world, host, master address and port, backend, device
(the GPU the binding rule of trainer/devices.py gives it), versions and DeepSpeed's
optimizer ops (fused_adam, cpu_adam: pre-built, compatible, and whether a JIT build could
succeed: nvcc / CUDA_HOME, C++ compiler, ninja); rank 0 prints one table. Checks: each rank
has its own GPU, rank 0's host is MASTER_ADDR, all-reduce and all-gather give the right
numbers, versions agree, no inherited DS_ACCELERATOR contradicts the device; then an
all-reduce bandwidth probe.
Exit 0 with "doctor: all checks passed", else 1 with one line per problem.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from trainer.devices import accelerator_warning
from trainer.process import ExitCode

LOOPBACK = {"127.0.0.1", "::1", "localhost"}
RENDEZVOUS_HINT = (
    "doctor: hint: every rank must reach MASTER_ADDR:MASTER_PORT (rank 0's host; check the "
    "firewall and that MASTER_ADDR is the first host of the allocation). On GPU the ranks also "
    "connect to each other over TCP for a gloo side group (long waits) besides NCCL: where a "
    "hostname resolves to an interface the other nodes cannot reach (a management network, "
    "docker0, 127.0.1.1), set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to the interface "
    "that connects the nodes, e.g. export GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0"
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="check the distributed setup: rendezvous, collectives, bandwidth (also under srun/mpirun)",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        help="ranks to spawn on this machine when not started by torchrun/srun/mpirun (default 1)",
    )
    p.add_argument(
        "--size-mb",
        type=float,
        default=32.0,
        help="all-reduce size for the bandwidth probe, MB (default 32)",
    )
    p.add_argument("--iters", type=int, default=5, help="timed all-reduce iterations (default 5)")
    p.set_defaults(func=run)


def run(args) -> int:
    from trainer.env import detect_env

    env = detect_env(os.environ)
    if env.launcher == "single" and args.nproc_per_node > 1:
        return _spawn(args)
    return check_ranks(env, args.size_mb, args.iters)


def _spawn(args) -> int:
    """N local ranks of ``python -m launcher doctor`` under torch's elastic agent."""
    from .spawn import AGENT_SIGNALS, run_torchrun, torchrun_args

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    argv = torchrun_args(
        args.nproc_per_node,
        "launcher",
        ["doctor", "--size-mb", str(args.size_mb), "--iters", str(args.iters)],
        signals_to_handle=AGENT_SIGNALS,
    )
    return run_torchrun(argv, prog="doctor")


def _addresses(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


def master_problem(master_addr: str, hostnames: list[str]) -> str | None:
    """None if rank 0's host (``hostnames[0]``) is MASTER_ADDR; else what is wrong."""
    host = hostnames[0]
    if master_addr in LOOPBACK or master_addr.startswith("127."):
        if len(set(hostnames)) == 1:
            return None  # one node: loopback reaches rank 0
        return f"MASTER_ADDR={master_addr} is a loopback address but the ranks run on {len(set(hostnames))} hosts"
    if master_addr in {host, socket.getfqdn(host)}:
        return None
    master_ips = _addresses(master_addr)
    if not master_ips:
        return f"MASTER_ADDR={master_addr} does not resolve on rank 0's host {host}"
    if master_ips & _addresses(host) or any(_is_local(ip) for ip in master_ips):
        return None
    return (
        f"rank 0 runs on {host} ({', '.join(sorted(_addresses(host))) or 'unresolvable'}) but MASTER_ADDR={master_addr} "
        f"resolves to {', '.join(sorted(master_ips))}: the first host of the allocation must run rank 0"
    )


def _is_local(ip: str) -> bool:
    """True when ``ip`` belongs to this machine (binding to it succeeds)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


def _versions() -> dict[str, str]:
    from trainer.process import versions

    return {
        k: v for k, v in versions().items() if k in ("python", "torch", "deepspeed", "transformers")
    }


def check_ranks(env, size_mb: float, iters: int) -> int:
    import torch

    from trainer.config import ConfigError
    from trainer.devices import backend_for_device
    from trainer.distributed import (
        AgreedConfigError,
        all_gather_object,
        destroy,
        device_for,
        init_distributed,
    )

    if not 0 <= env.rank < env.world_size:
        print(
            f"doctor: FAILED: rank {env.rank} but world size {env.world_size} ({env.launcher}): "
            "the launcher's rank/size variables disagree",
            file=sys.stderr,
        )
        return ExitCode.FAILED
    try:
        device = device_for(env)
    except ConfigError:  # init_distributed reports it, from every rank's record
        device = torch.device("cpu")
    backend = backend_for_device(device.type == "cuda")
    try:
        # before the group exists: importing deepspeed after a gloo group was made lets the
        # process abort at exit now and then ("terminate called without an active exception")
        ops = _ops_lines(device)
        env, device = init_distributed(env, timeout_minutes=2)
    except ConfigError as e:  # device binding (shared, missing or mixed GPUs): the finding
        # agreed from every rank's record: rank 0 reports for all; else each for itself
        if env.rank == 0 or not isinstance(e, AgreedConfigError):
            print(f"doctor: FAILED: rank {env.rank}: {e}", file=sys.stderr)
        destroy()
        return ExitCode.FAILED
    except Exception as e:  # a rendezvous that fails is the finding, not a crash
        print(
            f"doctor: rank {env.rank}: init_process_group({backend}) via {os.environ.get('MASTER_ADDR')}:"
            f"{os.environ.get('MASTER_PORT')} failed: {e}\n{RENDEZVOUS_HINT}",
            file=sys.stderr,
        )
        destroy()
        return ExitCode.FAILED
    try:
        rank, world = env.rank, env.world_size
        me = {
            "rank": rank,
            "local_rank": env.local_rank,
            "host": socket.gethostname(),
            "device": f"{device} {torch.cuda.get_device_name(device)}"
            if device.type == "cuda"
            else "cpu",
            "versions": _versions(),
            "ops": ops,
            "accelerator": accelerator_warning(os.environ, device.type == "cuda"),
        }
        ranks = all_gather_object(me)
        problems: list[str] = []
        if rank == 0:
            problem = master_problem(env.master_addr, [r["host"] for r in ranks])
            if problem:
                problems.append(problem)
            if [r["rank"] for r in ranks] != list(range(world)):
                problems.append(
                    f"ranks reported {[r['rank'] for r in ranks]}, expected 0..{world - 1}"
                )
            problems += sorted({r["accelerator"] for r in ranks if r["accelerator"]})
            for r in ranks[1:]:
                if r["versions"] != ranks[0]["versions"]:
                    problems.append(
                        f"rank {r['rank']} has versions {r['versions']}, rank 0 has {ranks[0]['versions']}"
                    )

        problems += _collectives(rank, world, device)
        bandwidth = _bandwidth(world, device, size_mb, iters)
        all_problems = [p for rank_problems in all_gather_object(problems) for p in rank_problems]
        if rank == 0:
            _report(env, backend, ranks, bandwidth)
            for p in all_problems:
                print(f"doctor: FAILED: {p}")
            if not all_problems:
                print("doctor: all checks passed")
            sys.stdout.flush()
        return ExitCode.FAILED if all_problems else ExitCode.DONE
    finally:
        destroy()


def _ops_lines(device) -> list[str]:
    """DeepSpeed's optimizer ops here: pre-built, compatible, and what a JIT build would need."""
    from trainer.distributed import configure_cpu_deepspeed
    from trainer.ops import compatible_ops, describe, detect_build_env

    # DeepSpeed's accelerator as the trainer picks it (CPU: without probing every op)
    configure_cpu_deepspeed(device)
    try:
        compatible = compatible_ops()
    except ImportError:
        compatible = None
    return describe(detect_build_env(), device.type == "cuda", compatible)


def _collectives(rank: int, world: int, device) -> list[str]:
    import torch
    import torch.distributed as dist

    problems = []
    t = torch.full((1024,), float(rank + 1), dtype=torch.float32, device=device)
    dist.all_reduce(t)
    expect = world * (world + 1) / 2
    if not torch.all(t == expect):
        bad = t[t != expect][0].item()
        problems.append(f"all-reduce returned {bad:g} on rank {rank}, expected {expect:g}")
    parts = [torch.empty(2, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(parts, torch.tensor([rank, rank * rank], dtype=torch.int64, device=device))
    got = [p.tolist() for p in parts]
    if got != [[r, r * r] for r in range(world)]:
        problems.append(
            f"all-gather returned {got} on rank {rank}, expected {[[r, r * r] for r in range(world)]}"
        )
    return problems


def _bandwidth(world: int, device, size_mb: float, iters: int) -> dict[str, float]:
    """Algorithm bandwidth = bytes / time; bus bandwidth = algbw · 2(n-1)/n (ring all-reduce)."""
    import torch
    import torch.distributed as dist

    n = max(1, int(size_mb * 1e6) // 4)
    t = torch.ones(n, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dist.all_reduce(t)  # warm-up: connections, buffers
    sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(t)
    sync()
    seconds = (time.perf_counter() - start) / max(iters, 1)
    algbw = n * 4 / seconds / 1e9
    return {
        "mb": n * 4 / 1e6,
        "ms": seconds * 1e3,
        "algbw": algbw,
        "busbw": algbw * 2 * (world - 1) / world,
    }


def _report(env, backend: str, ranks: list[dict], bw: dict[str, float]) -> None:
    v = ranks[0]["versions"]
    print(
        f"launcher {env.launcher}, world {env.world_size}, master {env.master_addr}:{env.master_port}, backend {backend}"
    )
    print(
        "versions: "
        + ", ".join(
            f"{k} {v[k]}" for k in ("python", "torch", "deepspeed", "transformers") if k in v
        )
    )
    print(f"{'rank':>4} {'local':>5}  {'host':<24} device")
    for r in ranks:
        print(f"{r['rank']:>4} {r['local_rank']:>5}  {r['host']:<24} {r['device']}")
    hosts_by_ops: dict[tuple[str, ...], list[str]] = {}
    for r in ranks:
        hosts = hosts_by_ops.setdefault(tuple(r["ops"]), [])
        if r["host"] not in hosts:
            hosts.append(r["host"])
    for lines, hosts in hosts_by_ops.items():
        print(f"optimizer ops on {', '.join(hosts)}:")
        for line in lines:
            print(f"  {line}")
    print(
        f"all-reduce {bw['mb']:.1f} MB: {bw['ms']:.2f} ms, algbw {bw['algbw']:.2f} GB/s, busbw {bw['busbw']:.2f} GB/s"
    )
