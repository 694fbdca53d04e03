"""The shape of a run's model without its weights: a HF config and exact parameter counts.

The estimator needs parameters (total and trainable), layers, hidden size, heads and the
vocabulary. They come from the model's config (``AutoConfig``: hub, local folder,
``package:``, or the ``builtin:`` architecture with the builtin tokenizer's vocabulary) and
from the task model built on the *meta* device — shapes only, no memory, no download
beyond the config — so a 7 B model is counted in well under a second. PEFT adapters are
wrapped on the meta model too, so the trainable count is peft's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.config import RunConfig


@dataclass
class ModelShape:
    config: Any  # a transformers PretrainedConfig
    parameters: int
    trainable: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    lm_head: bool  # logits over the vocabulary (causal LM): their activation memory counts
    largest_param: int = 0  # elements of the largest trainable tensor (offload staging buffers)
    persistent_params: int = 0  # elements ZeRO-3 keeps whole on every rank (numel ≤ 1e5)
    # trainable sizes per optimizer group, in order: which whole gradients a ZeRO-1/2 rank holds
    groups: list[list[int]] = field(default_factory=list)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.parameters if self.parameters else 1.0


def hf_config(cfg: RunConfig):
    """The transformers config of the run's model (as ``trainer.models.build_model`` makes it)."""
    from trainer import models

    name = cfg.model.name_or_path
    if not models.is_builtin(name):
        return models.load_model_config(cfg)
    from transformers import AutoConfig

    from trainer.config import ConfigError

    problem = models.builtin_problem(name)
    if problem:
        raise ConfigError(problem)
    task = cfg.task_class()(cfg)
    tok = models.build_tokenizer(cfg, task, lambda: [])
    arch = dict(models.BUILTIN_MODELS[name[len(models.BUILTIN) :]])
    arch.update(cfg.model.builtin)
    model_type = arch.pop("model_type")
    positions = {"bert": "max_position_embeddings", "gpt2": "n_positions"}[model_type]
    arch.setdefault(positions, max(cfg.data.max_length, 64))
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        **arch,
    )


def shape_of(
    model_config: Any, task: str = "classification", num_labels: int = 2, peft_cfg=None
) -> ModelShape:
    """Counts from the task model built on the meta device (no memory is allocated)."""
    import torch
    import transformers

    from trainer import flops

    auto = {
        "classification": "AutoModelForSequenceClassification",
        "token_classification": "AutoModelForTokenClassification",
        "causal_lm": "AutoModelForCausalLM",
    }[task]
    if task != "causal_lm":
        model_config.num_labels = num_labels
    with torch.device("meta"):
        model = getattr(transformers, auto).from_config(model_config)
    if peft_cfg is not None:
        model = peft_cfg(model)
    from trainer.memory import optimizer_groups, persistent_numel

    sizes = [(p.numel(), p.requires_grad) for p in model.parameters()]
    d = flops.dims(model_config)
    return ModelShape(
        model_config,
        sum(n for n, _ in sizes),
        sum(n for n, t in sizes if t),
        d["layers"],
        d["hidden"],
        d["heads"],
        d["vocab"],
        task == "causal_lm",
        max((n for n, t in sizes if t), default=0),
        persistent_numel(model),
        optimizer_groups(model),
    )


def shape_for(cfg: RunConfig) -> ModelShape:
    """The run config's model, its task head and PEFT adapters, counted."""
    peft = None
    if cfg.peft.method is not None:
        from trainer.models import apply_peft

        task = cfg.task_class()(cfg)

        def peft(model):
            return apply_peft(cfg, task, model, cfg.train.max_steps or 1000)

    return shape_of(hf_config(cfg), cfg.task, cfg.model.num_labels or 2, peft)
