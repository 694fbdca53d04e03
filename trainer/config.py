"""Typed run configuration: one YAML + dotted ``--set`` overrides, validated as a whole.

Precedence is CLI (``--set``) > file > defaults. Unknown keys and wrong types are errors,
and every problem is reported at once with the offending key and value, so a user fixes a
config in one round trip (``zerotune validate configs/x.yaml``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    ValidationError,
    field_validator,
    model_validator,
)

# The configuration that `zerotune train` runs with no arguments (also configs/demo.yaml).
DEMO_CONFIG_NAME = "demo"


# data.* keys that say how batches are loaded, not what is trained on: outside the
# tokenisation cache key and the config hash
LOADER_KEYS = frozenset({"num_workers", "prefetch_factor", "pin_memory"})


class ConfigError(ValueError):
    """A user-facing configuration problem; ``problems`` holds one line per issue."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        return f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(
        "builtin:tiny-bert",
        description="Hub id, local folder, or builtin:tiny-bert / builtin:tiny-gpt2 (built from a config, offline)",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer id/path; default: the model's (builtin: trained on the data)"
    )
    num_labels: int | None = Field(
        None, ge=1, description="Classes for classification; default: inferred from the labels"
    )
    dropout: float | None = Field(
        None, ge=0.0, le=1.0, description="Override the model's dropout probabilities"
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub")
    builtin: dict[str, Any] = Field(
        default_factory=dict, description="Architecture overrides for builtin: models"
    )


class DataConfig(_Section):
    train: str = Field(
        "builtin:sentiment",
        description="Hub dataset, local csv/tsv/json/jsonl/parquet file, CoNLL-style .conll/.iob/.bio "
        "(token_classification), or builtin:sentiment / builtin:echo / builtin:ner",
    )
    validation: str | None = Field(
        None, description="Validation split (same forms); default: carved from train"
    )
    test: str | None = Field(None, description="Test split, evaluated once at the end")
    hub_config: str | None = Field(
        None, description="Hub dataset configuration name (e.g. 'sst2' for glue)"
    )
    train_split: str = Field("train", description="Split name for hub datasets")
    validation_split: str = Field(
        "validation", description="Validation split name for hub datasets"
    )
    test_split: str = Field("test", description="Test split name for hub datasets")
    text_column: str = Field("text", description="Input text column")
    text_pair_column: str | None = Field(
        None, description="Second text column for pair classification"
    )
    label_column: str = Field("label", description="Integer label column (classification)")
    prompt_column: str | None = Field(
        None, description="causal_lm: prompt column (loss on the response only)"
    )
    response_column: str | None = Field(None, description="causal_lm: response column")
    tokens_column: str = Field("tokens", description="token_classification: column of word lists")
    tags_column: str = Field(
        "tags", description="token_classification: column of tag lists (BIO / IOBES strings)"
    )
    max_length: int = Field(128, ge=8, description="Truncate sequences to this many tokens")
    encoding: str = Field(
        "utf-8",
        description="Text encoding of local csv / tsv / json / jsonl / CoNLL files (e.g. latin-1, cp1252, utf-16)",
    )
    on_empty_text: Literal["error", "drop"] = Field(
        "error",
        description="Rows whose text is empty or missing: error (name them), or drop (leave them out with a warning naming them)",
    )
    validation_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="Share of train carved out for validation when none is given",
    )
    split_seed: int = Field(1234, description="Seed of the train/validation carve-out")
    max_train_samples: int | None = Field(
        None, ge=1, description="Use only the first N training rows (after the carve-out)"
    )
    max_eval_samples: int | None = Field(
        None, ge=1, description="Use only the first N validation/test rows"
    )
    cache_dir: str | None = Field(
        None, description="Tokenised-data cache; default $ZEROTUNE_CACHE or ~/.cache/zerotune"
    )
    builtin_size: int = Field(4000, ge=100, description="Rows generated by builtin: datasets")
    num_workers: NonNegativeInt | Literal["auto"] = Field(
        "auto",
        description="DataLoader worker processes that collate batches; auto: 2 on GPU, 1 on CPU",
    )
    prefetch_factor: int = Field(2, ge=1, description="Batches each worker prepares ahead")
    pin_memory: bool | Literal["auto"] = Field(
        "auto", description="Pinned host memory for faster copies to the GPU; auto: on GPU only"
    )
    group_by_length: bool = Field(
        False,
        description="Split each step's samples (the same samples either way) into micro-batches of similar length, "
        "so each pads less; deterministic on every rank and world size, resumes exactly",
    )
    batch_by_tokens: bool = Field(
        False,
        description="Like group_by_length, but micro-batches of a variable number of samples (many "
        "short, few long) so the largest one's padded tokens are the fewest possible, never more than "
        "an equal split's; the loss stays the step's mean over its samples. Per-sample losses only "
        "(classification); token-level tasks: use group_by_length",
    )
    length_grouped_steps: int | None = Field(
        None,
        ge=2,
        description="Steps of similar length (transformers' group_by_length mega-batches): every K "
        "consecutive steps of the epoch's shuffle are pooled, sorted by length and cut into K steps "
        "again, taken in a seeded random order. Each step keeps its number of samples and each epoch "
        "every sample once; a step pads little. Changes which samples share a step (the others keep "
        "the plan's steps); deterministic on every world size, resumes exactly. Trainer uses K=50",
    )
    packing: bool = Field(
        False,
        description="causal_lm: train on each micro-batch's sequences packed into one row, no padding "
        "(position ids restart per sequence, attention stays inside each; evaluation unpacked)",
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(
                f"data.encoding={value!r}: unknown encoding (use a Python codec name: utf-8, latin-1, cp1252, ...)"
            ) from None
        return value


class TrainConfig(_Section):
    micro_batch_size: int = Field(16, ge=1, description="Samples per rank per forward/backward")
    global_batch_size: int | None = Field(
        None, ge=1, description="Samples per optimizer step over all ranks; default micro × world"
    )
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training data (ignored when max_steps is set)"
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate")
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Final lr as a fraction of peak (linear/cosine)"
    )
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999))
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear warm-up steps; default warmup_ratio × total"
    )
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null disables")
    seed: int = Field(42, description="Seed of model init, dropout and data order")
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward instead of keeping them "
        "(less memory, ~1/3 more compute; HF gradient checkpointing, non-reentrant)",
    )
    optimizer_impl: Literal["auto", "torch", "deepspeed"] = Field(
        "auto",
        description="auto: torch AdamW, fused on GPU (nothing to compile); under GPU optimizer offload DeepSpeed's CPUAdam "
        "if pre-built. deepspeed: DeepSpeed's FusedAdam / CPUAdam (JIT-built unless pre-built). torch: torch AdamW",
    )
    on_nonfinite: Literal["skip", "abort"] = Field(
        "skip",
        description="A step whose loss or gradients are NaN / inf on any rank: skip its update on every "
        "rank and count it (stop after max_nonfinite_in_a_row in a row), or abort: stop at once, exit 1",
    )
    max_nonfinite_in_a_row: int = Field(
        5,
        ge=1,
        description="on_nonfinite=skip: stop (exit 1) after this many skipped steps in a row",
    )


class ZeroConfig(_Section):
    stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="Optimizer states on CPU (stages 1-3)")
    offload_params: bool = Field(False, description="Parameters on CPU (stage 3)")


class EvalConfig(_Section):
    every_steps: int | None = Field(
        None, ge=1, description="Evaluate every N optimizer steps (and always at the end)"
    )
    metric: str | None = Field(
        None,
        description="Metric for best step / early stopping; default the task's (accuracy, loss, f1)",
    )
    mode: Literal["max", "min"] | None = Field(
        None, description="Whether larger metric is better; default from the metric"
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evaluations without improvement"
    )
    stop_at: float | None = Field(
        None,
        allow_inf_nan=False,
        description="Stop at the first evaluation whose eval.metric reaches this value (>= where "
        "larger is better, <= for losses), then finish as an early stop does; results.json "
        "records the step, seconds since launch and value",
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="Eval batch per rank; default the train micro batch (a forward without backward fits wherever training does)",
    )


class CheckpointConfig(_Section):
    every_steps: int | None = Field(
        None, ge=1, description="Save every N optimizer steps (and always at the end)"
    )
    keep_last: int | None = Field(
        2, ge=1, description="Keep the newest N checkpoints; null keeps all"
    )
    keep_best: int = Field(
        1, ge=1, description="Also keep the N best by the eval metric (the best is never deleted)"
    )
    keep_every: int | None = Field(
        None, ge=1, description="Also keep every checkpoint whose step is a multiple of N"
    )
    verify: Literal["checksum", "size"] = Field(
        "checksum", description="How loading verifies the manifest"
    )
    export_final: bool = Field(
        True, description="Write final/ (save_pretrained + tokenizer) at the end"
    )


class LoggingConfig(_Section):
    every_steps: int = Field(10, ge=1, description="Log train metrics every N optimizer steps")
    tensorboard: bool = True
    progress_bar: bool = True
    warmup_steps_excluded: int = Field(
        2, ge=0, description="Steps left out of the throughput summary"
    )
    profile_steps: str | None = Field(
        None,
        description="torch.profiler over optimizer steps FIRST-LAST (e.g. '5-7'): a trace per rank "
        "in RUN_DIR/profile (TensorBoard's profiler plugin) and an operator table rank<R>.txt",
    )

    @field_validator("profile_steps")
    @classmethod
    def _profile_steps(cls, v: str | None) -> str | None:
        if v is not None:
            from .profiling import parse_steps

            parse_steps(v)
        return v


class ScalingConfig(_Section):
    """What throughput, MFU and cost are measured against (trainer/throughput.py, hardware.py)."""

    device_name: str | None = Field(
        None,
        description="Device for the peak and price tables (e.g. 'H100 SXM', 'A100 80GB'); default "
        "the detected one (torch.cuda.get_device_name, or cpu)",
    )
    peak_tflops_per_device: float | None = Field(
        None,
        gt=0,
        description="Peak dense TFLOP/s of one device at the run's precision, the MFU denominator; "
        "default the table in trainer/hardware.py (GPU) or a cached matmul probe (CPU)",
    )
    price_per_device_hour: float | None = Field(
        None,
        ge=0,
        description="USD per device-hour for results.json's cost; default the list-price table in "
        "trainer/hardware.py (PRICES_AS_OF), on CPU a per-core price × the rank's threads",
    )
    flops_per_token: float | None = Field(
        None,
        gt=0,
        description="Training FLOPs per token; default from the model config (6·N + 12·layers·hidden·seq_len, trainer/flops.py)",
    )
    target_tokens: int | None = Field(
        None,
        ge=1,
        description="A training-token target: results.json's cost also says the time and money to reach it",
    )


class PeftConfig(_Section):
    """Parameter-efficient fine-tuning through the ``peft`` library (trainer/adapters.py)."""

    method: Literal["lora", "adalora"] | None = Field(
        None,
        description="lora or adalora: train low-rank adapters on a frozen base; null: update every weight",
    )
    r: int = Field(
        8, ge=1, description="LoRA rank; adalora: the initial rank of every adapted matrix"
    )
    alpha: float = Field(16.0, gt=0, description="LoRA scaling: the update is alpha / r × B A")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapters' input")
    target_modules: list[str] | None = Field(
        None,
        description="Modules that get adapters; default per model_type: BERT-like query,value; "
        "GPT-2 c_attn; LLaMA-like q_proj,v_proj (see trainer/adapters.py TARGET_MODULES)",
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained in full beside the adapters; default: the task head for "
        "classification tasks (e.g. classifier / score), none for causal_lm",
    )
    target_r: int = Field(
        4, ge=1, description="adalora: average rank per matrix after the budget has shrunk"
    )
    tinit: int = Field(
        0, ge=0, description="adalora: steps before the rank budget starts shrinking"
    )
    tfinal: int = Field(
        0, ge=0, description="adalora: last steps trained at the final rank pattern"
    )
    delta_t: int = Field(1, ge=1, description="adalora: steps between two budget allocations")
    orth_reg_weight: float = Field(
        0.5, ge=0.0, description="adalora: weight of the orthogonality regulariser in the loss"
    )


class LaunchConfig(_Section):
    nproc_per_node: int | Literal["auto"] = Field(
        "auto", description="Ranks per node when zerotune spawns them"
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl on GPU, gloo on CPU"
    )
    timeout_minutes: int = Field(
        30,
        ge=1,
        description="A rank silent or stuck in a step this long ends the job, named (exit 124); "
        "the backend's collective timeout is a minute later",
    )
    preemption_signals: list[str] = Field(
        ["SIGTERM", "SIGUSR1"], description="Signals that trigger save-and-exit"
    )
    requeue_on_preemption: bool = Field(
        True, description="Under Slurm, scontrol requeue after a preemption save"
    )


class RunConfig(_Section):
    """The whole run. Every field has a description that doubles as help text."""

    task: Literal["classification", "causal_lm", "token_classification"] = Field(
        "classification",
        description="classification (text → label), causal_lm, or token_classification (words → BIO tags)",
    )
    engine: Literal["deepspeed", "ddp"] = Field(
        "deepspeed", description="deepspeed, or plain torch DDP as a baseline"
    )
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    deepspeed_config: str | None = Field(
        None, description='Optional DeepSpeed JSON; its "auto" values are filled from this YAML'
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    zero: ZeroConfig = Field(default_factory=ZeroConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        problems = []
        if self.zero.offload_params and self.zero.stage != 3:
            problems.append(
                f"zero.offload_params=true needs zero.stage=3, got zero.stage={self.zero.stage}"
            )
        if self.zero.offload_optimizer and self.zero.stage == 0:
            problems.append("zero.offload_optimizer=true needs zero.stage >= 1, got zero.stage=0")
        if self.engine == "ddp" and (self.zero.stage != 0 or self.zero.offload_optimizer):
            problems.append(
                f"engine=ddp cannot shard or offload: set zero.stage=0 (got {self.zero.stage})"
            )
        if self.engine == "ddp" and self.deepspeed_config:
            problems.append("deepspeed_config is only used with engine=deepspeed")
        problems += self.task_class().config_problems(self)
        if self.peft.method == "adalora" and self.peft.target_r > self.peft.r:
            problems.append(
                f"peft.target_r={self.peft.target_r} is larger than peft.r={self.peft.r}: AdaLoRA only prunes ranks"
            )
        if self.eval.mode is not None and self.eval.metric is None:
            problems.append("eval.mode is set but eval.metric is not")
        problems += self._stop_at_problems()
        for sig in self.launch.preemption_signals:
            if sig not in {"SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGCONT"}:
                problems.append(
                    f"launch.preemption_signals: unknown signal {sig!r} (use SIGTERM, SIGUSR1, SIGUSR2, SIGINT)"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _stop_at_problems(self) -> list[str]:
        """eval.stop_at: checked at periodic evaluations, and reachable by its metric (every
        metric a task maximises is a fraction: 84 for 0.84 is the mistake to catch)."""
        target = self.eval.stop_at
        if target is None:
            return []
        metric, _ = self.eval_metric()
        problems = []
        if not self.eval.every_steps:
            problems.append(
                f"eval.stop_at={target:g} is checked at periodic evaluations: set eval.every_steps"
            )
        if metric in self.task_class().maximize and not 0 <= target <= 1:
            hint = f" (eval.stop_at={target / 100:g} for {target:g} %)" if 1 < target <= 100 else ""
            problems.append(
                f"eval.stop_at={target:g} can never be reached: {metric} is a fraction in [0, 1]{hint}"
            )
        elif target < 0:
            problems.append(f"eval.stop_at={target:g} can never be reached: {metric} is >= 0")
        return problems

    # -- derived values -----------------------------------------------------------------
    def task_class(self):
        """The task's class in ``trainer.tasks.TASKS`` (imported late: tasks import this module)."""
        from .tasks import TASKS

        return TASKS[self.task]

    def eval_metric(self) -> tuple[str, str]:
        """(metric name, 'max'|'min') used for best step, early stopping and keep_best."""
        task = self.task_class()
        metric = self.eval.metric or task.default_metric
        return metric, self.eval.mode or task.metric_mode(metric)

    def config_hash(self) -> str:
        """Hash of what determines the training trajectory (not logging or launch details)."""
        d = self.model_dump(mode="json")
        for k in ("logging", "launch"):
            d.pop(k, None)
        d["checkpoint"] = {}
        for k in LOADER_KEYS:  # how, not what, is loaded
            d["data"].pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["train.lr=3e-5", "zero.stage=3"]`` → nested dict, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    problems = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-5")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            problems.append(f"--set {item!r}: empty key")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--set {item!r}: {part} is already set to a value")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return out


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def dotted_keys(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{train: {max_steps: 30}}`` and ``{train.max_steps: 30}`` both → dotted keys (the
    form ``--set`` takes)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(dotted_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def builtin_config_path(name: str) -> Path:
    return Path(__file__).parent / "builtin_configs" / f"{name}.yaml"


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        hint = " (a folder was given)" if p.is_dir() else ""
        raise ConfigError(
            f"config file {str(path)!r} not found{hint}: pass a YAML file, e.g. configs/demo.yaml"
        )
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping at the top, got {type(data).__name__}"
        )
    return data


def _format_validation_error(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            problems.append(
                f"{loc}: unknown key (value {value!r}); check the spelling against `zerotune validate --help-keys`"
            )
        elif e["type"] == "value_error":
            msg = e["msg"].removeprefix("Value error, ")
            problems.extend(m.strip() for m in msg.split("; "))
        else:
            where = loc or "(top level)"
            problems.append(f"{where}={value!r}: {e['msg']}")
    return problems


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a validated RunConfig from a YAML file (or the demo default) and overrides."""
    raw = read_yaml(path) if path is not None else read_yaml(builtin_config_path(DEMO_CONFIG_NAME))
    merged = deep_merge(raw, parse_overrides(overrides))
    return config_from_dict(merged)


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(d)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def field_help(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """One line per key: ``train.lr (float, default 5e-05): Peak learning rate``."""
    lines = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(field_help(ann, key + "."))
            continue
        default = f.default if f.default_factory is None else f.default_factory()
        tname = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        lines.append(f"{key} ({tname}, default {default!r}): {f.description or ''}".rstrip(": "))
    return lines
