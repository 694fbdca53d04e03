"""Peak FLOP/s and prices per device: the denominators of MFU and the rate of cost.

``peak_tflops(device_name, precision)`` looks the device up in ``PEAK_TFLOPS`` (dense tensor
throughput, no 2:4 sparsity), or takes the config's override; a CPU has no table row, so its
peak is measured once with a matmul probe (``measure_cpu_peak_tflops``) and cached under the
user cache dir, keyed by CPU model, threads and dtype. ``price_per_device_hour`` does the
same for money. Both return ``(value, where it came from)`` so a report can say which.

Precision names: ``bf16``, ``fp16`` (tensor cores, fp32 accumulate), ``tf32`` (fp32 training
with TF32 matmuls allowed), ``fp32`` (plain fp32 FMA units).
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

# Dense peak TFLOP/s from NVIDIA's datasheets (the "with sparsity" figures halved): H100 /
# H200 (SXM5: 989.4 bf16, 494.7 tf32, 66.9 fp32; PCIe 756.5 / 378 / 51.2), A100 (312 / 156
# / 19.5, the same for 40 and 80 GB), L40S (362 / 183 / 91.6), L4 (121 / 60 / 30.3), A10
# (125 / 62.5 / 31.2), A10G (AWS's A10 variant: 70 / 35 / 31.2, AWS g5 documentation), V100
# (SXM2: 125 fp16 tensor / 15.7 fp32; no bf16, no tf32), RTX 4090 (165.2 fp16/bf16 with fp32
# accumulate / 82.6 tf32 and fp32), RTX A6000 (154.8 / 77.4 / 38.7), B200 (2250 / 1100 /
# 80), T4 (65 fp16 / 8.1 fp32).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "A100 80GB": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A100 40GB": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "RTX A6000": {"bf16": 154.8, "fp16": 154.8, "tf32": 77.4, "fp32": 38.7},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "T4": {"fp16": 65.0, "fp32": 8.1},
}
PEAK_SOURCE = "NVIDIA datasheets, dense (sparsity figures halved)"

# torch.cuda.get_device_name → table row; first match wins (H100 NVL / PCIe before SXM)
_DEVICE_PATTERNS: list[tuple[str, str]] = [
    (r"B200", "B200"),
    (r"H200", "H200"),
    (r"H100.*(PCIe|NVL)", "H100 PCIe"),
    (r"H100", "H100 SXM"),
    (r"A100.*80", "A100 80GB"),
    (r"A100", "A100 40GB"),
    (r"L40S", "L40S"),
    (r"A6000", "RTX A6000"),
    (r"4090", "RTX 4090"),
    (r"A10G", "A10G"),
    (r"\bA10\b", "A10"),
    (r"\bL4\b", "L4"),
    (r"V100", "V100"),
    (r"\bT4\b", "T4"),
]

# On-demand list prices, USD per device-hour. Entered on PRICES_AS_OF from the providers'
# published price lists as known then (not re-read online: no network where this was
# written); a cloud's 8-GPU instance divided by 8. Override with scaling.price_per_device_hour.
PRICES_AS_OF = "2026-11-29"
PRICE_SOURCE = (
    "on-demand list prices (Lambda Cloud per-GPU for H100/H200/A100/B200; AWS EC2 us-east-1 "
    "single-GPU instances for A10G g5.xlarge, L4 g6.xlarge, L40S g6e.xlarge, V100 p3.2xlarge, "
    "T4 g4dn.xlarge); CPU: AWS c7i per vCPU-hour × cores"
)
PRICES_PER_DEVICE_HOUR: dict[str, float] = {
    "B200": 4.99,
    "H200": 3.79,
    "H100 SXM": 2.99,
    "H100 PCIe": 2.49,
    "A100 80GB": 1.79,
    "A100 40GB": 1.29,
    "L40S": 1.861,
    "RTX A6000": 0.80,
    "RTX 4090": 0.69,
    "A10G": 1.006,
    "A10": 0.75,
    "L4": 0.805,
    "V100": 3.06,
    "T4": 0.526,
}
# A CPU "device" is one rank: its torch threads (cores) at a general-purpose cloud's price
# per vCPU-hour (AWS c7i.large, $0.08925/h for 2 vCPU).
CPU_PRICE_PER_CORE_HOUR = 0.0446


def match_device(device_name: str) -> str | None:
    """The ``PEAK_TFLOPS`` row of a ``torch.cuda.get_device_name`` string (or a row name)."""
    if device_name in PEAK_TFLOPS:
        return device_name
    for pattern, row in _DEVICE_PATTERNS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return row
    return None


def is_cpu(device_name: str) -> bool:
    return device_name.lower() == "cpu" or device_name.lower().startswith("cpu:")


def peak_tflops(
    device_name: str, precision: str, override: float | None = None
) -> tuple[float | None, str]:
    """(peak TFLOP/s of one device at ``precision``, its source). CPU: the cached probe."""
    if override is not None:
        return float(override), "config"
    if is_cpu(device_name):
        dtype = "bf16" if precision == "bf16" else "fp32"
        return measure_cpu_peak_tflops(dtype), "measured: cpu matmul probe"
    row = match_device(device_name)
    if row is None:
        return None, f"unknown device {device_name!r}: set scaling.peak_tflops_per_device"
    value = PEAK_TFLOPS[row].get(precision)
    if value is None:
        return None, f"table: {row} has no {precision} figure"
    return value, f"table: {row}"


def price_per_device_hour(
    device_name: str, override: float | None = None, cores: int | None = None
) -> tuple[float | None, str]:
    """(USD per device-hour, its source); a CPU rank costs its ``cores`` at the core price."""
    if override is not None:
        return float(override), "config"
    if is_cpu(device_name):
        n = cores or os.cpu_count() or 1
        return (
            CPU_PRICE_PER_CORE_HOUR * n,
            f"cpu: {n} core(s) × ${CPU_PRICE_PER_CORE_HOUR}/core-hour",
        )
    row = match_device(device_name)
    if row is None or row not in PRICES_PER_DEVICE_HOUR:
        return None, f"no price for {device_name!r}: set scaling.price_per_device_hour"
    return PRICES_PER_DEVICE_HOUR[row], f"table: {row}"


# ---- the CPU probe ------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), the probe cache's key."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "zerotune" / "cpu_peak_tflops.json"


PROBE_N = 512  # matrix side: cache-resident per core, so other processes' load disturbs it least


def _probe(dtype: str, n: int = PROBE_N, seconds: float = 1.0) -> float:
    """Best TFLOP/s of an ``n × n`` matmul over ``seconds`` (after one warm-up): the
    achievable dense peak of this process's torch threads on this CPU. On a loaded 2-core
    machine 512² gave a steady 0.105-0.109 TFLOP/s per thread where 1024² gave 0.024-0.043
    (likely its operands leaving a cache the other processes share): the best sustained
    rate is what a peak should be."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(n, n).to(dt)
    b = torch.randn(n, n).to(dt)
    a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best / 1e12


def measure_cpu_peak_tflops(dtype: str = "fp32") -> float:
    """The probe's figure for this CPU model, thread count and dtype: from the cache file when
    it has one, otherwise measured now (~1 s) and cached. Best of many runs, so other load
    on the machine lowers it less than it lowers a training step."""
    import torch

    key = f"{cpu_model()}|threads={torch.get_num_threads()}|{dtype}|matmul{PROBE_N}"
    path = cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return float(cached[key])
    value = _probe(dtype)
    cached[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measured again next time
    return value
