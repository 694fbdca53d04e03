"""The batch job's device check, run by ``slurm/train.sbatch`` before ``srun`` starts ranks.

    python -m trainer.jobcheck CONFIG [--run-dir DIR] [--set KEY=VALUE ...]

Prints one line that names the device the job trains on (so a job that quietly got no GPU
says so at the top of its log) and exits 2 — before any rank exists — when the job needs a
GPU and torch sees none: it asked for GPUs (``--gpus-per-node`` and friends),
``ZEROTUNE_REQUIRE_GPU=1`` is set, or the config needs one (fp16, nccl). A config error
exits 2 here too. The rule is ``trainer.devices.job_device_check``.
"""

from __future__ import annotations

import os
import sys

from .config import ConfigError, load_config
from .devices import config_wants_gpu, job_device_check, visible_gpu_count
from .process import ExitCode, report_config_error


def main(argv: list[str] | None = None) -> int:
    from .main import build_parser

    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return report_config_error(e)
    import torch

    count = visible_gpu_count()
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    build = f"torch {torch.__version__} " + (
        f"(CUDA {torch.version.cuda})" if torch.version.cuda else "(a CPU-only build)"
    )
    line, problem = job_device_check(
        os.environ, count, names, config_wants_gpu(cfg.precision, cfg.launch.backend), build
    )
    print(line, flush=True)
    if problem:
        return report_config_error(problem)
    return ExitCode.DONE


if __name__ == "__main__":
    sys.exit(main())
