"""PEFT (LoRA, AdaLoRA) on in-process gloo ranks: the engines at every ZeRO stage and DDP
give gradients and optimizer state to the adapters only, checkpoints hold the adapters and
resume bit for bit (also at another world size), AdaLoRA's rank allocator does the same
arithmetic at every stage and resumes exactly; then the real Trainer on 2 ranks: the base
reference the manifest verifies, ``final/`` as an adapter and ``--merge`` as a plain model.

Same tiny BERT and synthetic data as tests/test_ranks.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
from multirank import run_distributed
from test_ranks import CPU, ROWS, STEPS, digest, make_batch, max_diff, optimizer_numel, tiny_bert

from trainer import checkpoint as ckpt_mod
from trainer.batch import resolve_batch
from trainer.config import ConfigError, load_config
from trainer.data import GlobalBatchPlan
from trainer.distributed import barrier, get_rank, get_world_size
from trainer.engine import build_engine

from conftest import TINY


@pytest.fixture(scope="module", autouse=True)
def imported_once():
    """What the ranks use, imported before they fork (as in test_ranks.py)."""
    import peft  # noqa: F401
    import peft.tuners.adalora  # noqa: F401
    import peft.tuners.lora  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401

    if not torch.cuda.is_available():
        import deepspeed  # noqa: F401
        import deepspeed.checkpoint.ds_to_universal  # noqa: F401
        import deepspeed.runtime.zero.stage3  # noqa: F401
        import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
        import deepspeed.utils.zero_to_fp32  # noqa: F401

        with contextlib.suppress(ImportError):
            import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401

    import trainer.export  # noqa: F401
    import trainer.universal  # noqa: F401


def peft_config(engine="deepspeed", stage=2, method="lora", *extra: str):
    return load_config(
        TINY,
        [
            f"engine={engine}",
            f"zero.stage={stage}",
            "train.micro_batch_size=4",
            "train.global_batch_size=16",
            f"train.max_steps={STEPS}",
            "train.warmup_steps=1",
            "train.lr=1e-2",
            f"peft.method={method}",
            "peft.r=4",
            "peft.dropout=0.1",  # draws random numbers: the RNG state must resume too
            *extra,
        ],
    )


def peft_model(cfg):
    from trainer.adapters import wrap_model
    from trainer.tasks import build_task

    return wrap_model(cfg, build_task(cfg), tiny_bert(), STEPS)


class PeftJob:
    """A PEFT engine on this rank, stepping the same samples per step at any world size."""

    def __init__(self, engine="deepspeed", stage=2, method="lora", load_universal=False, *extra):
        self.cfg = peft_config(engine, stage, method, *extra)
        self.rank, self.world = get_rank(), get_world_size()
        self.plan = resolve_batch(self.cfg, self.world)
        self.sampler = GlobalBatchPlan(ROWS, self.plan.global_batch, 0)
        self.model = peft_model(self.cfg)
        self.engine = build_engine(
            self.cfg, self.model, self.plan, STEPS, CPU, load_universal=load_universal
        )
        self.engine.train()

    def step(self, step: int) -> float:
        idx = self.sampler.micro_batches(step, self.rank, self.world, self.plan.micro)
        return self.engine.train_step([make_batch(i) for i in idx]).loss

    def run(self, start: int, stop: int) -> list[float]:
        return [self.step(s) for s in range(start, stop)]

    def trainable(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.engine.module.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.engine.full_state_dict().items() if k in names}


def _frozen(sd: dict[str, torch.Tensor], trainable: set[str]) -> str:
    return digest({k: v for k, v in sd.items() if k not in trainable})


# --------------------------------------------------------------------------------------
# Defaults: adapters on the attention projections, the task head trained in full
# --------------------------------------------------------------------------------------


def _tiny(family: str, task: str):
    import transformers as tf

    configs = {
        "bert": lambda: tf.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        ),
        "gpt2": lambda: tf.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2),
        "distilbert": lambda: tf.DistilBertConfig(
            vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32
        ),
        "llama": lambda: tf.LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
    }
    auto = {
        "classification": tf.AutoModelForSequenceClassification,
        "token_classification": tf.AutoModelForTokenClassification,
        "causal_lm": tf.AutoModelForCausalLM,
    }[task]
    return auto.from_config(configs[family]())


@pytest.mark.parametrize(
    "family, task, targets, head",
    [
        ("bert", "classification", {"query", "value"}, ["classifier"]),
        ("bert", "token_classification", {"query", "value"}, ["classifier"]),
        ("distilbert", "classification", {"q_lin", "v_lin"}, ["pre_classifier", "classifier"]),
        ("gpt2", "classification", {"c_attn"}, ["score"]),
        ("gpt2", "causal_lm", {"c_attn"}, None),
        ("llama", "causal_lm", {"q_proj", "v_proj"}, None),
    ],
)
def test_default_target_modules_and_head_per_family(family, task, targets, head):
    from trainer.adapters import build_peft_config
    from trainer.tasks import build_task

    cfg = load_config(TINY, [f"task={task}", "peft.method=lora"])
    config = build_peft_config(cfg, build_task(cfg), _tiny(family, task), 100)
    assert set(config.target_modules) == targets
    assert config.modules_to_save == head
    # explicit choices win
    cfg = load_config(
        TINY,
        [f"task={task}", "peft.method=lora", "peft.target_modules=[x]", "peft.modules_to_save=[]"],
    )
    config = build_peft_config(cfg, build_task(cfg), _tiny(family, task), 100)
    assert set(config.target_modules) == {"x"} and config.modules_to_save is None


def test_unknown_family_needs_target_modules_and_adalora_a_budget(tmp_path):
    from transformers import XLNetConfig

    from trainer.adapters import build_peft_config, preflight_problem, target_modules_problem
    from trainer.tasks import build_task

    # found by the pre-flight from the model's config, before any rank starts
    XLNetConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2).save_pretrained(tmp_path)
    local = load_config(TINY, [f"model.name_or_path={tmp_path}", "peft.method=lora"])
    assert "no default for model_type 'xlnet'" in preflight_problem(local)
    assert preflight_problem(load_config(TINY, ["peft.method=lora"])) is None  # builtin bert

    cfg = load_config(TINY, ["peft.method=lora"])
    model = _tiny("bert", "classification")
    model.config.model_type = "xlnet-like"
    with pytest.raises(
        ConfigError, match=r"no default for model_type 'xlnet-like'.*peft\.target_modules"
    ):
        build_peft_config(cfg, build_task(cfg), model, 100)
    assert (
        target_modules_problem(
            load_config(TINY, ["peft.target_modules=[q]", "peft.method=lora"]), "x"
        )
        is None
    )
    assert target_modules_problem(load_config(TINY), "x") is None  # full fine-tuning
    cfg = load_config(TINY, ["peft.method=adalora", "peft.tinit=60", "peft.tfinal=40"])
    with pytest.raises(ConfigError, match="no budgeting phase in 100 steps"):
        build_peft_config(cfg, build_task(cfg), _tiny("bert", "classification"), 100)
    with pytest.raises(ConfigError, match="peft.target_r=16 is larger than peft.r=8"):
        load_config(TINY, ["peft.method=adalora", "peft.target_r=16"])


# --------------------------------------------------------------------------------------
# Engines: only the adapters train, at every stage
# --------------------------------------------------------------------------------------

LORA_VARIANTS = {
    "zero0": ("deepspeed", 0),
    "zero1": ("deepspeed", 1),
    "zero2": ("deepspeed", 2),
    "zero3": ("deepspeed", 3),
    "ddp": ("ddp", 0),
}


def _train_lora(variants: dict) -> dict:
    out = {}
    for name, (engine, stage) in variants.items():
        job = PeftJob(engine, stage)
        names = {n for n, p in job.engine.module.named_parameters() if p.requires_grad}
        before = job.engine.full_state_dict()
        losses = job.run(0, STEPS)
        after = job.engine.full_state_dict()
        out[name] = {
            "losses": losses,
            "trainable_names": sorted(names),
            "trainable_numel": sum(after[n].numel() for n in names),
            "frozen_before": _frozen(before, names),
            "frozen_after": _frozen(after, names),
            "adapters_moved": max_diff({n: after[n] for n in names}, {n: before[n] for n in names}),
            "adam_numel": optimizer_numel(job.engine),
            "adam_keys": _adam_numel_both(job.engine),
            "trainable": {n: after[n] for n in names} if job.rank == 0 else None,
        }
    return out


def _adam_numel_both(engine) -> int:
    """exp_avg + exp_avg_sq elements this rank holds."""
    opt = engine.engine.optimizer if hasattr(engine, "engine") else engine.optimizer
    base = getattr(opt, "optimizer", opt)
    return sum(
        s[k].numel() for s in base.state.values() for k in ("exp_avg", "exp_avg_sq") if k in s
    )


@pytest.fixture(scope="module")
def lora_trained() -> list[dict]:
    return run_distributed(_train_lora, 2, LORA_VARIANTS, timeout=300)


def test_only_adapters_and_head_are_trainable(lora_trained):
    names = lora_trained[0]["zero0"]["trainable_names"]
    # query and value of both layers get lora_A / lora_B; the new head is trained in full
    assert sum("lora_A" in n for n in names) == sum("lora_B" in n for n in names) == 4
    assert all(".query." in n or ".value." in n for n in names if "lora_" in n)
    assert [n for n in names if "lora_" not in n] == [
        "base_model.model.classifier.modules_to_save.default.bias",
        "base_model.model.classifier.modules_to_save.default.weight",
    ]
    for name in LORA_VARIANTS:
        assert lora_trained[0][name]["trainable_names"] == names


def test_lora_trains_the_same_at_every_stage_and_leaves_the_base_untouched(lora_trained):
    ref = lora_trained[0]["zero0"]
    # a random frozen base learns slowly: the loss falls, less than full fine-tuning's
    assert sum(ref["losses"][-3:]) < 0.93 * sum(ref["losses"][:3]), ref["losses"]
    for name in LORA_VARIANTS:
        for rank in (0, 1):
            r, same_rank = lora_trained[rank][name], lora_trained[rank]["zero0"]
            assert r["losses"] == pytest.approx(same_rank["losses"], rel=1e-5, abs=1e-6), name
            assert r["frozen_after"] == r["frozen_before"] == ref["frozen_before"], name
            assert r["adapters_moved"] > 1e-3, name
        assert max_diff(lora_trained[0][name]["trainable"], ref["trainable"]) < 5e-4, name


def test_optimizer_state_covers_trainable_parameters_only(lora_trained):
    n = lora_trained[0]["zero0"]["trainable_numel"]
    for name in ("zero0", "ddp"):
        assert lora_trained[0][name]["adam_keys"] == 2 * n, name  # exp_avg + exp_avg_sq
    for name in ("zero1", "zero2", "zero3"):
        shards = [lora_trained[r][name]["adam_keys"] for r in (0, 1)]
        # partitioned: each rank about half; padding to the world size at most a few elements
        assert 2 * n <= sum(shards) <= 2 * n + 16 and max(shards) < 0.6 * 2 * n, (name, shards)


# --------------------------------------------------------------------------------------
# Checkpoints: the adapters and their optimizer state, resumed bit for bit
# --------------------------------------------------------------------------------------


def _trainer_state(step: int) -> dict:
    return {"step": step, "epoch": 0, "samples_seen": step * 16, "tokens_seen": 0}


def _saved_tensors(ckpt: Path) -> dict[str, int]:
    """name → elements of every named tensor in the engine's files (module states)."""
    out = {}
    for f in sorted(ckpt.rglob("*.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        module = state.get("module") if "module" in state else state.get("model")
        for k, v in (module or {}).items():
            if torch.is_tensor(v):
                out[k] = v.numel()
    return out


def _allocator_digest(hook) -> str | None:
    if hook is None:
        return None
    state = hook.state_dict()
    tensors = {
        f"{k}/{n}": t for k in ("ipt", "exp_avg_ipt", "exp_avg_unc") for n, t in state[k].items()
    }
    return f"{state['steps']}:{json.dumps(state['rank_pattern'], sort_keys=True)}:{digest(tensors)}"


def _peft_save_and_resume(run_dir: str, engine: str, stage: int, method: str, extra=()) -> dict:
    """Train to 8 saving at 4 and 8, continue to STEPS; resume fresh engines (freshly built
    base + adapters) from 8 and continue the same steps."""
    run_dir = Path(run_dir)
    rank = get_rank()
    job = PeftJob(engine, stage, method, False, *extra)
    manager = ckpt_mod.CheckpointManager(run_dir, job.cfg, {"hostname": "test"})
    job.run(0, 4)
    manager.save(4, job.engine, _trainer_state(4), None)
    job.run(4, 8)
    rng_at_8 = torch.get_rng_state()
    saved_8 = digest(job.engine.full_state_dict())
    figures = manager.save(8, job.engine, _trainer_state(8), None)
    losses = job.run(8, STEPS)
    final = digest(job.engine.full_state_dict())
    allocator = _allocator_digest(job.engine.step_hook)

    newest = run_dir / "checkpoints" / "step_00000008"
    resumed = PeftJob(engine, stage, method, False, *extra)
    resumed.engine.load(newest)
    torch.set_rng_state(rng_at_8)  # the loop restores each rank's RNG from the checkpoint
    after_8 = digest(resumed.engine.full_state_dict())
    losses_from_8 = resumed.run(8, STEPS)
    barrier()
    return {
        "saved_8": saved_8,
        "after_8": after_8,
        "losses": losses,
        "losses_from_8": losses_from_8,
        "final": final,
        "final_from_8": digest(resumed.engine.full_state_dict()),
        "allocator": allocator,
        "allocator_from_8": _allocator_digest(resumed.engine.step_hook),
        "size_mb": figures["size_mb"],
        "trainable": {n for n, p in job.engine.module.named_parameters() if p.requires_grad},
        "buffers": {n for n, _ in job.engine.module.named_buffers()},
        "saved_tensors": _saved_tensors(newest) if rank == 0 else None,
        "engine_bytes": sum(
            f.stat().st_size
            for d in ("zero", "ddp")
            for f in (newest / d).rglob("*")
            if f.is_file()
        ),
        "frozen_numel": sum(
            p.numel() for p in peft_model(job.cfg).parameters() if not p.requires_grad
        ),
    }


@pytest.mark.parametrize(
    "engine, stage",
    [("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3), ("ddp", 0)],
)
def test_lora_checkpoint_holds_the_adapters_and_resumes_bitwise(engine, stage, tmp_path):
    out = run_distributed(
        _peft_save_and_resume, 2, str(tmp_path), engine, stage, "lora", timeout=300
    )
    for r in out:
        assert r["after_8"] == r["saved_8"]
        assert r["losses_from_8"] == r["losses"]
        assert r["final_from_8"] == r["final"]
    saved = out[0]["saved_tensors"]
    # no frozen weight in any file: the module states name trainable parameters (and buffers)
    assert set(saved) <= out[0]["trainable"] | out[0]["buffers"], sorted(set(saved))[:5]
    # smaller than the frozen base alone in fp32 (a full fine-tuning checkpoint is ~4 times it)
    assert out[0]["engine_bytes"] < 4 * out[0]["frozen_numel"], out[0]["engine_bytes"]


def _peft_save_at_world_2(run_dir: str, stage: int, method: str) -> dict:
    job = PeftJob("deepspeed", stage, method)
    job.run(0, 4)
    ckpt_mod.CheckpointManager(Path(run_dir), job.cfg, {}).save(
        4, job.engine, _trainer_state(4), None
    )
    saved = job.trainable()
    job.engine.eval()  # the compared step without dropout: each world size draws its own
    next_loss = job.step(4)
    return {"saved": saved, "next_loss": next_loss, "next": job.trainable()}


def _peft_load_at_world_1(ckpt: str, stage: int, method: str) -> dict:
    universal = ckpt_mod.ensure_universal(Path(ckpt))
    job = PeftJob("deepspeed", stage, method, True)
    job.engine.load(universal)
    loaded = job.trainable()
    job.engine.eval()
    next_loss = job.step(4)
    return {"loaded": loaded, "next_loss": next_loss, "next": job.trainable()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_lora_resumes_at_another_world_size(stage, tmp_path):
    """Saved by 2 ranks, loaded by 1 through the universal conversion: the same adapters,
    and the next step (same 16 samples, dropout off) lands where the 2-rank run's did."""
    two = run_distributed(_peft_save_at_world_2, 2, str(tmp_path), stage, "lora", timeout=300)
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    (one,) = run_distributed(_peft_load_at_world_1, 1, str(ckpt), stage, "lora", timeout=300)
    assert max_diff(one["loaded"], two[0]["saved"]) == 0.0
    assert one["next_loss"] == pytest.approx((two[0]["next_loss"] + two[1]["next_loss"]) / 2)
    moved = max_diff(two[0]["next"], two[0]["saved"])
    gap = max_diff(one["next"], two[0]["next"])
    assert moved > 1e-3 and gap < 1e-6, (moved, gap)


# --------------------------------------------------------------------------------------
# AdaLoRA: the rank allocator at every stage, and its state across a resume
# --------------------------------------------------------------------------------------

ADALORA = ("peft.target_r=2", "peft.tinit=2", "peft.tfinal=4", "peft.delta_t=2")


def _train_adalora(variants: dict) -> dict:
    out = {}
    for name, (engine, stage) in variants.items():
        job = PeftJob(engine, stage, "adalora", False, *ADALORA)
        losses = job.run(0, STEPS)
        hook = job.engine.step_hook
        trainable = job.trainable()  # the working copy, gathered
        out[name] = {
            "losses": losses,
            "steps": hook.steps,
            "pattern": hook.config.rank_pattern,
            "E_master": {n: v for n, v in _masters(hook).items() if "lora_E" in n},
            "E_module": {k: v for k, v in trainable.items() if "lora_E" in k},
        }
    return out


def _masters(hook) -> dict[str, torch.Tensor]:
    from trainer.adalora import full_param

    return {n: full_param(p) for n, p in hook.params}


@pytest.fixture(scope="module")
def adalora_trained() -> list[dict]:
    return run_distributed(_train_adalora, 2, LORA_VARIANTS, timeout=300)


def test_adalora_prunes_the_same_ranks_at_every_stage(adalora_trained):
    ref = adalora_trained[0]["ddp"]
    assert ref["steps"] == STEPS
    pattern = ref["pattern"]
    kept = sum(sum(v) for v in pattern.values())
    assert len(pattern) == 4 and kept == 2 * 4, pattern  # target_r × adapted matrices
    for name in LORA_VARIANTS:
        for rank in (0, 1):
            r = adalora_trained[rank][name]
            assert r["pattern"] == pattern, name
            assert r["losses"] == pytest.approx(
                adalora_trained[rank]["ddp"]["losses"], rel=1e-5, abs=1e-6
            )
            # pruned singular values are zero in the fp32 masters and in the working copy
            for n, keep in pattern.items():
                e = r["E_master"][n].view(-1)
                assert all((e[i] == 0) != k for i, k in enumerate(keep)), (name, n, e, keep)
                module_e = [v for k, v in r["E_module"].items() if n.split(".lora_E")[0] in k]
                assert torch.equal(module_e[0].view(-1), e), name


@pytest.mark.parametrize("engine, stage", [("deepspeed", 2), ("deepspeed", 3), ("ddp", 0)])
def test_adalora_resumes_bitwise_with_its_rank_allocator(engine, stage, tmp_path):
    """Saved at step 8, inside the budget phase (steps 3-11 prune, 12-16 keep the pattern)."""
    out = run_distributed(
        _peft_save_and_resume, 2, str(tmp_path), engine, stage, "adalora", ADALORA, timeout=300
    )
    for r in out:
        assert r["after_8"] == r["saved_8"]
        assert r["losses_from_8"] == r["losses"]
        assert r["final_from_8"] == r["final"]
        assert r["allocator_from_8"] == r["allocator"] and r["allocator"].startswith("16:")
    assert out[0]["allocator"] == out[1]["allocator"]
    assert (tmp_path / "checkpoints" / "step_00000008" / "adalora.pt").is_file()


# --------------------------------------------------------------------------------------
# The loop: manifest base reference, final/ as an adapter, --merge, base verification
# --------------------------------------------------------------------------------------


def _save_local_base(directory: str, seed: int) -> str:
    """A tiny pretrained BERT backbone saved as a hub model is: config, safetensors, tokenizer."""
    from transformers import BertConfig, BertModel

    from trainer import builtin_data
    from trainer.models import build_word_tokenizer
    from trainer.tasks import build_task

    tok = build_word_tokenizer(None, build_task(load_config(TINY)), words=builtin_data.vocabulary())
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )
    BertModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _train_loop(
    run_dir: str, overrides: list[str], config: str = str(TINY), resume: str = "auto"
) -> str | int:
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.env import detect_env
    from trainer.loop import Trainer
    from trainer.process import quiet_libraries

    quiet_libraries()
    sets = [
        "train.max_steps=12",
        "eval.every_steps=6",
        "checkpoint.every_steps=6",
        "logging.tensorboard=false",
        "train.lr=1e-2",
        *overrides,
    ]
    env = detect_env(os.environ)
    try:
        return int(Trainer(load_config(config, sets), env, CPU, Path(run_dir), resume).run())
    except CheckpointError as e:
        return f"CheckpointError: {e}"
    except ConfigError as e:  # the run directory's config check (trainer/rundir.py)
        return f"ConfigError: {e}"


def _logits(model, base: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    enc = tok(
        ["the plot was not good", "honestly , the cast was dull but the story was moving"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        return model.eval()(**enc).logits


# peft's own warning when it loads any AdaLoRA adapter (its rank_pattern is not LoRA's)
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
@pytest.mark.parametrize("method, stage", [("lora", 2), ("adalora", 3)])
def test_peft_run_exports_an_adapter_and_a_merged_model(method, stage, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from launcher.export import run as export_command

    base = _save_local_base(str(tmp_path / "base"), seed=1)
    run = tmp_path / "run"
    sets = [
        f"model.name_or_path={base}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"zero.stage={stage}",
        f"peft.method={method}",
        "peft.target_r=2",
        "peft.tinit=2",
        "peft.tfinal=3",
    ]
    assert run_distributed(_train_loop, 2, str(run), sets, timeout=300) == [0, 0]
    r = json.loads((run / "results.json").read_text())
    assert 0 < r["trainable_parameters"] < r["parameters"] / 5 and r["params_in_sync"]
    ckpt = run / "checkpoints" / "step_00000012"
    m = ckpt_mod.read_manifest(ckpt)
    assert m["peft"]["method"] == method
    assert m["peft"]["trainable_parameters"] == r["trainable_parameters"]
    assert m["base_model"]["name_or_path"] == base and len(m["base_model"]["digest"]) == 16
    assert (ckpt / "adalora.pt").is_file() == (method == "adalora")

    # final/ is the adapter: PeftModel.from_pretrained on the base as published
    final = run / "final"
    assert (final / "adapter_config.json").is_file()
    assert (final / "adapter_model.safetensors").is_file()
    assert (final / "tokenizer.json").is_file() and not (final / "model.safetensors").exists()
    plain_base = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    untrained = _logits(plain_base, base)
    adapted = _logits(PeftModel.from_pretrained(plain_base, str(final)), base)
    # zerotune export RUN_DIR --out DIR --merge: the base with the adapters folded in
    merged_dir = tmp_path / "merged"
    args = argparse.Namespace(
        source=str(run), out=str(merged_dir), max_shard_size="2GB", merge=True
    )
    assert export_command(args) == 0
    assert not (merged_dir / "adapter_config.json").exists()
    merged = _logits(AutoModelForSequenceClassification.from_pretrained(str(merged_dir)), base)
    assert torch.allclose(adapted, merged, atol=1e-5), (adapted, merged)
    assert not torch.allclose(adapted, untrained, atol=1e-3)  # the adapter changes the model
    if method == "adalora":  # the pruned ranks are cut out of the saved adapter
        cfg = json.loads((final / "adapter_config.json").read_text())
        kept = sum(sum(v) for v in cfg["rank_pattern"].values())
        assert kept == 2 * len(cfg["rank_pattern"]) == 2 * 4, cfg["rank_pattern"]


def test_resume_refuses_another_base_model_method_or_rank(tmp_path):
    base = _save_local_base(str(tmp_path / "base"), seed=1)
    run = tmp_path / "run"
    sets = [
        f"model.name_or_path={base}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "peft.method=lora",
    ]
    assert run_distributed(_train_loop, 2, str(run), [*sets, "train.max_steps=6"]) == [0, 0]
    # the base changed on disk (same path, other weights): its digest no longer matches
    _save_local_base(base, seed=2)
    out = run_distributed(_train_loop, 2, str(run), sets)
    assert all("frozen base weights differ" in o for o in out), out
    _save_local_base(base, seed=1)
    adalora = [*sets[:2], "peft.method=adalora"]
    out = run_distributed(_train_loop, 2, str(run), adalora)
    assert all("peft.method: 'lora' → 'adalora'" in o for o in out), out  # the config check
    # --resume force passes the config check; the checkpoint's own check still refuses
    out = run_distributed(_train_loop, 2, str(run), adalora, str(TINY), "force")
    assert all("peft.method='lora'" in o for o in out), out
    out = run_distributed(_train_loop, 2, str(run), [*sets, "peft.r=4"], str(TINY), "force")
    assert all("peft.r=4 but the checkpoint was trained with 8" in o for o in out), out
    assert "method: lora" in (run / "config.yaml").read_text()  # refused runs leave it be


@pytest.mark.parametrize(
    "config, engine, stage",
    [("sft-tiny.yaml", "deepspeed", 3), ("ner-tiny.yaml", "ddp", 0)],
)
def test_every_task_trains_lora_and_exports(config, engine, stage, tmp_path):
    """Causal LM (no head to save) at ZeRO-3 and token classification (its head saved) with
    DDP; builtin bases, rebuilt by export from the manifest's reference (name, seed)."""
    from peft import PeftModel
    from transformers import AutoConfig

    from trainer.adapter_export import load_base
    from trainer.export import _model_class, export_checkpoint

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    sets = [
        f"data.cache_dir={tmp_path / 'cache'}",
        f"engine={engine}",
        f"zero.stage={stage}",
        "peft.method=lora",
        "train.max_steps=8",
        "data.builtin_size=400",
        "eval.every_steps=8",
        "data.test=null",
    ]
    out = run_distributed(_train_loop, 2, str(run), sets, str(root / "configs" / config))
    assert out == [0, 0]
    ckpt = run / "checkpoints" / "step_00000008"
    saved = json.loads((run / "final" / "adapter_config.json").read_text())
    # token classification: its head (peft adds the name "score" for every classifier task)
    assert saved["modules_to_save"] == (["classifier", "score"] if "ner" in config else None)
    config_ = AutoConfig.from_pretrained(ckpt / "hf")
    reference = ckpt_mod.read_manifest(ckpt)["base_model"]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = load_base(reference, config_, _model_class(config_))
    adapted = PeftModel.from_pretrained(base, str(run / "final")).eval()(input_ids=ids).logits
    merged_dir = export_checkpoint(ckpt, tmp_path / "merged", merge=True)
    merged = _model_class(config_).from_pretrained(str(merged_dir)).eval()(input_ids=ids).logits
    assert torch.allclose(adapted, merged, atol=1e-5)


def _crash_then(run_dir: str, overrides: list[str], fault: str) -> str | int:
    os.environ["ZEROTUNE_FAULT"] = fault  # os._exit(66) right after that step, every rank
    return _train_loop(run_dir, overrides)


def _losses(run: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    }


@pytest.mark.slow  # the longest in-process runs: kept out of the fast tier
def test_adalora_run_crashes_and_resumes_exactly_then_at_another_world_size(tmp_path):
    """The loop killed after step 9 (checkpoint at 6) and started again: the same losses and
    the same final adapters as an uninterrupted run, bit for bit; at ZeRO-3 the same crash
    resumed by 1 rank (universal conversion; the allocator's state from the step directory)."""
    from multirank import RankFailure

    sets = [
        f"data.cache_dir={tmp_path / 'cache'}",
        "peft.method=adalora",
        *ADALORA,
        "peft.tfinal=2",
    ]
    ref = tmp_path / "ref"
    assert run_distributed(_train_loop, 2, str(ref), sets) == [0, 0]
    run = tmp_path / "run"
    with pytest.raises(RankFailure, match="exit code 66"):
        run_distributed(_crash_then, 2, str(run), sets, "step@9")
    assert run_distributed(_train_loop, 2, str(run), sets) == [0, 0]
    assert _losses(run) == _losses(ref)
    r, r_ref = (json.loads((d / "results.json").read_text()) for d in (run, ref))
    assert r["param_digests"] == r_ref["param_digests"]

    z3 = [*sets, "zero.stage=3"]
    run = tmp_path / "world"
    with pytest.raises(RankFailure, match="exit code 66"):
        run_distributed(_crash_then, 2, str(run), z3, "step@9")
    assert run_distributed(_train_loop, 1, str(run), z3) == [0]
    assert (run / "checkpoints" / "step_00000006" / "universal" / "DONE").is_file()
    r = json.loads((run / "results.json").read_text())
    assert r["world_size"] == 1 and r["steps"] == 12
    losses = _losses(run)
    assert losses[6] == pytest.approx(_losses(ref)[6], abs=1e-6)  # before the crash: ZeRO-3 = 2
    # after it: 1 rank draws the dropout masks of all 4 micro-batches, so only close
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] == pytest.approx(_losses(ref)[12], rel=0.03)
