"""Export of a PEFT checkpoint: the adapter, or a merged plain model.

    zerotune export RUN_DIR --out DIR            # adapter_config.json + adapter_model.safetensors
    zerotune export RUN_DIR --out DIR --merge    # config.json + model.safetensors: base + B A

The adapter needs no base weights: the adapters are put on a model skeleton on the ``meta``
device and peft's own ``save_pretrained`` writes them (AdaLoRA's pruned ranks cut away by
its rank pattern), so ``PeftModel.from_pretrained(base, DIR)`` loads them. The merge rebuilds
the base the manifest names (``base_model``: path, revision, seed), checks its digest against
the one the adapters were trained on, and folds the adapters in with ``merge_and_unload``.
Both directories also hold the tokenizer. A run's ``final/`` is the adapter.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch

from .adapters import ADALORA_STATE, ADAPTER, dedupe_modules_to_save, frozen_digest

NOT_TOKENIZER = {"config.json", "adapter_config.json"}  # in hf/: not tokenizer files


def export_peft(ckpt: Path, out: Path, merge: bool = False, max_shard_size: str = "2GB") -> Path:
    from peft import PeftConfig, get_peft_model
    from transformers import AutoConfig

    from .checkpoint import CheckpointError, read_manifest
    from .export import HF_DIR, _model_class, load_full_state_dict

    hf_dir = ckpt / HF_DIR
    if not (hf_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{ckpt}: a PEFT checkpoint without {HF_DIR}/adapter_config.json")
    manifest = read_manifest(ckpt)
    config = AutoConfig.from_pretrained(str(hf_dir))
    peft_config = PeftConfig.from_pretrained(str(hf_dir))
    trained = load_full_state_dict(ckpt)  # the adapters and modules_to_save copies, fp32
    if merge:
        base = load_base(manifest["base_model"], config, _model_class(config))
    else:
        with torch.device("meta"):
            base = _model_class(config).from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, peft_config)
    dedupe_modules_to_save(model.peft_config[ADAPTER])
    if (ckpt / ADALORA_STATE).is_file():
        state = torch.load(ckpt / ADALORA_STATE, map_location="cpu", weights_only=True)
        model.peft_config[ADAPTER].rank_pattern = state["rank_pattern"]
    _load_trained(model, trained, assign=not merge)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if merge:
        digest = frozen_digest(model)
        expected = manifest["base_model"]["digest"]
        if digest != expected:
            raise CheckpointError(
                f"export --merge: the base model rebuilt from {manifest['base_model']} differs from "
                f"the one the adapters were trained on (digest {digest}, expected {expected})"
            )
        merged = model.merge_and_unload()
        merged.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        _note_base(tmp, manifest["base_model"], config)
    for f in hf_dir.iterdir():
        if f.is_file() and f.name not in NOT_TOKENIZER:
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_base(reference: dict, config, model_class) -> torch.nn.Module:
    """The frozen base as ``build_model`` made it: pretrained weights (or a builtin model's
    seeded initialisation) with the task head of ``config``, fp32."""
    from .models import MASTER_DTYPE, is_builtin, resolve_model_path

    name = reference["name_or_path"]
    torch.manual_seed(reference["seed"])
    if is_builtin(name):
        return model_class.from_config(config, dtype=MASTER_DTYPE)
    return model_class.from_pretrained(
        resolve_model_path(name), revision=reference["revision"], config=config, dtype=MASTER_DTYPE
    )


def _load_trained(model: torch.nn.Module, trained: dict[str, torch.Tensor], assign: bool) -> None:
    # what training updated: the adapters and the modules_to_save copies (by name: on the meta
    # device peft leaves some constants, e.g. AdaLoRA's ranknum, marked trainable)
    trainable = {n for n, _ in model.named_parameters() if "lora_" in n or ".modules_to_save." in n}
    missing, unexpected = model.load_state_dict(trained, strict=False, assign=assign)
    lost = sorted(trainable & set(missing))
    if unexpected or lost:
        raise RuntimeError(
            f"export: the checkpoint does not match its adapter config (missing {lost[:5]}, "
            f"unexpected {unexpected[:5]})"
        )


def _note_base(directory: Path, reference: dict, config) -> None:
    """``zerotune_base.json``: which base (and head) the adapter goes on."""
    head = {k: getattr(config, k) for k in ("architectures", "num_labels") if hasattr(config, k)}
    if getattr(config, "id2label", None):
        head["id2label"] = config.id2label
    (directory / "zerotune_base.json").write_text(
        json.dumps({**reference, "head": head}, indent=2, default=str) + "\n"
    )
