"""``zerotune``: train, validate, submit, doctor, export; estimate, sweep, report (``scaling/``).

zerotune train                                   # embedded demo, 2 ranks on CPU, offline
zerotune train configs/sst2-minilm.yaml --nproc-per-node 2 --run-dir runs/sst2 --set train.max_steps=300
zerotune validate configs/x.yaml                 # every config problem at once; exit 2 if any
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainer.config import ConfigError, field_help
from trainer.process import ExitCode, add_run_arguments, default_run_dir, report_config_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zerotune", description="Data-parallel fine-tuning with DeepSpeed ZeRO"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train (spawns ranks with torch.distributed.run, or runs in place under torchrun/srun/mpirun)",
    )
    add_run_arguments(t)
    t.add_argument(
        "--nproc-per-node",
        help="ranks on this machine: N or 'auto' (GPUs, or 1 on CPU); default from launch.nproc_per_node",
    )

    v = sub.add_parser(
        "validate", help="check a config (and its data) without training; exit 2 on any problem"
    )
    add_run_arguments(v)  # --run-dir / --resume: checked as `train` would use them
    v.add_argument("--nproc-per-node", help="world size to check the batch arithmetic against")
    v.add_argument("--nnodes", type=int, default=1)
    v.add_argument("--no-data", action="store_true", help="skip loading the data files")
    v.add_argument(
        "--help-keys",
        action="store_true",
        help="list every config key with its type, default and meaning",
    )

    from . import doctor, export, submit

    submit.add_parser(sub)
    doctor.add_parser(sub)
    export.add_parser(sub)
    from scaling import cli as scaling_cli

    scaling_cli.add_parsers(sub, check=_preflight_check)
    return parser


def _preflight_check(*args, **kwargs):
    """The pre-flight for ``zerotune sweep`` (imported when a sweep validates its points)."""
    from .preflight import check

    return check(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train", *(argv or [])])
    try:
        return args.func(args) if hasattr(args, "func") else COMMANDS[args.command](args)
    except ConfigError as e:
        return report_config_error(e)
    except KeyboardInterrupt:  # Ctrl-C before ranks exist (pre-flight): one line, no traceback
        print("zerotune: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED


def cmd_validate(args) -> int:
    if args.help_keys:
        print("\n".join(field_help()))
        return ExitCode.DONE
    from .preflight import check

    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    pf = check(
        args.config,
        args.overrides,
        args.nproc_per_node,
        args.nnodes,
        check_data=not args.no_data,
        run_dir=run_dir,
        resume=args.resume,
    )
    if pf.problems:
        return report_config_error(ConfigError(pf.problems))
    pf.print_notes()
    p = pf.plan
    print(
        f"ok: {args.config or 'demo'} — task {pf.cfg.task}, engine {pf.cfg.engine}, ZeRO {pf.cfg.zero.stage}, {pf.cfg.precision}; "
        f"world {pf.world_size} × micro {p.micro} × accum {p.accum} = global batch {p.global_batch}; "
        f"optimizer {pf.optimizer}"
        + (
            f"; {pf.train_rows} training rows ({pf.train_rows // p.global_batch} steps/epoch)"
            if pf.train_rows
            else ""
        )
    )
    return ExitCode.DONE


def cmd_train(args) -> int:
    from trainer.env import detect_env

    from .spawn import spawn, trainer_args

    env = detect_env(os.environ)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    if env.launcher != "single":
        # Ranks already exist (torchrun / srun / mpirun): this process is one of them.
        from trainer.main import main as rank_main
        from trainer.process import exit_process

        exit_process(rank_main(trainer_args(args.config, args.overrides, run_dir, args.resume)))

    from trainer.rundir import refuse_if_in_use
    from trainer.startup import LAUNCHED_AT, process_created

    from .overlap import train_gated
    from .preflight import check_data_into, check_settings

    # the ranks' start-up breakdown (env.json startup_s) counts from this process's start
    os.environ[LAUNCHED_AT] = repr(process_created())

    refuse_if_in_use(run_dir)  # at once, before the pre-flight reads data
    pf = check_settings(
        args.config, args.overrides, args.nproc_per_node, run_dir=run_dir, resume=args.resume
    )
    if pf.problems:  # no rank starts; the data's problems are reported with these
        check_data_into(pf)
        return report_config_error(ConfigError(pf.problems))

    # the ranks start now and wait for the data checks and the run directory's lock
    # (launcher/overlap.py)
    def spawn_ranks() -> ExitCode:
        return spawn(
            args.config,
            args.overrides,
            pf.nproc_per_node,
            run_dir,
            args.resume,
            pf.cfg.launch.preemption_signals,
        )

    code = train_gated(pf, run_dir, args.resume, spawn_ranks)  # or the pre-flight's ConfigError
    # the ranks are gone and the last line is out: the interpreter's teardown of the agent
    # (its store's C++ threads) would add seconds before the exit code reaches the shell
    from trainer.process import exit_process

    exit_process(code)


COMMANDS = {"train": cmd_train, "validate": cmd_validate}


if __name__ == "__main__":
    raise SystemExit(main())
