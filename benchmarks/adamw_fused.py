"""torch AdamW on CPU tensors: fused (zerotune's default without optimizer offload) against
torch's CPU default (a for-loop over tensors; what the floor loop gets) and foreach, on MiniLM-sized parameters (22.6 M fp32: embeddings, 6 layers, LayerNorm / bias
vectors), median of 15 ``step()`` calls after 3 warm-up steps.

    python benchmarks/adamw_fused.py [THREADS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

SHAPES = [(30522, 384), (512, 384)] + [(384, 384)] * 24 + [(1536, 384), (384, 1536)] * 6
SHAPES += [(384,)] * 80


def step_seconds(**kwargs) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **kwargs)
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(15):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times), params[0].detach()


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
    torch.set_num_threads(threads)
    plain, _ = step_seconds()
    foreach, w_foreach = step_seconds(foreach=True)
    fused, w_fused = step_seconds(fused=True)
    n = sum(torch.Size(s).numel() for s in SHAPES) / 1e6
    print(
        f"{threads} thread(s), {n:.1f} M parameters: default {plain * 1e3:.1f} ms, "
        f"foreach {foreach * 1e3:.1f} ms, "
        f"fused {fused * 1e3:.1f} ms ({fused / foreach:.2f}×); "
        f"max |Δw| {float((w_foreach - w_fused).abs().max()):.1e}"
    )


if __name__ == "__main__":
    main()
