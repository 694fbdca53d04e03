"""zerotune submit (work in progress)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="(not yet available)")
    p.set_defaults(func=lambda args: print("zerotune submit: not yet available") or 1)
