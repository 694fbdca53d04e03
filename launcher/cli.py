"""``zerotune``: train, validate, submit, doctor, export.

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

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _common(p: argparse.ArgumentParser, run_dir: bool = True) -> None:
    p.add_argument(
        "config", nargs="?", help="YAML run config (default: the embedded demo, configs/demo.yaml)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=3e-5 (repeatable; beats the file)",
    )
    if run_dir:
        p.add_argument(
            "--run-dir", help="run directory (default runs/<config name>); re-running resumes"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zerotune", description="Data-parallel fine-tuning with DeepSpeed ZeRO"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train (spawns ranks with torch.distributed.run, or runs in place under torchrun/srun/mpirun)",
    )
    _common(t)
    t.add_argument(
        "--nproc-per-node",
        help="ranks on this machine: N or 'auto' (GPUs, or 1 on CPU); default from launch.nproc_per_node",
    )
    t.add_argument(
        "--resume",
        default="auto",
        help="auto (newest valid checkpoint in the run dir), never, or a checkpoint path",
    )

    v = sub.add_parser(
        "validate", help="check a config (and its data) without training; exit 2 on any problem"
    )
    _common(v, run_dir=False)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train", *(argv or [])])
    try:
        return args.func(args) if hasattr(args, "func") else COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"zerotune: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_validate(args) -> int:
    if args.help_keys:
        print("\n".join(field_help()))
        return EXIT_OK
    from .preflight import check

    pf = check(
        args.config, args.overrides, args.nproc_per_node, args.nnodes, check_data=not args.no_data
    )
    if pf.problems:
        print(f"zerotune: config error: {ConfigError(pf.problems)}", file=sys.stderr)
        return EXIT_CONFIG
    p = pf.plan
    print(
        f"ok: {args.config or 'demo'} — task {pf.cfg.task}, engine {pf.cfg.engine}, ZeRO {pf.cfg.zero.stage}, {pf.cfg.precision}; "
        f"world {pf.world_size} × micro {p.micro} × accum {p.accum} = global batch {p.global_batch}"
        + (
            f"; {pf.train_rows} training rows ({pf.train_rows // p.global_batch} steps/epoch)"
            if pf.train_rows
            else ""
        )
    )
    return EXIT_OK


def cmd_train(args) -> int:
    from trainer.env import detect_env

    env = detect_env(os.environ)
    if env.launcher != "single":
        # Ranks already exist (torchrun / srun / mpirun): this process is one of them.
        from trainer.main import main as rank_main

        argv = [
            *([args.config] if args.config else []),
            *sum((["--set", o] for o in args.overrides), []),
        ]
        argv += ["--resume", args.resume] + (["--run-dir", args.run_dir] if args.run_dir else [])
        return rank_main(argv)

    from .preflight import check

    pf = check(args.config, args.overrides, args.nproc_per_node)
    if pf.problems:
        print(f"zerotune: config error: {ConfigError(pf.problems)}", file=sys.stderr)
        return EXIT_CONFIG
    from trainer.main import default_run_dir

    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    from .spawn import spawn

    return spawn(
        args.config,
        args.overrides,
        pf.nproc_per_node,
        run_dir,
        args.resume,
        pf.cfg.launch.preemption_signals,
    )


COMMANDS = {"train": cmd_train, "validate": cmd_validate}


if __name__ == "__main__":
    raise SystemExit(main())
