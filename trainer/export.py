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
import sys
from pathlib import Path

import torch

HF_DIR = "hf"  # inside each checkpoint: model config.json + tokenizer files
# ZeRO-0 at 16 bits: the parameter names of DeepSpeed's fp32 master copies, group by group,
# saved by the engine beside the module (DeepSpeed saves the copies without names)
MASTER_NAMES = "zerotune_master_names"


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
        # no ZeRO partitions: the weights are whole in the model-states file
        return _zero0_weights(ckpt / ZERO_TAG / "mp_rank_00_model_states.pt")
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


def _zero0_weights(model_states: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0 fp32 weights: the module itself at fp32; at bf16 / fp16 the fp32 master copies
    of DeepSpeed's FP16 optimizer (``fp32_groups``: one tensor per parameter, torch AdamW;
    ``fp32_groups_flat``: one flat tensor per group, FusedAdam), named by the engine
    (``MASTER_NAMES``) — not the 16-bit working weights, which are their rounding. Buffers
    and parameters the optimizer does not hold come from the module. Memory-mapped, one
    parameter at a time: the host holds one fp32 copy.
    """
    ms = torch.load(model_states, map_location="cpu", mmap=True, weights_only=False)
    module = ms["module"]
    osd = ms.get("optimizer") or {}
    names = ms.get(MASTER_NAMES)
    masters: dict[str, torch.Tensor] = {}
    if names is None and ("fp32_groups" in osd or "fp32_groups_flat" in osd):
        print(
            f"zerotune: warning: {model_states} is a 16-bit ZeRO-0 checkpoint written before zerotune "
            f"named its fp32 master weights ({MASTER_NAMES}): exporting its 16-bit working weights, "
            "upcast; a checkpoint written by this version exports the fp32 masters",
            file=sys.stderr,
        )
    elif "fp32_groups" in osd or "fp32_groups_flat" in osd:
        if "fp32_groups" in osd:
            groups = [list(g) for g in osd["fp32_groups"]]
        else:  # FusedAdam's flat groups, in the order of the names
            groups = []
            for flat, group_names in zip(osd["fp32_groups_flat"], names):
                sizes = [module[n].numel() for n in group_names]
                parts = torch.split(flat[: sum(sizes)], sizes)
                groups.append([t.view(module[n].shape) for t, n in zip(parts, group_names)])
        if [len(g) for g in groups] != [len(g) for g in names]:
            raise RuntimeError(
                f"{model_states}: {[len(g) for g in groups]} fp32 master tensors per group but "
                f"{[len(g) for g in names]} names"
            )
        for group, group_names in zip(groups, names):
            for t, n in zip(group, group_names):
                working = module[n]
                # the working weights are the masters' rounding: a check that names and order hold
                if t.shape != working.shape or not torch.equal(t.to(working.dtype), working):
                    raise RuntimeError(
                        f"{model_states}: the fp32 master copy named {n!r} does not round to the "
                        "saved 16-bit weight; the names do not match DeepSpeed's groups"
                    )
                masters[n] = t.float().clone()

    def same(v: torch.Tensor) -> tuple:
        return (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)

    owner = {same(module[n]): n for n in masters}  # tied weights: one tensor under two names
    out: dict[str, torch.Tensor] = {}
    for k, v in module.items():
        master = masters.get(k, masters.get(owner.get(same(v), "")))
        out[k] = (
            master if master is not None else (v.float() if v.is_floating_point() else v).clone()
        )
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


def export_checkpoint(
    ckpt: Path, out: Path, max_shard_size: str = "2GB", merge: bool = False
) -> Path:
    """A Hugging Face model from a checkpoint; a PEFT checkpoint gives its adapter, or with
    ``merge`` the base with the adapters folded in (trainer/adapter_export.py)."""
    from transformers import AutoConfig

    if json.loads((ckpt / "manifest.json").read_text()).get("peft"):
        from .adapter_export import export_peft

        return export_peft(ckpt, out, merge=merge, max_shard_size=max_shard_size)
    hf_dir = ckpt / HF_DIR
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{ckpt} has no {HF_DIR}/config.json, which every checkpoint zerotune writes holds: it is not "
            "a zerotune checkpoint (or was copied without it); export a run directory (its newest "
            "checkpoint is used) or one of its checkpoints/step_N folders, e.g. zerotune export "
            "RUN_DIR/checkpoints/step_N --out DIR"
        )
    config = AutoConfig.from_pretrained(str(hf_dir))
    sd = load_full_state_dict(ckpt)
    return save_pretrained(sd, config, out, tokenizer_dir=hf_dir, max_shard_size=max_shard_size)
