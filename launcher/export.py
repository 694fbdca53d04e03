"""``zerotune export RUN_DIR|CHECKPOINT --out DIR``: a consolidated Hugging Face model.

Any ZeRO stage, any original world size, CPU only; loadable with ``from_pretrained``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from trainer.process import ExitCode


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
    p.set_defaults(func=run)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args) -> int:
    from trainer.checkpoint import CheckpointError, resolve_resume
    from trainer.export import export_checkpoint

    src = Path(args.source)
    try:
        ckpt = resolve_resume(
            src,
            "auto" if (src / "checkpoints").is_dir() else str(src),
            warn=lambda m: print(m, file=sys.stderr),
        )
    except CheckpointError as e:
        print(f"zerotune export: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    if ckpt is None:
        print(f"zerotune export: no checkpoint in {src}", file=sys.stderr)
        return ExitCode.CONFIG
    t0 = time.perf_counter()
    out = export_checkpoint(ckpt, Path(args.out), args.max_shard_size)
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    print(
        f"exported {ckpt} → {out} ({size / 2**20:.1f} MB of safetensors) in {time.perf_counter() - t0:.1f}s; "
        f"peak host memory {peak_rss_mb():.0f} MB"
    )
    return ExitCode.DONE
