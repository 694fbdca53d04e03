"""Model-state memory per rank: predicted from counts, measured from the engine's tensors.

Model states are what a rank holds for the model besides activations: parameters, gradients
and optimizer states (fp32 master weights + Adam's two moments). ``predict_model_states``
is DeepSpeed's own arithmetic for ZeRO 0-3, read from its code (0.19) and checked against
``measure_model_states`` at every stage, with and without optimizer offload, on 1 and 2 ranks
(tests/test_memory.py, ±10 %). Per trainable parameter, with ``b`` the working dtype's bytes
(4 fp32, 2 bf16/fp16), ``W`` ranks and ``P`` / ``T`` all / trainable parameters:

=========  ==================  ==============================  ==================
stage      parameters          gradients                       optimizer
=========  ==================  ==============================  ==================
0          b·P                 b·T                             8·T (+4·T master if b=2)
1          b·P                 b·T/W (b·T between micro-steps  12·T/W
                               under accumulation; bf16: +4·T
                               fp32 whole-model copies)
2          b·P                 b·T/W (4·T/W under bf16)        12·T/W
3          b·P/W + b·P_pers    4·T/W                           12·T/W
DDP        b·P                 4·T (+4·T reducer buckets)      8·T
=========  ==================  ==============================  ==================

What the simple formula misses and is modelled here: at ZeRO 1-2 (fp32, and bf16 ZeRO-1)
DeepSpeed keeps the whole gradient of every parameter that *overlaps* a rank's partition, not
just the overlapping slice (``grad_partition_numel``); at ZeRO-3 parameters of at most
``stage3_param_persistence_threshold`` (1e5) elements stay whole on every rank
(``persistent_params``); optimizer offload adds the fp32 gradient partition beside the
master on the host, a host copy of the working-dtype partition, two staging buffers of the
largest parameter (``largest_param``), and at ZeRO-2 under accumulation a host accumulator
of the gradient partition. Padding of flat partitions (a few elements) is ignored.

``measure_model_states`` counts unique storages (a view is its whole storage, counted once)
in three passes: the module's parameters (at ZeRO-3 ``ds_tensor`` and the persistent ones),
then gradients (``.grad``, ``grad_accum`` / ``_hp_grad`` on the parameters, and every
optimizer-wrapper attribute named ``*grad*`` / ``ipg*``), then everything else the
optimizer holds (master partitions, ``optimizer.state``, offload buffers). A single call is
a snapshot; ``PeakStates`` keeps the maximum of snapshots taken after each backward and after
the step, which is where gradients are held.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default


@dataclass
class ModelStates:
    """Bytes held by one rank. ``host``: the part in host memory because of offload (None
    when not known, e.g. measured on a CPU-only run where everything is host memory)."""

    params: int
    grads: int
    optimizer: int
    total: int | None = None
    host: int | None = None

    def __post_init__(self) -> None:
        self.params, self.grads, self.optimizer = (
            int(self.params),
            int(self.grads),
            int(self.optimizer),
        )
        self.total = self.params + self.grads + self.optimizer

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def max(self, other: ModelStates) -> ModelStates:
        """Per category maximum (the total is their sum: what a rank must have room for)."""
        return ModelStates(
            max(self.params, other.params),
            max(self.grads, other.grads),
            max(self.optimizer, other.optimizer),
        )


def bytes_of(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def predict_model_states(
    num_params: int,
    num_trainable: int,
    *,
    zero_stage: int,
    world_size: int,
    precision: str,
    offload_optimizer: bool = False,
    offload_param: bool = False,
    engine: str = "deepspeed",
    grad_accum: int = 1,
    grad_accum_dtype: str | None = None,
    grad_partition_numel: int | None = None,
    persistent_params: int = 0,
    largest_param: int = 0,
) -> ModelStates:
    """The largest rank's model-state bytes (see the module docstring for the table).

    ``grad_accum_dtype``: DeepSpeed's ``data_types.grad_accum_dtype`` (``fp32`` / ``bf16``);
    default as zerotune writes it (fp32 under bf16 at ZeRO-2/3, and at ZeRO-1 with
    accumulation > 1). ``grad_partition_numel``: elements of the parameters overlapping the
    largest rank's partition (``partition_grad_numel``); default ``T/W``.
    """
    P, T, W = int(num_params), int(num_trainable), max(1, int(world_size))
    b = bytes_of(precision)
    part = math.ceil(T / W)
    overlap = grad_partition_numel if grad_partition_numel is not None else part
    if engine == "ddp":
        # DDP keeps fp32 weights (autocast computes in bf16); its reducer's flat buckets
        # hold a second copy of every gradient once there is more than one rank
        return ModelStates(4 * P, 4 * T * (2 if W > 1 else 1), 8 * T)
    if grad_accum_dtype is None:
        wide = precision != "fp32" and (zero_stage >= 2 or (zero_stage == 1 and grad_accum > 1))
        grad_accum_dtype = "fp32" if wide or precision == "fp32" else precision
    g = bytes_of(grad_accum_dtype)
    host = 0
    if zero_stage == 0:
        optimizer = 8 * T + (4 * T if b == 2 else 0)  # FP16/BF16 optimizer: fp32 master
        return ModelStates(b * P, b * T, optimizer)
    optimizer = 12 * part  # fp32 master partition + exp_avg + exp_avg_sq
    if zero_stage == 3:
        params = b * (P if W == 1 else math.ceil(P / W) + persistent_params)
        grads = g * part
        if offload_optimizer:
            grads += 4 * part  # the fp32 gradient partition on the host, beside the device one
            host = optimizer + 4 * part
        if offload_param:
            host += b * math.ceil(P / W)
        return ModelStates(params, grads, optimizer, host=host or None)
    params = b * P
    compact = g == 4 and b == 2  # fp32 accumulation of 16-bit grads: one exact partition
    partition_grads = g * (part if compact else overlap)
    if zero_stage == 1 and grad_accum > 1:
        # ZeRO-1 reduces at the boundary only: whole gradients live between micro-steps
        # (bf16: DeepSpeed's BF16_Optimizer, the 16-bit grads plus an fp32 copy of each)
        grads = b * T + (4 * T if b == 2 else 0)
    elif offload_optimizer:
        grads = 0  # reduced straight into the host's fp32 partition (below)
    else:
        grads = partition_grads
    if offload_optimizer:
        staging = 4 * largest_param + b * largest_param  # host and device staging buffers
        accumulator = g * overlap if zero_stage == 2 and grad_accum > 1 else 0
        grads += 4 * part + staging + accumulator
        optimizer += b * part  # host copy of the working-dtype partition
        host = optimizer + 4 * part + 4 * largest_param + accumulator
    return ModelStates(params, grads, optimizer, host=host or None)


# ---- the model's layout, for the prediction's corrections ---------------------------------


def optimizer_groups(model: torch.nn.Module) -> list[list[int]]:
    """Trainable parameter sizes in the optimizer's groups, in order (trainer.engine's
    ``param_groups``: decay, then no-decay), as DeepSpeed flattens and partitions them."""
    from .engine import param_groups

    return [[_numel(p) for p in g["params"]] for g in param_groups(model, 0.0)]


def partition_grad_numel(groups: list[list[int]], world_size: int) -> int:
    """The largest rank's elements of whole parameters that overlap its ZeRO-1/2 partition,
    summed over groups: each group is one flat buffer cut into ``world_size`` equal parts."""
    W = max(1, world_size)
    worst = 0
    for rank in range(W):
        held = 0
        for sizes in groups:
            part = math.ceil(sum(sizes) / W)
            lo, hi = rank * part, (rank + 1) * part
            offset = 0
            for n in sizes:
                if offset < hi and offset + n > lo:
                    held += n
                offset += n
        worst = max(worst, held)
    return worst


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 built partitioned: the real size


def persistent_numel(model: torch.nn.Module, threshold: int = PERSISTENCE_THRESHOLD) -> int:
    """Elements of the parameters ZeRO-3 keeps whole on every rank (numel ≤ threshold)."""
    return sum(_numel(p) for p in model.parameters() if _numel(p) <= threshold)


def predict_for_model(
    model: torch.nn.Module, cfg: Any, world_size: int, grad_accum: int, ds_config: dict | None
) -> ModelStates:
    """``predict_model_states`` with the corrections this model's layout needs."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    zero = (ds_config or {}).get("zero_optimization", {})
    threshold = int(zero.get("stage3_param_persistence_threshold", PERSISTENCE_THRESHOLD))
    accum_dtype = (ds_config or {}).get("data_types", {}).get("grad_accum_dtype")
    return predict_model_states(
        sum(_numel(p) for p in params),
        sum(_numel(p) for p in trainable),
        zero_stage=cfg.zero.stage,
        world_size=world_size,
        precision=cfg.precision,
        offload_optimizer=cfg.zero.offload_optimizer,
        offload_param=cfg.zero.offload_params,
        engine=cfg.engine,
        grad_accum=grad_accum,
        grad_accum_dtype={"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}.get(
            str(accum_dtype).lower()
        ),
        grad_partition_numel=partition_grad_numel(optimizer_groups(model), world_size),
        persistent_params=persistent_numel(model, threshold),
        largest_param=max((_numel(p) for p in trainable), default=0),
    )


# ---- measurement ---------------------------------------------------------------------------


class _Counter:
    """Unique storages, each counted once under the first category that reaches it."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes = {"params": 0, "grads": 0, "optimizer": 0}
        self.host = 0
        self.device_type = "cpu"

    def add(self, obj: Any, kind: str, depth: int = 0) -> None:
        if depth > 4 or obj is None:
            return
        if torch.is_tensor(obj):
            if obj.is_meta:
                return
            storage = obj.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.seen and storage.nbytes():
                self.seen.add(key)
                self.bytes[kind] += storage.nbytes()
                if obj.device.type == "cpu" and self.device_type != "cpu":
                    self.host += storage.nbytes()
            if obj.grad is not None:
                self.add(obj.grad, "grads", depth + 1)
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                self.add(x, kind, depth + 1)
        elif isinstance(obj, dict):
            for x in obj.values():
                self.add(x, kind, depth + 1)


def _is_grad_attribute(name: str) -> bool:
    return "grad" in name.lower() or name.startswith("ipg")


def measure_model_states(engine: Any) -> ModelStates:
    """This rank's model-state bytes now, read from the engine's own tensors (a zerotune
    ``DeepSpeedEngine`` / ``DDPEngine``, or a bare DeepSpeed engine)."""
    ds = getattr(engine, "engine", engine)
    module = getattr(ds, "module", None) or engine.module
    optimizer = getattr(ds, "optimizer", None) or getattr(engine, "optimizer", None)
    c = _Counter()
    c.device_type = getattr(getattr(engine, "device", None), "type", "cpu")
    params = list(module.parameters())
    for p in params:
        c.add(getattr(p, "ds_tensor", None), "params")
        if getattr(p, "ds_tensor", None) is None or getattr(p, "ds_persist", False):
            c.add(p.detach(), "params")
    for p in params:
        c.add(p.grad, "grads")
        for name, value in vars(p).items():
            if _is_grad_attribute(name):
                c.add(value, "grads")
    if optimizer is not None:
        wrapper_state = vars(optimizer)
        for name, value in wrapper_state.items():
            if _is_grad_attribute(name):
                c.add(value, "grads")
        for name, value in wrapper_state.items():
            if not _is_grad_attribute(name):
                c.add(value, "optimizer")
        base = getattr(optimizer, "optimizer", optimizer)
        for state in base.state.values():
            c.add(state, "optimizer")
    host = c.host if c.device_type != "cpu" else None
    grads = c.bytes["grads"] + _ddp_bucket_bytes(getattr(engine, "model", None))
    return ModelStates(c.bytes["params"], grads, c.bytes["optimizer"], host=host)


def _ddp_bucket_bytes(model: Any) -> int:
    """The flat gradient buckets of torch DDP's reducer (C++ tensors Python cannot walk), as
    DDP itself reports them (``_get_ddp_logging_data()["bucket_sizes"]``, bytes)."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return 0
    data = model._get_ddp_logging_data()
    if data.get("gradient_as_bucket_view"):
        return 0  # the .grad tensors are views into the buckets: counted already
    return sum(int(x) for x in re.findall(r"\d+", str(data.get("bucket_sizes", ""))))


class PeakStates:
    """Called by an engine after each backward and after the optimizer step of one step:
    the per-category maximum of those snapshots (gradients exist only within a step)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.peak: ModelStates | None = None

    def __call__(self) -> None:
        now = measure_model_states(self.engine)
        self.peak = now if self.peak is None else self.peak.max(now)


# ---- in the loop ------------------------------------------------------------------------------


def peak_memory_bytes(device: torch.device) -> int:
    """This rank's peak: CUDA's max allocated on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS bytes, Linux KiB


class MemoryWatch:
    """The loop's memory figures: the prediction (made once), the measured model states of one
    step (``arm`` before it, ``collect`` after it: a collective), and the peaks at the end."""

    def __init__(self, engine: Any, predicted: ModelStates, device: torch.device):
        self.engine, self.predicted, self.device = engine, predicted, device
        self.peak: PeakStates | None = None
        self.measured: list[dict[str, Any]] | None = None  # per rank
        self.step: int | None = None

    def arm(self) -> None:
        self.peak = PeakStates(self.engine)
        self.engine.probe = self.peak

    def collect(self, step: int) -> dict[str, Any]:
        """Every rank's measured states (gathered); the figures to log once."""
        from .distributed import all_gather_object

        self.engine.probe = None
        mine = self.peak.peak if self.peak and self.peak.peak else ModelStates(0, 0, 0)
        self.measured = all_gather_object(mine.as_dict())
        self.step = step
        figures = self.figures(all_gather_object(peak_memory_bytes(self.device)))
        return {k: v for k, v in figures.items() if not isinstance(v, (list, dict))}  # scalars

    def figures(self, peaks: list[int]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "peak_memory_bytes": max(peaks),
            "peak_memory_bytes_per_rank": peaks,
            "model_states_bytes_predicted": self.predicted.total,
            "model_states_predicted": self.predicted.as_dict(),
        }
        if self.measured:
            largest = max(self.measured, key=lambda m: m["total"])
            out.update(
                model_states_bytes_measured=largest["total"],
                model_states_bytes_measured_per_rank=[m["total"] for m in self.measured],
                model_states_measured=largest,
                model_states_step=self.step,
                model_states_error=self.predicted.total / largest["total"] - 1
                if largest["total"]
                else None,
            )
            for k in ("params", "grads", "optimizer"):
                out[f"model_states_{k}_bytes_measured"] = largest[k]
                out[f"model_states_{k}_bytes_predicted"] = getattr(self.predicted, k)
        return out

    def results(self) -> dict[str, Any]:
        """``results.json["memory"]``'s new keys (a collective: the peaks of every rank)."""
        from .distributed import all_gather_object

        return self.figures(all_gather_object(peak_memory_bytes(self.device)))
