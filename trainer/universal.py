"""Resume at another world size through DeepSpeed's universal checkpoint format.

A ZeRO checkpoint is sharded by data-parallel rank; DeepSpeed's ``ds_to_universal``
rewrites it per parameter (fp32 weights + optimizer moments), which any world size can load
with ``"checkpoint": {"load_universal": true}``. zerotune runs the conversion itself, once,
and keeps the result in ``step_N/universal/`` beside the original.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from pathlib import Path

from .checkpoint import ZERO_TAG


def convert_to_universal(ckpt: Path, out: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    workers = max(1, min(4, os.cpu_count() or 1))
    args = argparse.Namespace(
        input_folder=str(ckpt / ZERO_TAG),
        output_folder=str(tmp / ZERO_TAG),
        num_extract_workers=workers,
        num_merge_workers=max(1, workers // 2),
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # stages 1-2 do not record the universal-info state
    )
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        ds_to_universal.main(args)
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
