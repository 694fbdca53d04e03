"""Per-rank entry point that torchrun, srun and mpirun start.

    python -m trainer CONFIG [--run-dir DIR] [--set KEY=VALUE ...] [--resume auto|never|PATH]

Exit codes (``trainer.process.ExitCode``): 0 done, 2 configuration or input error,
75 preempted (checkpoint saved; start again to resume), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .gate import GATE_ENV, publish_data_check, watch_gate
from .process import (
    ExitCode,
    add_run_arguments,
    default_run_dir,
    quiet_libraries,
    report_config_error,
)
from .startup import CLOCK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="zerotune rank entry point")
    add_run_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from .preemption import install_interrupt_handler

    install_interrupt_handler()  # first: a Ctrl-C during imports or set-up is no traceback either
    gate = watch_gate()  # under `zerotune train`: its pre-flight's verdict (trainer/gate.py)
    args = build_parser().parse_args(argv)
    from .env import detect_env

    try:
        cfg = load_config(args.config, args.overrides)
        env = detect_env(os.environ)
        CLOCK.mark("imports")
        run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
        return run_rank(cfg, env, run_dir, args.resume)
    except (ConfigError, ValueError) as e:
        if os.environ.get("RANK", "0") == "0":  # the launcher's verdict waits for rank 0's record
            from .datacheck import refused

            publish_data_check(refused(e.problems if isinstance(e, ConfigError) else [str(e)]))
        try:
            gate.wait()  # the launcher's pre-flight finds it too: a stop ends us, it says it once
        except KeyboardInterrupt:
            return ExitCode.INTERRUPTED
        return report_config_error(e)
    except KeyboardInterrupt:  # before run_rank handles it (config, imports, rendezvous)
        return ExitCode.INTERRUPTED


def run_rank(cfg, env, run_dir: Path, resume: str) -> int:
    from .checkpoint import CheckpointError
    from .distributed import AgreedConfigError, configure_cpu_deepspeed, destroy, init_distributed

    quiet_libraries()
    check_data_for_launcher(cfg, env)  # first: bad data is refused without waiting for more
    if cfg.engine == "deepspeed":
        configure_cpu_deepspeed()
    import_model_machinery()
    CLOCK.mark("imports")
    try:
        env, device = init_distributed(env, cfg.launch.backend, cfg.launch.timeout_minutes)
        CLOCK.mark("process_group")
    except ConfigError as e:  # device binding or backend: before any rank trains
        watch_gate().wait()  # the pre-flight checks these too: print only past its gate
        # agreed from every rank's record: rank 0 speaks for all; else each for itself
        if not isinstance(e, AgreedConfigError):
            report_config_error(e if env.world_size == 1 else f"rank {env.rank}: {e}")
        elif env.rank == 0:
            report_config_error(e)
        destroy()
        return ExitCode.CONFIG
    from .distributed import LONG_WAIT_TIMEOUT
    from .preemption import install_interrupt_handler
    from .watchdog import note_phase, start_watchdog, stop_watchdog

    install_interrupt_handler()
    start_watchdog(
        env.rank,
        env.world_size,
        cfg.launch.timeout_minutes,
        LONG_WAIT_TIMEOUT.total_seconds(),
        run_dir,
    )
    orderly = False  # Ctrl-C or a lost peer: no group teardown (it may wait for the gone)
    try:
        from .loop import Trainer

        CLOCK.mark("imports")
        wait_for_preflight()
        code = Trainer(cfg, env, device, run_dir, resume).run()
        orderly = True
        return code
    except (ConfigError, CheckpointError) as e:
        orderly = True
        if env.rank == 0:
            report_config_error(e)
        return ExitCode.CONFIG
    except BaseException as e:
        code = _stopped_from_outside(e, env, run_dir)
        if code is None:  # this rank's own error: its traceback follows
            orderly = True
            note_phase(env.rank)
            raise
        return code
    finally:
        stop_watchdog()
        if orderly:
            destroy()


def import_model_machinery() -> None:
    """transformers' model machinery — torch._dynamo, DTensor, its losses (scipy): ~1.7 s of
    imports here, paid by whichever model the rank builds — and its table of model types,
    imported by every rank before the rendezvous. Under ``zerotune train`` the other ranks
    import while rank 0 runs the data check: they then wait at the rendezvous done with their
    imports, rather than idle there first and import afterwards while rank 0 waits for them."""
    import transformers.modeling_utils  # noqa: F401
    import transformers.models  # noqa: F401


def check_data_for_launcher(cfg, env) -> None:
    """Under ``zerotune train``, in rank 0: the pre-flight's data check, handed to the
    launcher, whose verdict follows from it (``trainer/gate.py``). Here, once this rank has
    imported torch (datasets and transformers follow in the check, as the rank needs them
    anyway), and before DeepSpeed and the process group: bad data is refused as soon as it
    can be, and no error path of this rank waits at the gate for a verdict that would wait
    for this record."""
    if env.rank != 0 or not os.environ.get(GATE_ENV):
        return
    CLOCK.mark("imports")
    from .datacheck import data_findings

    publish_data_check(data_findings(cfg))
    CLOCK.mark("data_check")


def wait_for_preflight() -> None:
    """Under ``zerotune train``: wait until its pre-flight passed and it holds the run
    directory's lock, before anything is written or read (a failed pre-flight ends this
    process meanwhile); the wait is its own start-up phase."""
    if os.environ.get(GATE_ENV):
        watch_gate().wait()
        CLOCK.mark("preflight_wait")


def _stopped_from_outside(e: BaseException, env, run_dir: Path) -> ExitCode | None:
    """Ctrl-C, or a collective that failed because another rank died or stopped: an exit code
    and at most one line, not this rank's traceback (None: an error of this rank's own)."""
    from .preemption import interrupted
    from .watchdog import STATUS_DIR_ENV, is_peer_failure, report_lost_peer, resume_hint

    try:
        if isinstance(e, KeyboardInterrupt) or interrupted():
            # under zerotune train the launcher says it once for all ranks
            if env.rank == 0 and not os.environ.get(STATUS_DIR_ENV):
                print(f"zerotune: interrupted — {resume_hint(run_dir)}", file=sys.stderr)
            return ExitCode.INTERRUPTED
        if env.world_size > 1 and is_peer_failure(e):
            report_lost_peer(env.rank, e)
            return ExitCode.PEER_LOST
    except KeyboardInterrupt:  # Ctrl-C that was pending while a collective failed
        return ExitCode.INTERRUPTED
    return None
