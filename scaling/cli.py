"""``zerotune estimate | sweep | report``: argument parsing and printing for the scaling tools.

    zerotune estimate configs/sst2-minilm.yaml --world-sizes 1,8,64,512 --zero 0,1,2,3 --gpu H100 [--json]
    zerotune sweep configs/sweeps/demo.yaml --out runs/sweep-demo [--slurm] [--dry-run]
    zerotune report runs/sweep-demo                  # runs/sweep-demo/report.md + PNGs

``launcher/cli.py`` registers these; the sweep gets the launcher's pre-flight ``check``
passed in, so ``scaling`` depends on ``trainer`` only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trainer.config import ConfigError, load_config
from trainer.process import ExitCode, add_run_arguments, report_config_error

GIB = 2**30


def add_parsers(sub, check) -> None:
    e = sub.add_parser(
        "estimate",
        help="memory per rank, fit, step time, tokens/s, MFU and cost per world size and ZeRO stage",
    )
    add_run_arguments(e, run_dir=False, resume=False)
    e.add_argument("--world-sizes", default="1,8,64,512", help="comma-separated world sizes")
    e.add_argument("--zero", default="0,1,2,3", help="comma-separated ZeRO stages")
    e.add_argument(
        "--gpu",
        help="device: H100, H200, A100 80GB, L40S, ... or cpu (default scaling.device_name, else H100)",
    )
    e.add_argument("--gpus-per-node", type=int, help="devices per node (default 8; cpu: 1 × world)")
    e.add_argument("--calibrate", metavar="RUN_DIR", help="fit efficiency to a measured run")
    e.add_argument(
        "--bandwidth",
        metavar="GBPS|FILE",
        help="all-reduce busbw in GB/s, or a file with `zerotune doctor` output (default: per-device table)",
    )
    e.add_argument(
        "--efficiency", type=float, help="achieved/peak FLOP/s (default 0.4; --calibrate fits it)"
    )
    e.add_argument(
        "--timing",
        choices=["mean", "fastest"],
        default="mean",
        help="--calibrate on the run's mean step time, or its fastest log window (a shared machine)",
    )
    e.add_argument("--tokens", type=float, help="a training-token target for time and cost")
    e.add_argument("--json", action="store_true", help="machine-readable output")
    e.set_defaults(func=cmd_estimate)

    s = sub.add_parser(
        "sweep", help="run a grid of configs (locally or on Slurm) into one results.csv"
    )
    s.add_argument("sweep_file", metavar="SWEEP.yaml")
    s.add_argument("--out", help="sweep directory (default runs/sweep-<file name>)")
    s.add_argument("--slurm", action="store_true", help="one `zerotune submit` job per point")
    s.add_argument(
        "--dry-run", action="store_true", help="validate every point and list them; run nothing"
    )
    s.set_defaults(func=cmd_sweep, check=check)

    r = sub.add_parser(
        "report", help="report.md, plots and TensorBoard hparams of a sweep directory"
    )
    r.add_argument("sweep_dir", metavar="DIR")
    r.set_defaults(func=cmd_report)


def _ints(flag: str, text: str, allowed: set[int] | None = None) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 and allowed is None for v in values):
        raise ConfigError(
            f"{flag} {text!r}: expected positive integers separated by commas, e.g. 1,8,64"
        )
    bad = [v for v in values if allowed is not None and v not in allowed]
    if bad:
        raise ConfigError(f"{flag} {text!r}: {bad} not among {sorted(allowed)}")
    return values


def cmd_estimate(args) -> int:
    from .calibrate import calibrate, measured, parse_bandwidth
    from .estimate import Calibration, check_device, device_hardware, estimate
    from .shape import shape_for

    worlds = _ints("--world-sizes", args.world_sizes)
    stages = _ints("--zero", args.zero, {0, 1, 2, 3})
    if args.efficiency is not None and not 0 < args.efficiency <= 1:
        raise ConfigError(f"--efficiency {args.efficiency}: expected a fraction in (0, 1]")
    if args.gpu:  # a typo is reported before the config and the model are loaded
        check_device(args.gpu)
    bw, bw_src = parse_bandwidth(args.bandwidth) if args.bandwidth else (None, "")
    if args.calibrate:
        measured(
            Path(args.calibrate), args.timing
        )  # not a finished run: said before the model loads
    cfg = load_config(args.config, args.overrides)
    hw = device_hardware(
        args.gpu or cfg.scaling.device_name or "H100", cfg.precision, args.gpus_per_node, bw
    )
    if cfg.scaling.peak_tflops_per_device:  # the config's overrides, as a run uses them
        hw.peak_tflops, hw.peak_source = cfg.scaling.peak_tflops_per_device, "config"
    if cfg.scaling.price_per_device_hour is not None:
        hw.price, hw.price_source = cfg.scaling.price_per_device_hour, "config"
    if bw is not None:
        hw.bandwidth_source = bw_src
    shape = shape_for(cfg)
    cal = Calibration()
    run_steps = cfg.train.max_steps
    if args.calibrate:
        cal, m = calibrate(Path(args.calibrate), shape, hw, args.timing)
        run_steps = run_steps or m["total_steps"]
    if args.efficiency is not None:
        cal.efficiency, cal.source = args.efficiency, f"given efficiency {args.efficiency}"
    tokens = args.tokens or cfg.scaling.target_tokens
    points = estimate(shape, cfg, hw, cal, worlds, stages, run_steps, tokens)
    if args.json:
        print(json.dumps(_as_json(args, cfg, shape, hw, cal, points), indent=1))
    else:
        print_table(args, cfg, shape, hw, cal, points)
    return ExitCode.DONE


def _as_json(args, cfg, shape, hw, cal, points) -> dict:
    from trainer.hardware import PRICES_AS_OF

    return {
        "config": args.config or "demo",
        "model": {
            "name": cfg.model.name_or_path,
            "parameters": shape.parameters,
            "trainable_parameters": shape.trainable,
            "layers": shape.layers,
            "hidden": shape.hidden,
            "vocab": shape.vocab,
        },
        "precision": cfg.precision,
        "micro_batch_size": cfg.train.micro_batch_size,
        "global_batch_size": cfg.train.global_batch_size,
        "seq_len": cfg.data.max_length,
        "hardware": {**hw.__dict__, "prices_as_of": PRICES_AS_OF},
        "calibration": cal.__dict__,
        "points": [p.as_dict() for p in points],
    }


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}" if x < 100 * GIB else f"{x / GIB:.0f}"


def print_table(args, cfg, shape, hw, cal, points) -> None:
    from trainer.hardware import PRICES_AS_OF

    print(
        f"model {cfg.model.name_or_path}: {shape.parameters:,} parameters ({shape.trainable:,} trainable), "
        f"{shape.layers} layers × hidden {shape.hidden}; {cfg.precision}, micro {cfg.train.micro_batch_size}, "
        f"global {cfg.train.global_batch_size or 'micro × world'}, seq {cfg.data.max_length}"
        + (
            f" ({cal.tokens_per_sample:.1f} tokens/sample measured)"
            if cal.tokens_per_sample
            else " (tokens/sample: seq, the padded upper bound; --calibrate measures it)"
        )
    )
    price = (
        f"${hw.price:.3g}/device-hour ({hw.price_source}, prices as of {PRICES_AS_OF})"
        if hw.price
        else "no price"
    )
    print(
        f"device {hw.name}: {hw.memory_bytes / GIB:.0f} GiB, peak {hw.peak_tflops or 0:.4g} TFLOP/s ({hw.peak_source}); "
        f"busbw {hw.bus_gbps[0]:g} GB/s within {hw.per_node}/node, {hw.bus_gbps[1]:g} across ({hw.bandwidth_source}); {price}"
    )
    print(f"efficiency {cal.efficiency:.3g}: {cal.source}")
    for note in cal.notes:
        print(f"note: {note}")
    head = (
        f"{'world':>5} {'ZeRO':>4} {'micro':>5} {'acc':>4} {'params':>7} {'grads':>7} {'optim':>7} {'act':>7} {'act-ck':>7} "
        f"{'GiB/rank':>8} {'fits':>6} {'host/node':>9} {'step s':>9} {'comm s':>9} {'tokens/s':>10} {'MFU':>6} {'$/1M tok':>9} {'run h':>8} {'run $':>9}"
    )
    print(
        "memory in GiB per rank; act-ck: with activation checkpointing; fits: yes / ckpt (only with checkpointing) / no"
    )
    print(head)
    for p in points:
        if not p.feasible:
            print(f"{p.world_size:>5} {p.zero_stage:>4}  — {p.problem}")
            continue
        fits = "yes" if p.fits else ("ckpt" if p.fits_with_checkpointing else "no")
        cost = f"{p.cost_per_1m_tokens:.4g}" if p.cost_per_1m_tokens is not None else "—"
        run_h = f"{p.run_hours:.3g}" if p.run_hours is not None else "—"
        run_c = f"{p.run_cost:.4g}" if p.run_cost is not None else "—"
        mfu = f"{100 * p.mfu:.1f}%" if p.mfu is not None else "—"
        print(
            f"{p.world_size:>5} {p.zero_stage:>4} {p.micro_batch_size:>5} {p.grad_accum:>4} {_gib(p.params_bytes):>7} {_gib(p.grads_bytes):>7} "
            f"{_gib(p.optimizer_bytes):>7} {_gib(p.activations_bytes):>7} {_gib(p.activations_ckpt_bytes):>7} "
            f"{_gib(p.device_bytes):>8} {fits:>6} {_gib(p.host_offload_bytes_per_node):>9} {p.step_time_s:>9.4g} "
            f"{p.comm_s:>9.3g} {p.tokens_per_s:>10.4g} {mfu:>6} {cost:>9} {run_h:>8} {run_c:>9}"
        )
    print(
        f"host memory for the export at the end: {_gib(4.0 * shape.parameters)} GiB (one fp32 copy)"
    )


def cmd_sweep(args) -> int:
    from .sweep import load_sweep, run_sweep, validate

    path = Path(args.sweep_file)
    sweep = load_sweep(path)
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{path.stem}"
    validate(sweep, args.check, args.slurm, out)
    try:
        return run_sweep(sweep, out, args.slurm, args.dry_run)
    except KeyboardInterrupt:
        return 130


def cmd_report(args) -> int:
    from .report import write_report

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return report_config_error(
            "matplotlib is not installed: pip install 'zerotune[plot]' (or matplotlib)",
            prog="zerotune report",
        )
    d = Path(args.sweep_dir)
    if not (d / "results.csv").is_file():
        return report_config_error(
            f"{str(d)!r} has no results.csv: give the --out directory of a `zerotune sweep`",
            prog="zerotune report",
        )
    path = write_report(d)
    print(f"report: {path}", file=sys.stdout)
    return ExitCode.DONE
