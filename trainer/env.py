"""Where am I? A pure function from environment variables to rank/world/master.

Detection order: torchrun → MPI that disagrees with Slurm → Slurm step → MPI → single.
``mpirun`` inside an sbatch job leaves every rank with an inherited ``SLURM_PROCID=0``;
the MPI variables win then. Under ``srun --mpi=pmix`` the ranks carry ``SLURM_PROCID`` and
``PMIX_RANK`` that agree, and Slurm's node list gives a master that needs no agreement.
Side effects (exporting variables, ``init_process_group``) live in ``trainer.distributed``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 17000  # ports stay below Linux's ephemeral range (32768+)


@dataclass(frozen=True)
class DistEnv:
    launcher: str  # torchrun | slurm | mpi | single
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    master_addr: str | None  # None: to be agreed by the ranks (MPI without Slurm)
    master_port: int | None
    job_id: str | None = None
    restart_count: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


# Launcher variables as tables: (rank, local rank, world size, local world size).
MPI_TABLES: dict[str, tuple[str, str | None, str, str | None]] = {
    "openmpi": (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    "mvapich": (
        "MV2_COMM_WORLD_RANK",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_LOCAL_SIZE",
    ),
    "pmix": ("PMIX_RANK", "PMIX_LOCAL_RANK", "PMIX_SIZE", "PMIX_LOCAL_SIZE"),
    "pmi": ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE", "MPI_LOCALNRANKS"),
}
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
SLURM_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NODEID")


def _int(env: Mapping[str, str], key: str | None, default: int | None = None) -> int | None:
    if key is None or key not in env or env[key] == "":
        return default
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``gpu[003-005,9],cpu1`` → ``gpu003``.

    Equivalent to ``scontrol show hostnames $SLURM_JOB_NODELIST | head -1`` without a
    subprocess, so detection stays pure.
    """
    nodelist = nodelist.strip()
    m = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def tasks_on_node(tasks_per_node: str, node: int) -> int | None:
    """Slurm's ``2(x3),1`` (tasks per node, compressed) → the count on ``node`` (0-based).

    Uneven steps (``srun -n 12`` on two 8-GPU nodes: ``8,4``) give each node its own
    count; the local world size matters for device binding (trainer/devices.py).
    """
    counts: list[int] = []
    for part in filter(None, tasks_per_node.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not counts:
        return None
    return counts[node] if 0 <= node < len(counts) else counts[0]


def slurm_port(job_id: str) -> int:
    """Deterministic per-job port so two jobs sharing a node never collide."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return SLURM_PORT_BASE + int(digits) % SLURM_PORT_SPAN


def _mpi_flavour(env: Mapping[str, str]) -> str | None:
    for name, (rank_key, *_rest) in MPI_TABLES.items():
        if rank_key in env:
            return name
    return None


def _detect_mpi(env: Mapping[str, str], flavour: str) -> DistEnv:
    rank_k, local_k, size_k, local_size_k = MPI_TABLES[flavour]
    rank = _int(env, rank_k)
    world = _int(env, size_k, 1)
    local_rank = _int(env, local_k, 0)
    local_world = _int(env, local_size_k, world)
    addr = env.get(MASTER_ADDR) or None
    port = _int(env, MASTER_PORT)
    return DistEnv(
        launcher="mpi",
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        node_rank=rank // max(local_world, 1),
        master_addr=addr,
        master_port=port if addr else None,
        job_id=env.get("SLURM_JOB_ID"),
        restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
    )


def _is_slurm_step(env: Mapping[str, str]) -> bool:
    # An srun step has SLURM_STEP_ID; the batch shell of an sbatch job has SLURM_PROCID too,
    # but running the trainer there directly means one process, not SLURM_NTASKS of them.
    step = env.get("SLURM_STEP_ID")
    return (
        "SLURM_PROCID" in env
        and step is not None
        and step not in {"batch", "extern", "4294967294", "4294967291"}
    )


def detect_env(env: Mapping[str, str]) -> DistEnv:
    """Pure: read rank, world and master from a mapping of environment variables."""
    if all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        return DistEnv(
            launcher="torchrun",
            rank=_int(env, "RANK"),
            local_rank=_int(env, "LOCAL_RANK"),
            world_size=world,
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", _int(env, "RANK") // max(local_world, 1)),
            master_addr=env.get(MASTER_ADDR, "127.0.0.1"),
            master_port=_int(env, MASTER_PORT, 29500),
            job_id=env.get("SLURM_JOB_ID") or env.get("TORCHELASTIC_RUN_ID"),
            restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", 0)
            + _int(env, "SLURM_RESTART_COUNT", 0),
        )

    flavour = _mpi_flavour(env)
    slurm_step = _is_slurm_step(env)
    if flavour is not None and slurm_step:
        mpi = _detect_mpi(env, flavour)
        size_key = MPI_TABLES[flavour][2]  # srun --mpi=pmix sets PMIX_RANK but no PMIX_SIZE
        agrees = _int(env, "SLURM_PROCID") == mpi.rank and (
            size_key not in env or _int(env, "SLURM_NTASKS", 1) == mpi.world_size
        )
        if not agrees:  # mpirun inside an sbatch shell: inherited SLURM_* are stale
            return mpi
    if slurm_step:
        job_id = env.get("SLURM_JOB_ID", "0")
        world = _int(env, "SLURM_NTASKS", 1)
        local_world = _int(env, "SLURM_NTASKS_PER_NODE", None)
        if local_world is None:
            tasks = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
            local_world = tasks_on_node(tasks, _int(env, "SLURM_NODEID", 0)) or world
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        return DistEnv(
            launcher="slurm",
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID", 0),
            world_size=world,
            local_world_size=local_world,
            node_rank=_int(env, "SLURM_NODEID", 0),
            master_addr=env.get(MASTER_ADDR) or first_slurm_host(nodelist),
            master_port=_int(env, MASTER_PORT, None) or slurm_port(job_id),
            job_id=job_id,
            restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
        )
    if flavour is not None:
        return _detect_mpi(env, flavour)
    return DistEnv(
        launcher="single",
        rank=0,
        local_rank=0,
        world_size=1,
        local_world_size=1,
        node_rank=0,
        master_addr=env.get(MASTER_ADDR, "127.0.0.1"),
        master_port=_int(env, MASTER_PORT, None),
        job_id=env.get("SLURM_JOB_ID"),
        restart_count=_int(env, "SLURM_RESTART_COUNT", 0),
    )
