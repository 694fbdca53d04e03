"""Parameter-efficient fine-tuning (LoRA, AdaLoRA) through the ``peft`` library.

    peft: {method: lora, r: 8, alpha: 16}          # in a run config; absent = full fine-tuning

``wrap_model`` puts adapters on the task model after ``build_model`` (fp32, the same seed on
every rank, so the adapters start identical); everything else is frozen, and the engines
give gradients and optimizer state to trainable parameters only (``param_groups``). A
checkpoint holds the adapters, the ``modules_to_save`` copies and their optimizer state —
not the frozen base — so the manifest names the base it needs (``base_reference``) and a
resume or ``--merge`` export rebuilds and verifies it: the digest covers every frozen
parameter the forward uses, bit for bit.

Defaults:

* ``target_modules`` by ``model_type`` (``TARGET_MODULES``): the attention query and value
  projections — BERT-like ``query``,``value``; DistilBERT ``q_lin``,``v_lin``; GPT-2
  ``c_attn``; LLaMA / Mistral / Qwen / Gemma ``q_proj``,``v_proj``; then peft's own table;
  another family needs ``peft.target_modules`` (a config error names its model_type).
* ``modules_to_save``: for tasks with a new head (sequence / token classification) the
  model's head modules — its children with parameters other than the backbone, e.g.
  ``classifier`` (BERT), ``score`` (GPT-2, LLaMA), ``pre_classifier`` + ``classifier``
  (DistilBERT); nothing for causal LM (its head is the tied embedding). For the
  classification task types peft itself always adds the names ``classifier`` / ``score``.

AdaLoRA's rank allocator, which the engines call around each optimizer step, is in
``trainer/adalora.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import ConfigError, RunConfig

if TYPE_CHECKING:
    from .tasks import Task

ADAPTER = "default"  # peft's adapter name: zerotune trains one
SHAPE_KEYS = ("r", "target_modules", "modules_to_save")  # what the adapters' parameters are
ADALORA_STATE = "adalora.pt"  # in a checkpoint: the rank allocator's state (rank 0 writes)

# model_type → modules that get adapters: the attention query and value projections.
TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(
        ["bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "layoutlm"],
        ["query", "value"],
    ),
    "distilbert": ["q_lin", "v_lin"],
    "mpnet": ["q", "v"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "opt", "gpt_neo"],
        ["q_proj", "v_proj"],
    ),
    "phi3": ["qkv_proj"],
}

# the transformers Auto class of a task → peft's task type (its forward signature and, for
# the classification types, peft's own head handling)
TASK_TYPES = {
    "AutoModelForSequenceClassification": "SEQ_CLS",
    "AutoModelForTokenClassification": "TOKEN_CLS",
    "AutoModelForCausalLM": "CAUSAL_LM",
}
HEAD_TASK_TYPES = {"SEQ_CLS", "TOKEN_CLS"}  # tasks whose head is new: trained in full


def default_target_modules(model_type: str) -> list[str] | None:
    if model_type in TARGET_MODULES:
        return list(TARGET_MODULES[model_type])
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table,
    )

    found = peft_table.get(model_type)
    return list(found) if isinstance(found, list) else None


def target_modules_problem(cfg: RunConfig, model_type: str) -> str | None:
    """The config error for a model family without a default (None: fine)."""
    if cfg.peft.method is None or cfg.peft.target_modules or default_target_modules(model_type):
        return None
    return (
        f"peft.target_modules: no default for model_type {model_type!r}; name the modules that "
        "get adapters, e.g. --set 'peft.target_modules=[q_proj,v_proj]' (the attention projections)"
    )


def preflight_problem(cfg: RunConfig) -> str | None:
    """``target_modules_problem`` for the configured model, before any rank exists."""
    if cfg.peft.method is None or cfg.peft.target_modules:
        return None
    from .models import BUILTIN, BUILTIN_MODELS, is_builtin, load_model_config

    name = cfg.model.name_or_path
    if is_builtin(name):
        arch = BUILTIN_MODELS.get(name[len(BUILTIN) :])
        model_type = arch["model_type"] if arch else None
    else:
        try:
            model_type = load_model_config(cfg).model_type
        except ConfigError:
            model_type = None  # reported by the model checks
    return target_modules_problem(cfg, model_type) if model_type else None


def head_modules(model: torch.nn.Module) -> list[str]:
    """The task head: the model's children with parameters, other than its backbone."""
    backbone = getattr(model, "base_model_prefix", "")
    return [
        name
        for name, child in model.named_children()
        if name != backbone and any(True for _ in child.parameters())
    ]


def build_peft_config(cfg: RunConfig, task: Task, model: torch.nn.Module, total_steps: int):
    from peft import AdaLoraConfig, LoraConfig

    p = cfg.peft
    model_type = getattr(model.config, "model_type", "?")
    problem = target_modules_problem(cfg, model_type)
    if problem:
        raise ConfigError(problem)
    task_type = TASK_TYPES.get(task.auto_model)
    modules_to_save = p.modules_to_save
    if modules_to_save is None:
        modules_to_save = head_modules(model) if task_type in HEAD_TASK_TYPES else []
    common = dict(
        task_type=task_type,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=list(p.target_modules or default_target_modules(model_type)),
        modules_to_save=list(modules_to_save) or None,
    )
    if p.method == "lora":
        return LoraConfig(r=p.r, **common)
    if p.tinit + p.tfinal >= total_steps:
        raise ConfigError(
            f"peft.tinit={p.tinit} + peft.tfinal={p.tfinal} leave AdaLoRA no budgeting phase in "
            f"{total_steps} steps: lower them or train longer"
        )
    return AdaLoraConfig(
        init_r=p.r,
        target_r=p.target_r,
        tinit=p.tinit,
        tfinal=p.tfinal,
        deltaT=p.delta_t,
        orth_reg_weight=p.orth_reg_weight,
        total_step=total_steps,
        **common,
    )


def wrap_model(cfg: RunConfig, task: Task, model: torch.nn.Module, total_steps: int):
    """The task model with adapters, only they (and modules_to_save) trainable."""
    import warnings

    from peft import get_peft_model

    peft_config = build_peft_config(cfg, task, model, total_steps)
    torch.manual_seed(cfg.train.seed)  # adapters start identical on every rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "r is not used in AdaLora", name_or_path renames
        wrapped = get_peft_model(model, peft_config)
    config = wrapped.peft_config[ADAPTER]
    config.base_model_name_or_path = model.config._name_or_path or cfg.model.name_or_path
    config.revision = cfg.model.revision
    dedupe_modules_to_save(config)
    return wrapped


def dedupe_modules_to_save(config) -> None:
    """peft appends ``classifier`` / ``score`` to a classification config's modules_to_save
    each time it wraps a model, whether listed already or not: keep each name once."""
    if config.modules_to_save:
        config.modules_to_save = list(dict.fromkeys(config.modules_to_save))


def is_peft_model(model: torch.nn.Module) -> bool:
    import sys

    peft = sys.modules.get("peft")  # not imported: no model can be a PeftModel
    return peft is not None and isinstance(model, peft.PeftModel)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def frozen_digest(model: torch.nn.Module) -> str:
    """Bit-exact digest of the frozen parameters the forward uses (not the unused original
    copies that ``modules_to_save`` keeps): what a PEFT checkpoint relies on but does not hold."""
    from .fingerprint import _digest

    return _digest(
        [
            (n, p.data)
            for n, p in model.named_parameters()
            if not p.requires_grad and ".original_module." not in n
        ]
    )


def base_reference(cfg: RunConfig, model: torch.nn.Module) -> dict[str, Any]:
    """What the manifest records about the frozen base, checked on resume and merge."""
    return {
        "name_or_path": cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "seed": cfg.train.seed,  # initialises builtin bases and any head weights left frozen
        "digest": frozen_digest(model),
    }


def manifest_entry(cfg: RunConfig, model: torch.nn.Module) -> dict[str, Any]:
    """The manifest's ``peft`` and ``base_model`` entries (empty for full fine-tuning)."""
    if cfg.peft.method is None:
        return {}
    trainable, total = parameter_counts(model)
    shape = {k: getattr(cfg.peft, k) for k in SHAPE_KEYS}
    return {
        "peft": {
            "method": cfg.peft.method,
            **shape,
            "trainable_parameters": trainable,
            "parameters": total,
        },
        "base_model": base_reference(cfg, model),
    }


def shape_problems(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Config keys that change which parameters a PEFT checkpoint holds."""
    return [
        f"peft.{k}={getattr(cfg.peft, k)!r} but the checkpoint was trained with {saved[k]!r}"
        for k in SHAPE_KEYS
        if k in saved and saved[k] != getattr(cfg.peft, k)
    ]


def base_mismatch(saved: dict[str, Any] | None, digest: str) -> str | None:
    """Why a checkpoint's base reference does not match this run's (None: it does)."""
    if saved is None:
        return "the checkpoint records no base model (written without peft?)"
    if saved.get("digest") != digest:
        return (
            f"the frozen base weights differ from the ones its adapters were trained on "
            f"(base {saved.get('name_or_path')!r} revision {saved.get('revision')!r} seed "
            f"{saved.get('seed')}, digest {saved.get('digest')}; this run's base: {digest}): "
            "resume with the same model.name_or_path, model.revision and train.seed, or start "
            "anew in another run directory"
        )
    return None


def save_adapter_config(model: torch.nn.Module, directory: Path) -> None:
    """``adapter_config.json`` beside the model config in a checkpoint's ``hf/``: export
    rebuilds the adapters from it."""
    model.peft_config[ADAPTER].save_pretrained(str(directory))


# --------------------------------------------------------------------------------------
# What the engines call around each optimizer step
# --------------------------------------------------------------------------------------


def build_step_hook(model: torch.nn.Module):
    """AdaLoRA's rank allocator (``trainer/adalora.py``) for an AdaLoRA model, else None."""
    if not is_peft_model(model):
        return None
    config = model.peft_config.get(ADAPTER)
    if getattr(config, "peft_type", None) is not None and config.peft_type.value == "ADALORA":
        from .adalora import AdaLoraAllocator

        return AdaLoraAllocator(model)
    return None
