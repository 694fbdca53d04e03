"""Fault injection for tests of crash safety: ``ZEROTUNE_FAULT=<point>@<step>[:rank]``.

Points: ``step`` (die right after optimizer step N), ``save`` (die in the middle of writing
checkpoint N, before its commit), ``commit`` (die after the manifest, before the rename).
The process exits with code 66 via ``os._exit`` — no cleanup runs, as in a real crash.
Unset in normal use; it costs one dictionary lookup per call.
"""

from __future__ import annotations

import os
import sys

FAULT_ENV = "ZEROTUNE_FAULT"
FAULT_EXIT_CODE = 66


def _parse(spec: str) -> tuple[str, int, int | None]:
    point, _, rest = spec.partition("@")
    step, _, rank = rest.partition(":")
    return point, int(step), int(rank) if rank else None


def maybe_fail(point: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    want_point, want_step, want_rank = _parse(spec)
    rank = int(os.environ.get("RANK", "0"))
    if want_point == point and want_step == step and (want_rank is None or want_rank == rank):
        print(f"[zerotune] injected fault {spec!r} on rank {rank}", file=sys.stderr, flush=True)
        os._exit(FAULT_EXIT_CODE)
