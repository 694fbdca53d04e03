"""Bit-exact fingerprints of what a rank holds, computed on the device.

Used at the end of a run to show that ranks agree and that a resumed run equals an
uninterrupted one, without gathering the model anywhere: each tensor is reduced on its own
device to one integer (a position-weighted sum of its raw bit patterns, exact in int64
arithmetic, so any flipped bit changes it), and only those integers reach the host.

* ``replicated``: what every rank holds whole (all parameters at ZeRO 0-2 and DDP; at
  ZeRO-3 the small parameters DeepSpeed keeps persistent, plus buffers): equal on every
  rank of a healthy run.
* ``shard``: this rank's own ZeRO-3 partition of every other parameter (empty below
  ZeRO-3): differs between ranks by design, equal between identical runs.
"""

from __future__ import annotations

import hashlib

import torch

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 20  # elements per reduction: bounds the int64 scratch memory (3 × 8 MB)
_MODULUS = 65521  # position weights 1..65521: never a multiple of 2


def tensor_checksum(t: torch.Tensor) -> int:
    flat = t.detach().reshape(-1)
    if flat.numel() == 0:
        return 0
    ints = flat.view(_INT_OF_SIZE[flat.element_size()])
    total = 0
    for start in range(0, ints.numel(), _CHUNK):
        c = ints[start : start + _CHUNK].to(torch.int64)
        w = torch.arange(start, start + c.numel(), device=c.device, dtype=torch.int64) % _MODULUS
        total += int((c * (w + 1)).sum())
    return total


def _digest(items: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in items:
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:{tensor_checksum(t)};".encode())
    return h.hexdigest()[:16]


def fingerprint(module: torch.nn.Module) -> dict[str, str]:
    """{"replicated": digest, "shard": digest} of this rank's parameters and buffers."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    replicated = [(n, p.data) for n, p in named]  # partitioned ZeRO-3 params hold 0 elements
    shard = [(n, p.ds_tensor) for n, p in named if getattr(p, "ds_tensor", None) is not None]
    return {"replicated": _digest(replicated), "shard": _digest(shard)}
