"""Will a Slurm request ever run? Checked against the partition before ``sbatch``.

Slurm accepts a job whose request no node of its partition can meet (more CPUs per node
than the nodes have, more nodes than the partition has, a time limit beyond the
partition's) and leaves it pending forever with a reason such as ``PartitionConfig``.
``zerotune submit`` reads the partition with one ``sinfo`` call, refuses such a request
naming the limit, derives a ``--cpus-per-task`` that fits when none is given, and after
submitting looks at the job's pending reason for a few seconds.

    sinfo -h -o '%P|%a|%c|%m|%G|%D|%l'     → debug*|up|8|21694|(null)|1|infinite
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field

SINFO_FORMAT = "%P|%a|%c|%m|%G|%D|%l"
# pending reasons that no amount of waiting fixes: the request exceeds what the partition
# (or account / QOS) allows. ReqNodeNotAvail is said too (nodes down or drained), as a warning.
NEVER_REASONS = {
    "PartitionConfig": "the request exceeds what the partition's nodes have",
    "PartitionNodeLimit": "more nodes than the partition has or allows",
    "PartitionTimeLimit": "the time limit is beyond the partition's",
    "BadConstraints": "no node has the requested features",
    "InvalidAccount": "the account is not valid",
    "InvalidQOS": "the QOS is not valid",
    "AccountNotAllowed": "the account may not use the partition",
    "QOSNotAllowed": "the QOS may not use the partition",
}
WAIT_REASONS = {"ReqNodeNotAvail": "the requested nodes are down, drained or reserved"}


@dataclass
class NodeGroup:
    """Nodes of a partition that share one configuration (one sinfo line)."""

    cpus: int
    memory_mb: int | None  # None: not known / not configured
    gpus: int
    nodes: int


@dataclass
class Partition:
    name: str
    available: str  # up / down / drain / inact
    time_limit_s: int | None  # None: infinite
    time_limit: str
    groups: list[NodeGroup] = field(default_factory=list)

    @property
    def nodes(self) -> int:
        return sum(g.nodes for g in self.groups)


@dataclass
class Request:
    """What a job asks of each node (None: not asked)."""

    nodes: int
    tasks_per_node: int
    cpus_per_task: int | None
    gpus_per_node: int
    memory_mb: int | None
    time_s: int | None
    time: str | None


# --------------------------------------------------------------------------------------
# Reading the partition
# --------------------------------------------------------------------------------------


def gres_gpus(gres: str) -> int:
    """GPUs in an sinfo ``%G`` value: ``gpu:4``, ``gpu:a100:8(S:0-1)``, ``(null)``."""
    total = 0
    for item in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", item).split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def parse_sinfo(text: str) -> dict[str, Partition]:
    """Partitions by name from ``sinfo -h -o SINFO_FORMAT``; the default one also under ''."""
    out: dict[str, Partition] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 7:
            continue
        name, avail, cpus, mem, gres, nodes, limit = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        if name not in out:
            seconds = None if limit in ("infinite", "UNLIMITED", "n/a") else _seconds(limit)
            out[name] = Partition(name, avail, seconds, limit)
            if default:
                out[""] = out[name]
        memory = mem.rstrip("+")
        out[name].groups.append(
            NodeGroup(
                cpus=int(cpus.rstrip("+")),
                memory_mb=int(memory) if memory.isdigit() and int(memory) > 1 else None,
                gpus=gres_gpus(gres),
                nodes=int(nodes),
            )
        )
    return out


def _seconds(limit: str) -> int | None:
    from .submit import time_limit_seconds

    try:
        return time_limit_seconds(limit)
    except ValueError:
        return None


def read_partitions() -> dict[str, Partition] | None:
    """None where there is no ``sinfo`` (or it does not answer): nothing can be checked."""
    if shutil.which("sinfo") is None:
        return None
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        return None
    return parse_sinfo(proc.stdout) if proc.returncode == 0 else None


# --------------------------------------------------------------------------------------
# Checking a request
# --------------------------------------------------------------------------------------


def default_cpus_per_task(part: Partition, req: Request) -> int | None:
    """A ``--cpus-per-task`` every node with the GPUs asked for can give each task: the
    smallest such node's CPUs shared among the tasks (None: no node fits the tasks)."""
    cpus = [g.cpus for g in part.groups if g.gpus >= req.gpus_per_node]
    if not cpus or min(cpus) < req.tasks_per_node:
        return None
    return min(cpus) // req.tasks_per_node


def request_problems(part: Partition, req: Request, flags: dict[str, str]) -> list[str]:
    """Why the request can never run on the partition, each naming the limit and the fix.

    ``flags``: how the user spelled each request (``--cpus-per-task 4`` / ``--sbatch-arg``)."""
    p = f"partition {part.name}"
    problems = []
    if part.available not in ("up",):
        problems.append(f"{p} is {part.available}: no job starts there until an admin brings it up")
    cpus_needed = (req.cpus_per_task or 1) * req.tasks_per_node
    max_cpus = max(g.cpus for g in part.groups)
    if cpus_needed > max_cpus:
        if req.tasks_per_node <= max_cpus:
            fix = f"lower --cpus-per-task to {max_cpus // req.tasks_per_node}"
        else:
            fix = f"lower --nproc-per-node to {max_cpus} (or fewer)"
        problems.append(
            f"{flags['cpus']} × --nproc-per-node {req.tasks_per_node} = {cpus_needed} CPUs per node, "
            f"but {p}'s nodes have {max_cpus}: {fix}"
        )
    max_gpus = max(g.gpus for g in part.groups)
    if req.gpus_per_node > max_gpus:
        have = f"{max_gpus} GPU(s) per node" if max_gpus else "no GPUs (no gpu gres)"
        problems.append(
            f"--gpus-per-node {req.gpus_per_node}, but {p}'s nodes have {have}: "
            + (
                f"lower --gpus-per-node to {max_gpus}"
                if max_gpus
                else "choose a GPU partition with --partition"
            )
        )
    mems = [g.memory_mb for g in part.groups if g.memory_mb is not None]
    if req.memory_mb is not None and mems and req.memory_mb > max(mems):
        problems.append(
            f"{flags['mem']} = {req.memory_mb} MB per node, but {p}'s nodes have {max(mems)} MB: "
            f"ask for at most --mem={max(mems)}M"
        )
    fitting = sum(
        g.nodes
        for g in part.groups
        if g.cpus >= cpus_needed
        and g.gpus >= req.gpus_per_node
        and (req.memory_mb is None or g.memory_mb is None or g.memory_mb >= req.memory_mb)
    )
    if not problems and req.nodes > fitting:
        which = "" if fitting == part.nodes else " that fit this request"
        problems.append(
            f"--nodes {req.nodes}, but {p} has {fitting} node(s){which}: lower --nodes to {fitting}"
            if fitting
            else f"no node of {p} fits this request"
        )
    if req.time_s is not None and part.time_limit_s is not None and req.time_s > part.time_limit_s:
        problems.append(
            f"{flags['time']} is beyond {p}'s time limit {part.time_limit}: "
            f"ask for --time {part.time_limit} or less"
        )
    return problems


def memory_mb(value: str) -> int | None:
    """sbatch's ``--mem``: ``64G``, ``1000M``, ``1T``, a plain number (MB); None if unreadable."""
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", value.strip(), re.I)
    if not m:
        return None
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2).upper()]
    return int(int(m.group(1)) * scale)


def check_request(
    options: dict[str, str | None], defaults: dict[str, str], partitions: dict[str, Partition]
) -> tuple[list[str], list[str]]:
    """(problems, notes) of a job's ``#SBATCH`` options against its partition; fills in
    ``cpus-per-task`` (and a ``time`` within the partition's limit) when the user gave
    none, so the template's defaults never make a request that cannot run.

    ``defaults``: the template's own ``#SBATCH`` values (cpus-per-task, time)."""
    from .submit import time_limit_seconds

    name = options.get("partition") or ""
    part = partitions.get(name)
    if part is None:
        if not name:
            return [], []  # no default partition: sbatch itself says so
        known = sorted(k for k in partitions if k)
        return [f"--partition {name}: no such partition here (sinfo lists {known})"], []
    notes = []
    gres = options.get("gres") or ""
    req = Request(
        nodes=int(options["nodes"]),
        tasks_per_node=int(options["ntasks-per-node"]),
        cpus_per_task=None,
        gpus_per_node=int(options.get("gpus-per-node") or 0) or gres_gpus(gres),
        memory_mb=memory_mb(options["mem"]) if options.get("mem") else None,
        time_s=None,
        time=None,
    )
    flags = {"mem": f"--mem={options.get('mem')}"}
    if options.get("cpus-per-task"):
        req.cpus_per_task = int(options["cpus-per-task"])
        flags["cpus"] = f"--cpus-per-task {req.cpus_per_task}"
    else:
        fit = default_cpus_per_task(part, req)
        req.cpus_per_task = fit or int(defaults.get("cpus-per-task", 1))
        flags["cpus"] = f"the default --cpus-per-task {req.cpus_per_task}"
        if fit:
            options["cpus-per-task"] = str(fit)
            smallest = min(g.cpus for g in part.groups if g.gpus >= req.gpus_per_node)
            notes.append(
                f"--cpus-per-task {fit} (not given): partition {part.name}'s nodes have "
                f"{smallest} CPUs for {req.tasks_per_node} task(s) each"
            )
    time_value = options.get("time") or defaults.get("time")
    if time_value:
        req.time_s, req.time = time_limit_seconds(time_value), time_value
        flags["time"] = (
            f"--time {time_value}" if options.get("time") else f"the default --time {time_value}"
        )
        beyond = (
            part.time_limit_s is not None
            and req.time_s is not None
            and req.time_s > part.time_limit_s
        )
        if beyond and not options.get("time"):
            options["time"] = part.time_limit
            req.time_s = part.time_limit_s
            notes.append(f"--time {part.time_limit}: partition {part.name}'s time limit")
    return request_problems(part, req, flags), notes


# --------------------------------------------------------------------------------------
# After sbatch
# --------------------------------------------------------------------------------------


def job_state(job_id: str) -> tuple[str, str] | None:
    """(state, reason) from squeue, or None when the job is no longer listed."""
    proc = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T|%r"], capture_output=True, text=True, timeout=30
    )
    line = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not line:
        return None
    state, _, reason = line[0].partition("|")
    return state, reason


def pending_problem(
    job_id: str, wait_s: float = 5.0, poll_s: float = 0.5
) -> tuple[bool, str] | None:
    """Watch a just-submitted job for up to ``wait_s``: (never, message) when it pends with
    a reason waiting does not fix (never=True) or may not fix soon (never=False); None when
    it started, ended, or pends for an ordinary reason (Priority, Resources, ...)."""
    deadline = time.monotonic() + wait_s
    while True:
        state = job_state(job_id)
        if state is None or state[0] != "PENDING":
            return None
        reason = state[1]
        if reason in NEVER_REASONS or reason in WAIT_REASONS:
            never = reason in NEVER_REASONS
            why = NEVER_REASONS.get(reason) or WAIT_REASONS[reason]
            return never, (
                f"job {job_id} is pending with reason {reason} ({why})"
                + (": it will never start as asked" if never else "")
                + f"; cancel it with `scancel {job_id}` and submit again with a request that fits"
                + (" (see `sinfo -o '%P %c %m %G %D %l'`)" if never else ", or wait")
            )
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll_s)
