"""``zerotune submit``: validate, render ``RUN_DIR/submit.sbatch``, ``sbatch`` it.

    zerotune submit configs/x.yaml --nodes 4 --gpus-per-node 8 --time 12:00:00 --partition gpu
    zerotune submit tests/configs/tiny.yaml --nodes 1 --nproc-per-node 2 --dry-run   # CPU cluster
    sbatch runs/x/submit.sbatch                       # resubmit later: resumes from RUN_DIR

The run directory gets the resolved config (``config.yaml``, ``--set`` overrides applied)
and ``submit.sbatch``: ``slurm/train.sbatch`` with its ``#SBATCH`` lines set for this job
and ``RUN_DIR/config.yaml RUN_DIR`` as its default arguments. The job reads the resolved
config, so later edits of the original YAML do not change a resumed run.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import ConfigError, dump_config
from trainer.process import ExitCode, add_run_arguments, default_run_dir, report_config_error

DEFAULT_ARGS_LINE = "ZEROTUNE_DEFAULT_ARGS=()"
SBATCH_LINE = re.compile(r"^#{1,2}SBATCH\s+--([A-Za-z0-9-]+)(?:=(.*))?$")
MAX_SIGNAL_LEAD = 65535  # sbatch --signal: "between 0 and 65535 seconds"
PENDING_WATCH_S = 5.0  # after sbatch: how long a pending reason is watched for
TIME_FORMAT = re.compile(r"^((\d+-)?\d+(:\d+){0,2}|(?i:unlimited|infinite))$")


def template_path() -> Path:
    import launcher

    return Path(launcher.__file__).resolve().parents[1] / "slurm" / "train.sbatch"


@dataclass
class JobSpec:
    """What goes into the rendered script; every path absolute."""

    run_dir: Path
    submit_dir: Path
    python: str
    options: dict[str, str | None] = field(
        default_factory=dict
    )  # sbatch long option → value (None: a flag)
    config_source: str = "demo"


def _check_value(name: str, value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ConfigError(f"{name}={value!r}: newlines are not allowed")
    # Slurm's #SBATCH parser treats a backslash as an escape even inside quotes.
    if "\\" in value:
        raise ConfigError(f"{name}={value!r}: backslashes are not allowed in sbatch values")
    return value


def sbatch_line(option: str, value: str | None) -> str:
    """``#SBATCH --opt=value`` with the value quoted (sbatch strips shell-style quotes)."""
    if value is None:
        return f"#SBATCH --{option}"
    return f"#SBATCH --{option}={shlex.quote(_check_value('--' + option, value))}"


def render(template: str, job: JobSpec) -> str:
    """Rewrite the template's ``#SBATCH`` block and bake in the default arguments."""
    lines = template.splitlines()
    idx = [i for i, line in enumerate(lines) if SBATCH_LINE.match(line)]
    if not idx or lines.count(DEFAULT_ARGS_LINE) != 1:
        raise ConfigError(
            f"{template_path()}: not a zerotune sbatch template (#SBATCH block or {DEFAULT_ARGS_LINE!r} missing)"
        )
    template_lines = {SBATCH_LINE.match(lines[i]).group(1): lines[i] for i in idx}
    new_block = [
        sbatch_line(opt, job.options[opt]) if opt in job.options else line
        for opt, line in template_lines.items()
    ]
    new_block += [
        sbatch_line(opt, value) for opt, value in job.options.items() if opt not in template_lines
    ]
    args = " ".join(
        shlex.quote(_check_value("path", str(p)))
        for p in (job.run_dir / "config.yaml", job.run_dir)
    )
    defaults = [
        f"ZEROTUNE_DEFAULT_ARGS=({args})",
        f"PYTHON=${{PYTHON:-{shlex.quote(_check_value('python', job.python))}}}",
    ]
    header = [
        f"# Rendered by `zerotune submit` from {shlex.quote(_check_value('config', job.config_source))}; resubmit with: sbatch {shlex.quote(str(job.run_dir / 'submit.sbatch'))}"
    ]
    body = lines[: idx[0]] + header + new_block + lines[idx[-1] + 1 :]
    body = [line for out in body for line in (defaults if out == DEFAULT_ARGS_LINE else [out])]
    return "\n".join(body) + "\n"


def time_limit_seconds(value: str) -> int | None:
    """Slurm's ``--time`` in seconds: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; None for unlimited."""
    if value.lower() in {"unlimited", "infinite"}:
        return None
    days, _, rest = value.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + sec
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def job_options(args, run_dir: Path, submit_dir: Path, nproc: int) -> dict[str, str | None]:
    opts: dict[str, str | None] = {
        "job-name": args.job_name or run_dir.name,
        "nodes": str(args.nodes),
        "ntasks-per-node": str(nproc),
    }
    if args.gpus_per_node is not None:
        opts["gpus-per-node"] = str(args.gpus_per_node)
    if args.cpus_per_task is not None:
        opts["cpus-per-task"] = str(args.cpus_per_task)
    if args.time is not None:
        if not TIME_FORMAT.match(args.time):
            raise ConfigError(
                f"--time={args.time!r}: use minutes, HH:MM:SS or D-HH:MM:SS (Slurm's formats)"
            )
        opts["time"] = args.time
    if args.signal_lead is not None:
        if not 1 <= args.signal_lead <= MAX_SIGNAL_LEAD:
            raise ConfigError(
                f"--signal-lead={args.signal_lead}: expected 1..{MAX_SIGNAL_LEAD} seconds (Slurm's range); "
                "size it to save a checkpoint, see slurm/README.md"
            )
        limit = time_limit_seconds(args.time) if args.time is not None else None
        if limit is not None and args.signal_lead >= limit:
            raise ConfigError(
                f"--signal-lead={args.signal_lead} is not shorter than --time={args.time} ({limit} s): "
                "USR1 would arrive at the start and the job would checkpoint and requeue forever"
            )
        opts["signal"] = f"B:USR1@{args.signal_lead}"
    for name in ("partition", "account"):
        if getattr(args, name):
            opts[name] = getattr(args, name)
    # '%' starts a Slurm filename pattern (%j, %x); a literal one is '%%'.
    opts["output"] = str(run_dir).replace("%", "%%") + "/slurm-%j.out"
    opts["chdir"] = str(submit_dir)  # relative data paths in the config resolve from here
    for extra in args.sbatch_args:
        m = re.match(r"^--([A-Za-z0-9-]+)(?:=(.*))?$", extra, re.S)
        if not m:
            raise ConfigError(
                f"--sbatch-arg={extra!r}: expected a long option, e.g. --sbatch-arg=--mem=32G"
            )
        opts[m.group(1)] = m.group(2)
    for name, value in opts.items():
        if value is not None:
            _check_value(f"--{name}", value)
    return opts


def add_parser(sub) -> None:
    p = sub.add_parser(
        "submit",
        help="validate a config, render RUN_DIR/submit.sbatch from slurm/train.sbatch and submit it with sbatch",
        description=__doc__.split("\n\n")[0],
    )
    add_run_arguments(p, resume=False)
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        help="GPUs per node (one task per GPU); omit on CPU-only clusters",
    )
    p.add_argument(
        "--nproc-per-node",
        type=int,
        help="tasks (ranks) per node; default --gpus-per-node, required without it",
    )
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per task (default: the template's)")
    p.add_argument(
        "--time", help="time limit, e.g. 12:00:00 or 2-00:00:00 (default: the template's)"
    )
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--job-name", help="job name (default: the run directory's name)")
    p.add_argument(
        "--signal-lead",
        type=int,
        metavar="SECONDS",
        help="send USR1 this long before the time limit (checkpoint + requeue); default: the template's 120 s, "
        "enough for ~40 GB per node at 1 GB/s; size it with the table in slurm/README.md",
    )
    p.add_argument(
        "--sbatch-arg",
        dest="sbatch_args",
        action="append",
        default=[],
        metavar="--OPT[=VALUE]",
        help="extra #SBATCH option, e.g. --sbatch-arg=--mem=64G (repeatable)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="only validate and render RUN_DIR/submit.sbatch"
    )
    p.set_defaults(func=run)


def _error(msg: str) -> int:
    return report_config_error(msg, prog="zerotune submit")


def run(args) -> int:
    if args.nodes < 1:
        return _error(f"--nodes={args.nodes}: expected at least 1")
    nproc = args.nproc_per_node if args.nproc_per_node is not None else args.gpus_per_node
    if nproc is None:
        return _error(
            "give --nproc-per-node (tasks per node), or --gpus-per-node on a GPU cluster (one task per GPU)"
        )
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        return _error(
            f"--gpus-per-node={args.gpus_per_node}: expected at least 1 (omit it on CPU-only clusters)"
        )
    if nproc < 1:
        return _error(f"--nproc-per-node={nproc}: expected at least 1")
    if not args.dry_run and shutil.which("sbatch") is None:
        return _error(
            "sbatch not found on PATH: run this on a Slurm login node, or use --dry-run to only render the script"
        )
    template = template_path()
    if not template.is_file():
        return _error(
            f"sbatch template {template} not found: zerotune submit needs a source checkout (pip install -e .)"
        )

    from .preflight import check

    run_dir = (
        (Path(args.run_dir) if args.run_dir else default_run_dir(args.config))
        .expanduser()
        .resolve()
    )
    submit_dir = Path.cwd().resolve()
    try:
        from trainer.rundir import refuse_if_in_use

        # a live run owns it: its config.yaml is not rewritten under it (a second job on it
        # would be refused by its rank 0 anyway, after waiting in the queue)
        refuse_if_in_use(run_dir)
        pf = check(
            args.config,
            args.overrides,
            nproc=nproc,
            nnodes=args.nodes,
            job_gpus=args.gpus_per_node or 0,
            run_dir=run_dir,
        )
        if pf.problems:
            raise ConfigError(pf.problems)
        pf.print_notes()
        options = job_options(args, run_dir, submit_dir, nproc)
        text = template.read_text()
        problems = partition_problems(options, text, args.dry_run)
        if problems:
            raise ConfigError(problems)
        job = JobSpec(run_dir, submit_dir, sys.executable, options, args.config or "demo")
        script = render(text, job)
    except ConfigError as e:
        return report_config_error(e)

    resuming = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    resolved = dump_config(pf.cfg)
    old = run_dir / "config.yaml"
    if resuming and old.is_file() and old.read_text() != resolved:
        print(
            f"zerotune submit: warning: the config differs from the one {run_dir} was trained with",
            file=sys.stderr,
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    old.write_text(resolved)
    path = run_dir / "submit.sbatch"
    path.write_text(script)
    path.chmod(0o755)
    p = pf.plan
    print(
        f"rendered {path}: {args.nodes} node(s) × {nproc} task(s) = world {pf.world_size}, "
        f"global batch {p.global_batch} (micro {p.micro} × accum {p.accum})"
    )
    if args.dry_run:
        print(f"dry run: submit with `sbatch {shlex.quote(str(path))}`")
        return ExitCode.DONE

    proc = subprocess.run(
        ["sbatch", "--parsable", str(path)], capture_output=True, text=True, cwd=submit_dir
    )
    if proc.returncode != 0:
        print(
            f"zerotune submit: sbatch failed (exit {proc.returncode}): {proc.stderr.strip()}",
            file=sys.stderr,
        )
        return ExitCode.FAILED
    job_id = proc.stdout.strip().split(";")[0]  # --parsable: "jobid[;cluster]"
    print(f"submitted job {job_id}" + (" (resumes from the latest checkpoint)" if resuming else ""))
    print(f"log: {run_dir / f'slurm-{job_id}.out'}")
    from .partition import pending_problem

    found = pending_problem(job_id, PENDING_WATCH_S)
    if found is not None:
        never, message = found
        print(f"zerotune submit: {'error' if never else 'warning'}: {message}", file=sys.stderr)
        return ExitCode.CONFIG if never else ExitCode.DONE
    return ExitCode.DONE


def partition_problems(options: dict[str, str | None], template: str, dry_run: bool) -> list[str]:
    """The request against its partition (``launcher/partition.py``), where ``sinfo``
    answers; fills in a fitting ``cpus-per-task`` / ``time`` the user did not give. A dry
    run may render for another cluster: its problems are warnings."""
    from .partition import check_request, read_partitions

    partitions = read_partitions()
    if partitions is None:
        return []
    defaults = {}
    for line in template.splitlines():
        m = SBATCH_LINE.match(line)
        if m and line.startswith("#SBATCH") and m.group(2):
            defaults[m.group(1)] = m.group(2)
    problems, notes = check_request(options, defaults, partitions)
    for note in notes:
        print(f"zerotune submit: note: {note}", file=sys.stderr)
    if problems and dry_run:
        for problem in problems:
            print(
                f"zerotune submit: warning: {problem} (dry run: rendered anyway; on this cluster "
                "sbatch would accept the job but it could never start)",
                file=sys.stderr,
            )
        return []
    return problems
