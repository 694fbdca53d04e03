"""The DeepSpeed config is generated from the one YAML; a user JSON may add to it.

A user JSON's ``"auto"`` values are filled from the YAML; a concrete value that contradicts
the YAML is an error naming both, so batch size, precision, ZeRO stage and clipping have
exactly one source of truth.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .batch import BatchPlan
from .config import ConfigError, RunConfig
from .ops import BuildEnv, OptimizerPlan, optimizer_plan

_MISSING = object()


def generate(
    cfg: RunConfig,
    plan: BatchPlan,
    on_gpu: bool,
    load_universal: bool = False,
    build: BuildEnv | None = None,
    opt: OptimizerPlan | None = None,
) -> dict[str, Any]:
    """Raises ConfigError when the optimizer would need a JIT build that cannot succeed here.

    ``opt``: the engine's ``optimizer_plan`` (computed once, trainer/ops.py); else computed here.
    """
    t = cfg.train
    opt = opt or optimizer_plan(cfg, on_gpu, build)
    if opt.problem:
        raise ConfigError(opt.problem)
    zero: dict[str, Any] = {"stage": cfg.zero.stage}
    if cfg.zero.stage >= 1:
        zero["offload_optimizer"] = {
            "device": "cpu" if cfg.zero.offload_optimizer else "none",
            "pin_memory": on_gpu,
        }
    if cfg.zero.stage == 3:
        zero["offload_param"] = {
            "device": "cpu" if cfg.zero.offload_params else "none",
            "pin_memory": on_gpu,
        }
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ds: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accum,
        "gradient_clipping": t.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {
            "enabled": cfg.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if fp32_accumulation(cfg, plan):
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if opt.deepspeed:
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": t.eps,
                "weight_decay": t.weight_decay,
            },
        }
    return ds


def fp32_accumulation(cfg: RunConfig, plan: BatchPlan) -> bool:
    """bf16 gradients accumulated over micro-batches in fp32 (``data_types.grad_accum_dtype``).

    bf16 gradients summed over micro-batches in bf16 lose the small contributions. DeepSpeed
    0.19 accumulates in fp32 at ZeRO-2 and 3 (fp32 gradient partitions: +4 B/param ÷ world)
    and refuses the mix at ZeRO-0 ("unsupported mix of model_dtype and grad_accum_dtype"). At
    ZeRO-1 (without optimizer offload) it switches to its BF16_Optimizer: fp32 gradients of
    the whole model on every rank (+4 B/param, not sharded), all-reduced in fp32, and a
    ``bf16_zero_*`` checkpoint layout — worth it only when there is something to accumulate,
    so ZeRO-1 asks for it only when the plan accumulates (accumulation > 1).
    """
    if cfg.engine != "deepspeed" or cfg.precision != "bf16" or cfg.zero.stage == 0:
        return False
    return cfg.zero.stage >= 2 or plan.accum > 1


def accumulation_note(cfg: RunConfig, ds: dict[str, Any]) -> str | None:
    """Pre-flight: the memory the fp32 accumulation costs where it is not sharded (ZeRO-1)."""
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    if not (
        cfg.precision == "bf16"
        and cfg.zero.stage == 1
        and not cfg.zero.offload_optimizer
        and accum in ("fp32", "float32")
    ):
        return None
    return (
        f"bf16 at ZeRO-1 with gradient accumulation {ds.get('gradient_accumulation_steps')}: gradients "
        "accumulate in fp32 (DeepSpeed's BF16_Optimizer), which keeps fp32 gradients of the whole model "
        "on every rank (+4 B/param, not sharded) and all-reduces them in fp32; zero.stage=2 shards them, "
        'or a deepspeed_config JSON with "data_types": {"grad_accum_dtype": "bf16"} trades the precision '
        "back for memory"
    )


# DeepSpeed key path → the YAML key that owns it (for conflict messages).
OWNERS: dict[tuple[str, ...], str] = {
    ("train_batch_size",): "train.global_batch_size",
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.global_batch_size / (micro_batch_size × world size)",
    ("gradient_clipping",): "train.max_grad_norm",
    ("zero_optimization", "stage"): "zero.stage",
    ("zero_optimization", "offload_optimizer", "device"): "zero.offload_optimizer",
    ("zero_optimization", "offload_param", "device"): "zero.offload_params",
    ("bf16", "enabled"): "precision",
    ("fp16", "enabled"): "precision",
    ("optimizer", "params", "lr"): "train.lr",
    ("optimizer", "params", "weight_decay"): "train.weight_decay",
    ("optimizer", "params", "eps"): "train.eps",
    ("optimizer", "params", "betas"): "train.betas",
}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _get(d: dict, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return _MISSING
        d = d[p]
    return d


def _fill(user: Any, gen: Any, path: tuple[str, ...], problems: list[str], source: str) -> Any:
    if user == "auto":
        if gen is _MISSING:
            problems.append(
                f'{source}: {".".join(path)}="auto" has no YAML value to fill it; set it explicitly'
            )
            return None
        return gen
    if isinstance(user, dict):
        out = dict(gen) if isinstance(gen, dict) else {}
        for k, v in user.items():
            out[k] = _fill(
                v,
                gen.get(k, _MISSING) if isinstance(gen, dict) else _MISSING,
                path + (k,),
                problems,
                source,
            )
        return out
    return user


def merge_user_config(
    user: dict[str, Any], generated: dict[str, Any], source: str, cfg: RunConfig
) -> dict[str, Any]:
    """Fill ``"auto"`` from ``generated``; concrete values must agree with the YAML."""
    problems: list[str] = []
    merged = _fill(user, generated, (), problems, source)
    for path, owner in OWNERS.items():
        u, g = _get(user, path), _get(generated, path)
        if u is _MISSING or u == "auto":
            continue
        if g is _MISSING:
            continue  # e.g. no "optimizer" section: torch AdamW is the client optimizer
        if not _same(u, g):
            yaml_value = _yaml_value(cfg, owner)
            problems.append(
                f"{source}: {'.'.join(path)}={u!r} conflicts with YAML {owner}={yaml_value!r} "
                f'(which means {".".join(path)}={g!r}); change one of them or write "auto" in the JSON'
            )
    for key in ("scheduler",):
        if key in user:
            problems.append(
                f"{source}: a {key!r} section is not supported; the schedule comes from train.scheduler / train.warmup_*"
            )
    if problems:
        raise ConfigError(problems)
    return merged


def _yaml_value(cfg: RunConfig, owner: str) -> Any:
    key = owner.split(" ")[0]
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def build_deepspeed_config(
    cfg: RunConfig,
    plan: BatchPlan,
    on_gpu: bool,
    load_universal: bool = False,
    build: BuildEnv | None = None,
    opt: OptimizerPlan | None = None,
) -> dict[str, Any]:
    generated = generate(cfg, plan, on_gpu, load_universal, build, opt)
    if not cfg.deepspeed_config:
        return generated
    path = Path(cfg.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"deepspeed_config={cfg.deepspeed_config!r}: file not found")
    try:
        user = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"deepspeed_config={cfg.deepspeed_config!r}: not valid JSON ({e})"
        ) from None
    merged = merge_user_config(user, generated, str(path), cfg)
    merged["checkpoint"] = {**merged.get("checkpoint", {}), "load_universal": load_universal}
    _check_user_optimizer(merged, generated, cfg, on_gpu, build, path)
    return merged


def _check_user_optimizer(
    merged: dict, generated: dict, cfg: RunConfig, on_gpu: bool, build: BuildEnv | None, path: Path
) -> None:
    """A JSON ``"optimizer": {"type": "AdamW"}`` makes DeepSpeed load FusedAdam / CPUAdam
    exactly as ``train.optimizer_impl=deepspeed`` would: the same JIT-build check."""
    opt = merged.get("optimizer")
    if not isinstance(opt, dict) or "optimizer" in generated:
        return
    if str(opt.get("type", "")).lower() not in {"adam", "adamw"} or (opt.get("params") or {}).get(
        "torch_adam"
    ):
        return
    forced = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"optimizer_impl": "deepspeed"})}
    )
    problem = optimizer_plan(forced, on_gpu, build).problem
    if problem:
        raise ConfigError(
            f'{path}: its "optimizer" section makes DeepSpeed build its own Adam '
            f"(as train.optimizer_impl=deepspeed would): {problem}"
        )
