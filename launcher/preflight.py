"""Pre-flight: every check that can fail before ranks exist, reported together.

A bad path, a missing column, labels out of range, a batch that does not divide, fp16 on a
CPU: each is found here, in one process, in seconds — not after N ranks have started and
half-written a run directory.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.batch import BatchPlan, resolve_batch
from trainer.config import ConfigError, RunConfig, load_config
from trainer.deepspeed_config import accumulation_note, build_deepspeed_config
from trainer.devices import (
    accelerator_warning,
    backend_problem,
    fp16_problem,
    too_many_ranks_problem,
    visible_gpu_count,
)
from trainer.ops import detect_build_env, optimizer_plan, remote


@dataclass
class Preflight:
    cfg: RunConfig
    world_size: int
    nproc_per_node: int
    plan: BatchPlan | None
    train_rows: int | None
    problems: list[str]
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong (e.g. slow optimizer)
    optimizer: str = ""  # which AdamW the ranks will build (trainer/ops.py)
    warnings: list[str] = field(default_factory=list)  # the data was changed or looks wrong

    @property
    def ok(self) -> bool:
        return not self.problems

    def print_notes(self) -> None:
        for note in self.notes:
            print(f"zerotune: note: {note}", file=sys.stderr)
        for warning in self.warnings:
            print(f"zerotune: warning: {warning}", file=sys.stderr)


def resolve_nproc(cli_value: str | int | None, cfg: RunConfig) -> int:
    """CLI > config > auto; auto = number of GPUs, or 1 on a CPU-only machine."""
    value = cli_value if cli_value is not None else cfg.launch.nproc_per_node
    if value == "auto":
        return max(visible_gpu_count(), 1)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"--nproc-per-node={value!r}: expected a positive integer or 'auto'"
        ) from None
    if n < 1:
        raise ConfigError(f"--nproc-per-node={n}: expected at least 1")
    return n


def check(
    config: str | None,
    overrides: list[str],
    nproc: str | int | None = None,
    nnodes: int = 1,
    check_data: bool = True,
    job_gpus: int | None = None,
    run_dir: Path | None = None,
    resume: str | None = None,
) -> Preflight:
    """Raises ConfigError for an unreadable/invalid config; collects every other problem.

    ``job_gpus``: GPUs per node of a job that runs elsewhere (``zerotune submit``): the
    device checks then use the job's GPUs, not this machine's. ``run_dir`` / ``resume``:
    where the run will write and what it resumes, checked without writing anything.
    ``check_data=False``: the settings only (``check_data_into`` adds the rest later).
    """
    pf = check_settings(config, overrides, nproc, nnodes, job_gpus, run_dir, resume)
    if check_data:
        check_data_into(pf)
    return pf


def check_settings(
    config: str | None,
    overrides: list[str],
    nproc: str | int | None = None,
    nnodes: int = 1,
    job_gpus: int | None = None,
    run_dir: Path | None = None,
    resume: str | None = None,
) -> Preflight:
    """The checks that need no data, the tokenizer or the model: fractions of a second once
    the config is loaded (``zerotune train`` makes these before any rank starts)."""
    cfg = load_config(config, overrides)
    n = resolve_nproc(nproc, cfg)
    world = n * nnodes
    problems: list[str] = []
    gpus = visible_gpu_count() if job_gpus is None else job_gpus
    # Every rank a launcher starts here (or srun starts on a node of the job) sees the same
    # GPUs: more ranks than GPUs would share them (trainer/devices.py has the rank's rule).
    problems += filter(
        None,
        [
            too_many_ranks_problem(
                n, gpus, "this machine has" if job_gpus is None else "the job asks for"
            ),
            backend_problem(cfg.launch.backend, on_gpu=bool(gpus)),
        ],
    )
    # DeepSpeed ops: pre-built or not is a fact of this install; for a job elsewhere the
    # compute nodes' compilers are unknown here, so only what is certain is refused.
    build = detect_build_env() if job_gpus is None else remote(detect_build_env())
    optimizer = optimizer_plan(cfg, bool(gpus), build)
    if optimizer.problem:
        problems.append(optimizer.problem)
    notes = [optimizer.note] if optimizer.note else []
    if job_gpus is None:  # the ranks inherit this environment
        notes += filter(None, [accelerator_warning(os.environ, bool(gpus))])
    problems += filter(None, [fp16_problem(cfg.precision, bool(gpus))])
    plan = None
    try:
        plan = resolve_batch(cfg, world)
        if cfg.engine == "deepspeed":
            ds = build_deepspeed_config(cfg, plan, on_gpu=bool(gpus), build=build, opt=optimizer)
            notes += filter(None, [accumulation_note(cfg, ds)])
    except ConfigError as e:
        problems.extend(e.problems)
    if run_dir is not None:
        problems += filter(None, [run_dir_problem(run_dir)])
    if resume is not None:
        problems += filter(None, [resume_problem(resume)])
    return Preflight(
        cfg=cfg,
        world_size=world,
        nproc_per_node=n,
        plan=plan,
        train_rows=None,
        problems=list(dict.fromkeys(problems)),  # the optimizer's problem may come twice
        notes=notes,
        optimizer=optimizer.description,
    )


def check_data_into(pf: Preflight) -> Preflight:
    """The data, the tokenizer and the model's config, read here (``zerotune validate``,
    ``zerotune submit``, a settings problem's report): seconds, most of them importing
    datasets and transformers. ``zerotune train`` has its rank 0 run the same check
    (``trainer.datacheck.data_findings``) and adds its record with ``add_data_findings``."""
    from trainer.datacheck import data_findings
    from trainer.process import quiet_libraries

    quiet_libraries()
    return add_data_findings(pf, data_findings(pf.cfg))


def add_data_findings(pf: Preflight, findings: dict) -> Preflight:
    """What the data check found (``data_findings``' record: rows, warnings, problems) added
    to ``pf``, with the one check that needs the batch plan: at least one global batch."""
    cfg, plan = pf.cfg, pf.plan
    pf.train_rows = findings.get("train_rows")
    pf.warnings.extend(w for w in findings.get("warnings", []) if w not in pf.warnings)
    pf.problems.extend(findings.get("problems", []))
    if pf.train_rows is not None and plan is not None and pf.train_rows < plan.global_batch:
        carved = "" if cfg.data.validation else " after the validation carve-out"
        pf.problems.append(
            f"data.train={cfg.data.train!r} has {pf.train_rows} rows{carved}, fewer than one global "
            f"batch (train.global_batch_size={plan.global_batch}): lower the batch size or add data"
        )
    pf.problems = list(dict.fromkeys(pf.problems))
    return pf


def run_dir_problem(run_dir: Path) -> str | None:
    """A run directory that cannot be created or written, found without leaving anything:
    a path through a file, a file in its place, or a directory (or the nearest existing
    parent) this process cannot write. Permission bits do not stop root, a read-only
    mount does: a probe file, created and removed at once, asks the file system itself."""
    import tempfile

    run_dir = Path(run_dir).expanduser().absolute()
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists() or p.is_symlink())
    where = f"run directory {str(run_dir)!r}"
    if not existing.is_dir():
        what = (
            "is a file" if existing == run_dir else f"lies under {str(existing)!r}, which is a file"
        )
        return f"{where} {what}: choose another --run-dir"
    try:
        fd, probe = tempfile.mkstemp(prefix=".zerotune-probe-", dir=existing)
    except OSError as e:
        verb = "write in it:" if existing == run_dir else f"create it in {str(existing)!r}:"
        return (
            f"{where}: cannot {verb} {e.strerror or e}: choose a writable --run-dir "
            "or fix the permissions"
        )
    os.close(fd)
    os.unlink(probe)
    return None


def resume_problem(resume: str) -> str | None:
    """``--resume PATH``: a checkpoint (with its manifest) or a run directory (with
    checkpoints/); whether it verifies is the rank's check."""
    # force: as auto, although the config changes the run (trainer/rundir.py)
    if resume in ("auto", "never", "force"):
        return None
    p = Path(resume).expanduser()
    if not p.exists():
        return (
            f"--resume {resume!r}: no such checkpoint or run directory (working directory {os.getcwd()}); "
            "give a checkpoint folder (RUN_DIR/checkpoints/step_N) or a run directory, or --resume auto"
        )
    if not (p / "manifest.json").is_file() and not (p / "checkpoints").is_dir():
        return (
            f"--resume {resume!r} is neither a checkpoint (no manifest.json) nor a run directory "
            "(no checkpoints/): give RUN_DIR/checkpoints/step_N or a run directory"
        )
    return None
