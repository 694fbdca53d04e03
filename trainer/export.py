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
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    archs = getattr(config, "architectures", None) or []
    if any("SequenceClassification" in a for a in archs):
        return AutoModelForSequenceClassification
    if any("TokenClassification" in a for a in archs):
        return AutoModelForTokenClassification
    return AutoModelForCausalLM


def save_pretrained(
    state_dict: dict[str, torch.Tensor],
    config,
    out: Path,
    tokenizer=None,
    tokenizer_dir: Path | None = None,
    max_shard_size: str = "2GB",
) -> Path:
    """Write ``out/`` atomically (``out.tmp`` then rename) from a full state dict."""
    with torch.device("meta"):
        model = _model_class(config).from_config(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if unexpected or missing:
        raise RuntimeError(
            f"export: state dict does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
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

    from .checkpoint import ZERO_TAG

    if manifest.get("zero_stage") == 0:
        # no ZeRO partitions: the module weights are whole in the model-states file
        sd = torch.load(
            ckpt / ZERO_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    if manifest.get("zero_stage") in (1, 2):
        sd = _merge_zero12(ckpt / ZERO_TAG)
        if sd is not None:
            return sd
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


def _merge_zero12(zero_dir: Path) -> dict[str, torch.Tensor] | None:
    """ZeRO-1/2 fp32 weights, one parameter at a time, from memory-mapped shards.

    DeepSpeed's ``zero_to_fp32`` concatenates every rank's partition into one vector first
    (its own comment: "memory usage doubles here"); here each parameter is copied straight
    from the rank partitions it spans, so the host holds one copy. Returns None for layouts
    it does not handle (frozen parameters), and the caller falls back to DeepSpeed's merge.
    """
    import re

    def load(f):
        return torch.load(f, map_location="cpu", mmap=True, weights_only=False)

    model_files = sorted(zero_dir.glob("mp_rank_*_model_states.pt"))
    optim_files = sorted(
        zero_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"),
        key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)),
    )
    if len(model_files) != 1 or not optim_files:
        return None
    ms = load(model_files[0])
    if ms.get("frozen_param_shapes"):
        return None
    osds = [load(f)["optimizer_state_dict"] for f in optim_files]
    if any("single_partition_of_fp32_groups" not in o for o in osds):
        return None
    paddings = osds[0].get("param_alignment_paddings")
    out: dict[str, torch.Tensor] = {
        k: (v.float() if v.is_floating_point() else v).clone()
        for k, v in ms["module"].items()
        if k in ms["buffer_names"]
    }
    for g, shapes in enumerate(ms["param_shapes"]):
        chunks = [o["single_partition_of_fp32_groups"][g] for o in osds]
        starts = [0]
        for c in chunks:
            starts.append(starts[-1] + c.numel())
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = int(torch.Size(shape).numel())
            flat = torch.empty(n, dtype=torch.float32)
            for r, c in enumerate(chunks):  # the ranks whose partition overlaps [offset, offset+n)
                a, b = max(offset, starts[r]), min(offset + n, starts[r + 1])
                if a < b:
                    flat[a - offset : b - offset] = c[a - starts[r] : b - starts[r]]
            out[name] = flat.view(shape)
            offset += n + (paddings[g][i] if paddings else 0)
    for alias, source in ms.get("shared_params", {}).items():
        if source in out:
            out[alias] = out[source]
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
        raise FileNotFoundError(
            f"{ckpt} has no {HF_DIR}/config.json (written by zerotune since its first release)"
        )
    config = AutoConfig.from_pretrained(str(hf_dir))
    sd = load_full_state_dict(ckpt)
    return save_pretrained(sd, config, out, tokenizer_dir=hf_dir, max_shard_size=max_shard_size)
