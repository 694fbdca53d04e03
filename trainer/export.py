"""Consolidated Hugging Face export: safetensors (sharded when large) + tokenizer.

Works from a live run (``final/``) or offline from any checkpoint — any ZeRO stage, any
world size, no GPU: the shards are merged by DeepSpeed's ``zero_to_fp32`` and loaded into a
model skeleton on the ``meta`` device, so the host holds about one fp32 copy of the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

HF_DIR = "hf"  # inside each checkpoint: model config.json + tokenizer files


def save_hf_metadata(model_config, tokenizer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model_config.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def _model_class(config) -> type:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    archs = getattr(config, "architectures", None) or []
    if any("SequenceClassification" in a for a in archs):
        return AutoModelForSequenceClassification
    return AutoModelForCausalLM


def save_pretrained(state_dict: dict[str, torch.Tensor], config, out: Path, tokenizer=None, tokenizer_dir: Path | None = None,
                    max_shard_size: str = "2GB") -> Path:
    """Write ``out/`` atomically (``out.tmp`` then rename) from a full state dict."""
    with torch.device("meta"):
        model = _model_class(config).from_config(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if unexpected or missing:
        raise RuntimeError(f"export: state dict does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_full_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint, whatever its stage and world size."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    if manifest["engine"] == "ddp":
        return torch.load(ckpt / "ddp" / "state.pt", map_location="cpu", weights_only=True)["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .engine import ZERO_TAG

    if manifest.get("zero_stage") == 0:
        # no ZeRO partitions: the module weights are whole in the model-states file
        sd = torch.load(ckpt / ZERO_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    # lazy: every parameter is gathered from the (memory-mapped) shards into a tensor of its
    # own, so the merged weights never exist twice
    with _mmap_torch_load():
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=ZERO_TAG, lazy_mode=True)
        out: dict[str, torch.Tensor] = {}
        done: dict[int, str] = {}
        for name, t in lazy.items():
            if id(t) in done:  # tied weights: one tensor under two names
                out[name] = out[done[id(t)]]
                continue
            done[id(t)] = name
            out[name] = t.contiguous() if not torch.is_tensor(t) else t.clone()
        return out


@contextlib.contextmanager
def _mmap_torch_load():
    """Map checkpoint files instead of reading them whole: zero_to_fp32 only touches the
    fp32 partitions, so the Adam moments in the same files never reach host memory."""
    original = torch.load

    def load(f, *args, **kwargs):
        kwargs.setdefault("mmap", True)
        return original(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def export_checkpoint(ckpt: Path, out: Path, max_shard_size: str = "2GB") -> Path:
    from transformers import AutoConfig

    hf_dir = ckpt / HF_DIR
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt} has no {HF_DIR}/config.json (written by zerotune since its first release)")
    config = AutoConfig.from_pretrained(str(hf_dir))
    sd = load_full_state_dict(ckpt)
    return save_pretrained(sd, config, out, tokenizer_dir=hf_dir, max_shard_size=max_shard_size)
