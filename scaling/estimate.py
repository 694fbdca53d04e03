"""Memory and step-time model of a data-parallel ZeRO run, per world size and ZeRO stage.

    zerotune estimate configs/sst2-minilm.yaml --world-sizes 1,8,64,512 --zero 0,1,2,3 --gpu H100
    zerotune estimate configs/demo.yaml --gpu cpu --world-sizes 1,2 --calibrate runs/demo-1rank --bandwidth 1.2

**Memory per rank** (bytes). Model states — parameters, gradients, optimizer states with
ZeRO's split and offload — are ``trainer.memory.predict_model_states``, the same function
a run checks against its measured tensors (the part it puts on the host under offload is
host memory, per node × the node's ranks). Activations follow Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", eq. 1): a transformer
block keeps ``s·b·h·(34 + 5·a·s/h)`` bytes with 2-byte activations and 1-byte dropout
masks. Split by element size ``e`` that is ``s·b·h·(16·e + 2)`` plus ``a·s²·b·(2·e + 1)`` for
the attention scores; the score term is dropped (``attention="sdpa"``, the default) because
transformers' SDPA / flash attention never stores the ``s × s`` matrix. With activation
checkpointing a block keeps only its input (``e·s·b·h``) and one block's full set lives
during its recomputation. A causal LM adds its logits, ``b·s·V·(e + 4)`` (the fp32 copy the
loss takes). Host memory: the offloaded optimizer states (and parameters) of the node's
ranks, and one fp32 copy of the model for the export at the end (``4·N``, rank 0's host). A point *fits*
when model states + activations + ``RESERVED_BYTES`` (CUDA context, allocator slack,
communication buckets) are within the device's memory.

**Step time** = compute + communication (+ offload transfers), no overlap assumed:

* compute = model FLOPs of the step on one rank / (peak × efficiency), FLOPs from
  ``trainer.flops.flops_per_token`` at the tokens per sample the run sees;
* communication = bytes each rank sends in a step / bus bandwidth (nccl-tests' *busbw*,
  what ``zerotune doctor`` prints): ring all-reduce sends ``2(n-1)/n·B`` per rank for ``B``
  bytes, reduce-scatter and all-gather ``(n-1)/n·B`` each. Per optimizer step with ``k``
  accumulation micro-steps and ``P`` parameters (``g``/``w``: gradient / weight bytes):
  ZeRO-0 and DDP one gradient all-reduce ``2(n-1)/n·P·g``; ZeRO-1 a reduce-scatter of the
  gradients at the boundary and an all-gather of the updated weights ``(n-1)/n·P·(g+w)``;
  ZeRO-2 reduce-scatters every micro-step ``k·(n-1)/n·P·g + (n-1)/n·P·w``; ZeRO-3
  all-gathers the weights in forward and backward and reduce-scatters the gradients every
  micro-step ``k·(n-1)/n·P·(2w + g)``;
* offload: the rank's gradient partition to the host and its weights back over PCIe, and
  the host's optimizer step at ``HOST_ADAM_BYTES_PER_S``; parameter offload fetches the
  rank's partition for forward and backward of every micro-step.

Efficiency (default ``DEFAULT_EFFICIENCY``) and bandwidth (a per-device default, within a
node or across nodes) are calibrated from a measured run (``--calibrate RUN_DIR``: its step
time, tokens per sample and peak; efficiency = its compute FLOPs / (peak × (step time −
modelled communication))) and from ``zerotune doctor``'s busbw (``--bandwidth``). Cost is
the device-hour price (``trainer.hardware``) × devices × time.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer import flops, hardware
from trainer.config import ConfigError

from .shape import ModelShape

GIB = 2**30
RESERVED_BYTES = 2 * GIB  # CUDA context (~0.5 GiB), allocator fragmentation, ZeRO buckets
DEFAULT_EFFICIENCY = 0.40  # achieved / peak FLOP/s of well-tuned dense fine-tuning on GPUs
HOST_ADAM_BYTES_PER_S = 10e9  # host memory traffic of a CPU Adam step, per rank
PCIE_GBPS = 25.0  # host ↔ device, one direction (PCIe gen4 x16 in practice)
# device memory in GiB (what cudaMemGetInfo reports, rounded) — datasheets
DEVICE_MEMORY_GIB = {
    "B200": 180, "H200": 141, "H100 SXM": 80, "H100 PCIe": 80, "A100 80GB": 80, "A100 40GB": 40,
    "L40S": 48, "RTX A6000": 48, "RTX 4090": 24, "A10G": 24, "A10": 24, "L4": 24, "V100": 32, "T4": 16,
}  # fmt: skip
# all-reduce busbw in GB/s, (within a node, across nodes per GPU): NVLink generations as
# nccl-tests measure them on 8-GPU servers; across nodes one 400 Gb/s (H100/H200/B200) or
# 200 Gb/s (A100) InfiniBand NIC per GPU; PCIe cards: PCIe gen4 through the host
BUS_GBPS = {
    "B200": (700.0, 45.0), "H200": (450.0, 45.0), "H100 SXM": (450.0, 45.0),
    "H100 PCIe": (50.0, 22.0), "A100 80GB": (230.0, 22.0), "A100 40GB": (230.0, 22.0),
    "V100": (130.0, 10.0), "cpu": (1.0, 1.0),
}  # fmt: skip
PCIE_CARD_GBPS = (20.0, 10.0)
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class Hardware:
    name: str  # a row of trainer.hardware.PEAK_TFLOPS, or "cpu"
    memory_bytes: float
    peak_tflops: float | None
    peak_source: str
    price: float | None
    price_source: str
    bus_gbps: tuple[float, float]  # (within a node, across nodes)
    per_node: int  # devices per node
    bandwidth_source: str = "default table"
    cores: int = 1  # cpu: the machine's cores; peak_tflops is theirs (device_peak splits it)
    omp_threads: int | None = None  # cpu: OMP_NUM_THREADS where set (every rank's threads)


@dataclass
class Calibration:
    efficiency: float = DEFAULT_EFFICIENCY
    tokens_per_sample: float | None = None  # non-padding tokens; None: data.max_length
    source: str = f"default efficiency {DEFAULT_EFFICIENCY}"
    notes: list[str] = field(default_factory=list)


@dataclass
class Point:
    world_size: int
    zero_stage: int
    feasible: bool
    problem: str = ""
    grad_accum: int | None = None
    micro_batch_size: int | None = None
    params_bytes: float = 0.0
    grads_bytes: float = 0.0
    optimizer_bytes: float = 0.0
    model_states_bytes: float = 0.0
    activations_bytes: float = 0.0
    activations_ckpt_bytes: float = 0.0
    device_bytes: float = 0.0
    device_bytes_ckpt: float = 0.0
    fits: bool = False
    fits_with_checkpointing: bool = False
    host_offload_bytes_per_node: float = 0.0
    host_export_bytes: float = 0.0
    comm_bytes_per_rank: float = 0.0
    compute_s: float = 0.0
    comm_s: float = 0.0
    offload_s: float = 0.0
    step_time_s: float = 0.0
    tokens_per_s: float = 0.0
    tflops_per_device: float = 0.0
    mfu: float | None = None
    cost_per_1m_tokens: float | None = None
    run_steps: int | None = None
    run_hours: float | None = None
    run_cost: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_device(gpu: str) -> str:
    """The table row of ``--gpu`` (or ``cpu``); ValueError names an unknown one and the known."""
    if hardware.is_cpu(gpu):
        return "cpu"
    name = hardware.match_device(gpu)
    if name is None or name not in DEVICE_MEMORY_GIB:
        known = ", ".join(["cpu", *DEVICE_MEMORY_GIB])
        raise ConfigError(f"--gpu {gpu!r}: unknown device; choose one of {known}")
    return name


def device_hardware(
    gpu: str, precision: str, per_node: int | None = None, bandwidth: float | None = None
) -> Hardware:
    """The device's table rows (ConfigError for an unknown device)."""
    import psutil

    cores = 1
    if hardware.is_cpu(gpu):
        import torch

        cores = os.cpu_count() or 1
        peak, peak_src = hardware.peak_tflops("cpu", precision)
        peak = peak / torch.get_num_threads() * cores  # the probe ran on this process's threads
        price, price_src = hardware.price_per_device_hour("cpu", cores=cores)
        node = per_node or 10**6  # one machine holds every rank
        mem = psutil.virtual_memory().total
        bus = BUS_GBPS["cpu"]
        name = "cpu"
    else:
        name = check_device(gpu)
        peak, peak_src = hardware.peak_tflops(name, precision)
        price, price_src = hardware.price_per_device_hour(name)
        mem = DEVICE_MEMORY_GIB[name] * GIB
        bus = BUS_GBPS.get(name, PCIE_CARD_GBPS)
        node = per_node or 8
    omp = os.environ.get("OMP_NUM_THREADS", "")
    hw = Hardware(name, mem, peak, peak_src, price, price_src, bus, node, cores=cores)
    hw.omp_threads = int(omp) if omp.isdigit() and int(omp) > 0 else None
    if bandwidth is not None:
        hw.bus_gbps, hw.bandwidth_source = (bandwidth, bandwidth), "given"
    return hw


# ---- memory -----------------------------------------------------------------------------
def activation_bytes(
    shape: ModelShape, micro: int, seq: int, precision: str, attention: str = "sdpa"
) -> tuple[float, float]:
    """(without, with activation checkpointing) bytes of one rank's activations."""
    e = BYTES[precision]
    sbh = float(seq) * micro * shape.hidden
    per_layer = sbh * (16 * e + 2)
    if attention == "eager":
        per_layer += shape.heads * float(seq) ** 2 * micro * (2 * e + 1)
    logits = float(micro) * seq * shape.vocab * (e + 4) if shape.lm_head else 0.0
    embeddings = sbh * e
    full = shape.layers * per_layer + logits + embeddings
    ckpt = shape.layers * sbh * e + per_layer + logits + embeddings
    return full, ckpt


def model_states(shape: ModelShape, cfg, stage: int, world: int, accum: int):
    """``trainer.memory``'s prediction (a run checks it against its tensors): ``total``
    includes the offloaded part, ``host``."""
    from trainer.memory import partition_grad_numel, predict_model_states

    return predict_model_states(
        shape.parameters,
        shape.trainable,
        zero_stage=stage,
        world_size=world,
        precision=cfg.precision,
        offload_optimizer=cfg.zero.offload_optimizer and stage > 0,
        offload_param=cfg.zero.offload_params and stage == 3,
        engine=cfg.engine,
        grad_accum=accum,
        grad_partition_numel=partition_grad_numel(shape.groups, world) if shape.groups else None,
        persistent_params=shape.persistent_params if stage == 3 else 0,
        largest_param=shape.largest_param,
    )


# ---- time -------------------------------------------------------------------------------
def comm_bytes(
    shape: ModelShape, precision: str, stage: int, world: int, accum: int, engine: str
) -> float:
    """Bytes one rank sends per optimizer step (ring algorithms; see the module docstring)."""
    if world <= 1:
        return 0.0
    frac = (world - 1) / world
    w = BYTES[precision]
    g = 4 if engine == "ddp" or precision == "fp32" else w  # DDP / fp32 reduce fp32 gradients
    p_all, p_train = float(shape.parameters), float(shape.trainable)
    if stage == 0:
        return 2 * frac * p_train * g
    if stage == 1:
        return frac * p_train * (g + w)
    if stage == 2:
        return accum * frac * p_train * g + frac * p_train * w
    return accum * frac * (2 * p_all * w + p_train * g)


def offload_seconds(shape: ModelShape, cfg, stage: int, world: int, accum: int = 1) -> float:
    """Host ↔ device traffic and the host's optimizer step; parameter offload fetches the
    rank's partition for forward and backward of every micro-step."""
    out = 0.0
    if cfg.zero.offload_optimizer and stage > 0:
        part = shape.trainable / world
        out += part * (4 + BYTES[cfg.precision]) / (PCIE_GBPS * 1e9)
        out += part * 32 / HOST_ADAM_BYTES_PER_S  # read + write master, m, v and the gradient
    if cfg.zero.offload_params and stage == 3:
        out += 2 * accum * shape.parameters / world * BYTES[cfg.precision] / (PCIE_GBPS * 1e9)
    return out


def device_peak(hw: Hardware, world: int) -> float:
    """Peak TFLOP/s of one rank. A GPU is its own; on a CPU a rank computes with its threads:
    OMP_NUM_THREADS where set, else the machine's cores when it is alone and one thread
    otherwise (torchrun's default); the ranks share the machine's memory."""
    if hw.name != "cpu":
        return hw.peak_tflops or 0.0
    alone = min(world, hw.per_node) == 1
    threads = hw.omp_threads or (hw.cores if alone else 1)
    return (hw.peak_tflops or 0.0) / hw.cores * threads


def bandwidth_for(hw: Hardware, world: int) -> float:
    within, across = hw.bus_gbps
    return within if world <= hw.per_node else across


def flops_per_step_per_rank(
    shape: ModelShape, tokens_per_sample: float, global_batch: int, world: int
) -> float:
    fpt = flops.flops_per_token(
        shape.config, tokens_per_sample, shape.trainable_fraction, lm_head=shape.lm_head
    )
    return fpt * tokens_per_sample * global_batch / world


def global_batch(cfg, world: int) -> tuple[int | None, int | None, int | None, str]:
    """(global batch, accumulation, micro batch, problem) at a world size.

    The config's global batch is kept (the trainer's invariant); where ``micro × world``
    outgrows it the micro batch shrinks to ``global / world``, as one would configure it.
    """
    micro = cfg.train.micro_batch_size
    glob = cfg.train.global_batch_size or micro * world
    if glob % (micro * world) == 0:
        return glob, glob // (micro * world), micro, ""
    if micro * world > glob and glob % world == 0:
        return glob, 1, glob // world, ""
    return (
        None,
        None,
        None,
        (f"global batch {glob} does not split into micro {micro} × accumulation × world {world}"),
    )


def estimate_point(
    shape: ModelShape, cfg, hw: Hardware, cal: Calibration, world: int, stage: int,
    run_steps: int | None = None, tokens_target: float | None = None,
) -> Point:  # fmt: skip
    """Memory, fit, step time, throughput, MFU and cost of one (world size, ZeRO stage)."""
    glob, accum, micro, problem = global_batch(cfg, world)
    if cfg.engine == "ddp" and stage != 0:
        problem = problem or "engine=ddp cannot shard: ZeRO 0 only"
    if problem:
        return Point(world, stage, False, problem)
    seq = cfg.data.max_length
    tokens = cal.tokens_per_sample or float(seq)
    ms = model_states(shape, cfg, stage, world, accum)
    act, act_ckpt = activation_bytes(shape, micro, seq, cfg.precision)
    p = Point(world, stage, True, grad_accum=accum, micro_batch_size=micro)
    p.params_bytes, p.grads_bytes, p.optimizer_bytes = ms.params, ms.grads, ms.optimizer
    p.model_states_bytes = ms.total
    p.activations_bytes, p.activations_ckpt_bytes = act, act_ckpt
    on_device = ms.total - (ms.host or 0) + RESERVED_BYTES * (hw.name != "cpu")
    p.device_bytes = on_device + act
    p.device_bytes_ckpt = on_device + act_ckpt
    ranks = min(world, hw.per_node) if hw.name == "cpu" else 1  # ranks sharing the memory
    p.fits = p.device_bytes * ranks <= hw.memory_bytes
    p.fits_with_checkpointing = p.device_bytes_ckpt * ranks <= hw.memory_bytes
    p.host_offload_bytes_per_node = (ms.host or 0) * min(world, hw.per_node)
    p.host_export_bytes = 4.0 * shape.parameters
    f_rank = flops_per_step_per_rank(shape, tokens, glob, world)
    peak = device_peak(hw, world)
    if peak:
        p.compute_s = f_rank / (peak * 1e12 * cal.efficiency)
    p.comm_bytes_per_rank = comm_bytes(shape, cfg.precision, stage, world, accum, cfg.engine)
    p.comm_s = p.comm_bytes_per_rank / (bandwidth_for(hw, world) * 1e9)
    p.offload_s = offload_seconds(shape, cfg, stage, world, accum)
    p.step_time_s = p.compute_s + p.comm_s + p.offload_s
    if p.step_time_s <= 0:
        return p
    p.tokens_per_s = tokens * glob / p.step_time_s
    p.tflops_per_device = f_rank / p.step_time_s / 1e12
    p.mfu = p.tflops_per_device / peak if peak else None
    if hw.price is not None:
        p.cost_per_1m_tokens = hw.price * world * 1e6 / p.tokens_per_s / 3600
    steps = run_steps
    if tokens_target:
        steps = int(-(-tokens_target // (tokens * glob)))
    if steps:
        p.run_steps = steps
        p.run_hours = steps * p.step_time_s / 3600
        p.run_cost = p.run_hours * world * hw.price if hw.price is not None else None
    return p


def estimate(
    shape: ModelShape, cfg, hw: Hardware, cal: Calibration, worlds: list[int], stages: list[int],
    run_steps: int | None = None, tokens_target: float | None = None,
) -> list[Point]:  # fmt: skip
    return [
        estimate_point(shape, cfg, hw, cal, w, z, run_steps, tokens_target)
        for z in stages
        for w in worlds
    ]
