"""``zerotune export RUN_DIR|CHECKPOINT --out DIR``: a consolidated Hugging Face model.

Any ZeRO stage, any original world size, CPU only; loadable with ``from_pretrained``.
A PEFT run gives its adapter (``PeftModel.from_pretrained(base, DIR)``), or with ``--merge``
the base with the adapters merged in (plain ``from_pretrained``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from trainer.process import ExitCode, report_config_error


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a consolidated Hugging Face model (safetensors + tokenizer) from a checkpoint",
    )
    p.add_argument(
        "source", help="a run directory (its newest valid checkpoint) or a checkpoint directory"
    )
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")
    p.add_argument(
        "--merge",
        action="store_true",
        help="PEFT runs: the base model with the adapters merged in (plain from_pretrained) "
        "instead of the adapter (PeftModel.from_pretrained); full fine-tuning exports are plain models anyway",
    )
    p.set_defaults(func=run)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args) -> int:
    from trainer.checkpoint import CheckpointError, read_manifest, resolve_resume
    from trainer.export import export_checkpoint

    src = Path(args.source)
    try:
        ckpt = resolve_resume(
            src,
            "auto" if (src / "checkpoints").is_dir() else str(src),
            warn=lambda m: print(m, file=sys.stderr),
        )
    except CheckpointError as e:
        return report_config_error(e, prog="zerotune export")
    if ckpt is None:
        return report_config_error(f"no checkpoint in {src}", prog="zerotune export")
    t0 = time.perf_counter()
    try:
        out = export_checkpoint(ckpt, Path(args.out), args.max_shard_size, merge=args.merge)
    except CheckpointError as e:
        return report_config_error(e, prog="zerotune export")
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    peft = bool(read_manifest(ckpt).get("peft"))
    kind = ("merged model" if args.merge else "adapter") if peft else "model"
    print(
        f"exported {ckpt} → {out} ({kind}, {size / 2**20:.1f} MB of safetensors) in {time.perf_counter() - t0:.1f}s; "
        f"peak host memory {peak_rss_mb():.0f} MB"
    )
    return ExitCode.DONE
