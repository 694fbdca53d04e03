"""Model FLOPs of training, from the architecture alone (no model built).

The convention is PaLM's (Chowdhery et al. 2022, appendix B) and Chinchilla's (Hoffmann et
al. 2022): a matmul with an ``n × k`` weight costs ``2·n·k`` FLOPs per token forward, and the
backward pass twice the forward (gradients of activations and of weights), so training costs

    flops_per_token = 6·N + 12·L·h·s   (+ 6·h·V where the model has an LM head)

* ``N``: non-embedding parameters (the transformer blocks; token / position embeddings are
  look-ups, not matmuls). Biases and norms are kept in (they are < 1 % and cost about that).
* ``12·L·h·s``: attention scores ``Q·Kᵀ`` and context ``A·V``, ``2·2·h·s`` FLOPs per token and
  layer forward, × 3 for training; ``L`` layers, hidden size ``h``, ``s`` the sequence
  length the token attends over. PaLM counts the full ``s × s`` score matrix (no causal
  halving); so do we. With dynamic padding the right ``s`` is the token-weighted mean
  length ``Σ sᵢ² / Σ sᵢ`` over the non-padding lengths ``sᵢ`` of a step's sequences:
  ``seq_len`` may be that float.
* LM head: ``2·h·V`` forward per token (tied or not: tying shares the weight, not the matmul).
  Classification heads (``h × labels``) are left out (< 0.1 % here).
* Frozen parameters (PEFT): their weight gradients are not computed, so the dense term is
  ``(4 + 2·f)·N`` for a trainable fraction ``f`` (forward 2N + activation gradients 2N +
  weight gradients 2·f·N). ``trainable_fraction=1`` gives the usual 6N. Adapters' own
  FLOPs (rank r ≪ h) are ignored.

These are *model* FLOPs (MFU's numerator): recomputation under activation checkpointing
and the padding positions a batch computes are work the hardware does but not model FLOPs.
"""

from __future__ import annotations

from typing import Any

# config attribute names per quantity, first found wins (BERT/Llama style, then GPT-2 style)
_KEYS = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "d_ff"),
    "vocab": ("vocab_size",),
    "heads": ("num_attention_heads", "n_head"),
    "positions": ("max_position_embeddings", "n_positions"),
}
# decoder families whose task model ends in an LM head over the vocabulary
_DECODERS = {
    "gpt2", "gpt_neox", "gptj", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
    "gemma2", "phi", "phi3", "opt", "falcon", "bloom",
}  # fmt: skip
# gated MLP (gate, up, down: three h × I matrices) instead of two
_GATED = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}


def _get(config: Any, what: str, default: Any = None) -> Any:
    for key in _KEYS[what]:
        value = getattr(config, key, None)
        if value is not None:
            return value
    if default is not None:
        return default
    raise ValueError(
        f"model config ({getattr(config, 'model_type', type(config).__name__)}) has none of "
        f"{_KEYS[what]}: cannot count its FLOPs; set scaling.flops_per_token in the config"
    )


def dims(config: Any) -> dict[str, int]:
    """Layers, hidden, intermediate (FFN) size, vocabulary and heads of a HF config."""
    h = int(_get(config, "hidden"))
    return {
        "layers": int(_get(config, "layers")),
        "hidden": h,
        "intermediate": int(_get(config, "intermediate", 4 * h)),
        "vocab": int(_get(config, "vocab")),
        "heads": int(_get(config, "heads", 1)),
    }


def layer_params(config: Any) -> int:
    """Parameters of one transformer block (attention + MLP + norms, with biases where the
    family has them). Grouped-query attention (``num_key_value_heads``) shrinks K and V."""
    d = dims(config)
    h, inter = d["hidden"], d["intermediate"]
    model_type = getattr(config, "model_type", "")
    if model_type in _GATED:
        kv = getattr(config, "num_key_value_heads", None) or d["heads"]
        head_dim = getattr(config, "head_dim", None) or h // d["heads"]
        bias = 1 if getattr(config, "attention_bias", False) else 0
        attn = h * h * 2 + 2 * h * kv * head_dim + bias * (h + 2 * kv * head_dim)
        mlp = 3 * h * inter + (3 * inter if getattr(config, "mlp_bias", False) else 0)
        return attn + mlp + 2 * h  # two RMSNorm weights
    # BERT / GPT-2 style: Q, K, V, O with biases, two-matrix MLP with biases, two LayerNorms
    return 4 * (h * h + h) + 2 * h * inter + inter + h + 2 * 2 * h


def non_embedding_params(config: Any) -> int:
    """``N`` of ``6·N``: every transformer block."""
    return dims(config)["layers"] * layer_params(config)


def count_params(config: Any) -> int:
    """Parameters of the base model (``AutoModel.from_config``: embeddings, blocks, final
    norm, BERT's pooler) without building it; a task head adds its own few."""
    d = dims(config)
    h, vocab = d["hidden"], d["vocab"]
    model_type = getattr(config, "model_type", "")
    total = non_embedding_params(config) + vocab * h
    if model_type in _GATED:
        return total + h  # final RMSNorm; RoPE has no parameters
    total += int(_get(config, "positions", 0) or 0) * h  # learned positions
    if model_type == "gpt2":
        return total + 2 * h  # ln_f
    total += int(getattr(config, "type_vocab_size", 0) or 0) * h + 2 * h  # token types, LN
    if model_type in ("bert", "roberta", "xlm-roberta", "electra"):
        total += h * h + h  # pooler (AutoModel keeps it)
    return total


def has_lm_head(config: Any) -> bool:
    return getattr(config, "model_type", "") in _DECODERS


def flops_per_token(
    model_config: Any,
    seq_len: float,
    trainable_fraction: float = 1.0,
    lm_head: bool | None = None,
) -> float:
    """Training FLOPs per token (forward + backward) by the formula of the module docstring.

    ``lm_head``: count the ``h × V`` output matmul (default: for decoder families, whose
    task model is a causal LM; pass ``task == "causal_lm"`` when the task is known).
    """
    d = dims(model_config)
    f = min(max(float(trainable_fraction), 0.0), 1.0)
    dense = (4.0 + 2.0 * f) * non_embedding_params(model_config)
    attention = 12.0 * d["layers"] * d["hidden"] * float(seq_len)
    if lm_head is None:
        lm_head = has_lm_head(model_config)
    head = 6.0 * d["hidden"] * d["vocab"] if lm_head else 0.0
    return dense + attention + head


def attention_seq_len(lengths: list[int] | Any) -> float:
    """The token-weighted mean length ``Σ sᵢ² / Σ sᵢ``: what each token attends over on
    average, so that ``tokens × flops_per_token(seq_len=this)`` is the step's exact sum."""
    total = sum(int(s) for s in lengths)
    return sum(int(s) ** 2 for s in lengths) / total if total else 0.0
