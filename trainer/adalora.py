"""AdaLoRA's rank allocator on whole tensors, at every ZeRO stage and under DDP.

AdaLoRA prunes ranks with importance scores from each step's gradients. peft expects
``update_and_allocate`` between ``optimizer.step()`` and ``zero_grad()``, reading ``p.grad``
and masking ``p`` in place — neither holds under ZeRO (DeepSpeed steps and zeroes in one
call; gradients and fp32 master weights are partitioned). ``AdaLoraAllocator`` does the same
arithmetic on whole tensors at every stage: it takes the averaged, unclipped gradient after
the last backward (``safe_get_full_grad``), the updated fp32 weights after the step
(``safe_get_full_fp32_param``), runs peft's own ``RankAllocator`` on them and writes masked
``lora_E`` values back to the master weights and the working copy. Its state (step count,
importance averages, rank pattern) is saved with the checkpoint by rank 0 (identical on
every rank) and restored exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .adapters import ADALORA_STATE, ADAPTER


def _is_zero_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def full_grad(p: torch.nn.Parameter) -> torch.Tensor:
    """The whole averaged gradient on every rank (after the last backward, before the step)."""
    if _is_zero_param(p) or getattr(p, "_hp_grad", None) is not None:
        from deepspeed.utils import safe_get_full_grad

        g = safe_get_full_grad(p)
    else:
        g = p.grad
    if g is None:
        shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
        return torch.zeros(shape, dtype=torch.float32, device=p.device)
    return g.detach().float().clone()


def full_param(p: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 master value on every rank."""
    if _is_zero_param(p):
        from deepspeed.utils import safe_get_full_fp32_param

        v = safe_get_full_fp32_param(p)
        if v is not None:
            return v.detach().float().clone()
    return p.detach().float().clone()


def set_full_param(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write a whole value into the master weights and the working copy (collective at ZeRO)."""
    if not _is_zero_param(p):
        with torch.no_grad():
            p.copy_(value.to(p.device, p.dtype))
        return
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(p, value)  # copies its slice into the (maybe offloaded) master
    with torch.no_grad():
        if hasattr(p, "ds_id"):
            _set_zero3_partition(p, value)
        else:
            p.copy_(value.to(p.device, p.dtype))


def _set_zero3_partition(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """ZeRO-3's working copy: this rank's slice of the flat parameter (``ds_tensor``), and
    the whole tensor where it is currently gathered. Written in place, not through
    ``GatheredParameters``: a gather outside the forward upsets ZeRO-3's prefetch trace."""
    import torch.distributed as dist

    part = p.ds_tensor
    start = part.numel() * dist.get_rank(group=p.ds_process_group)
    flat = value.reshape(-1)[start : start + part.numel()]
    part.data[: flat.numel()].copy_(flat.to(part.device, part.dtype))
    if p.numel() == p.ds_numel:  # gathered (AdaLoRA's small parameters persist)
        p.data.copy_(value.view(p.ds_shape).to(p.device, p.dtype))


class _Proxy:
    """What peft's RankAllocator reads from a model: ``named_parameters`` with ``.grad``."""

    def __init__(self, named: list[tuple[str, torch.Tensor]]):
        self.named = named

    def named_parameters(self):
        return iter(self.named)


class AdaLoraAllocator:
    """peft's AdaLoRA budget schedule on whole tensors, called by the engines around the step."""

    def __init__(self, peft_model: torch.nn.Module):
        self.tuner = peft_model.base_model  # peft's AdaLoraModel
        self.config = self.tuner.peft_config[ADAPTER]
        self.allocator = self.tuner.rankallocator
        # the names peft's allocator uses (rank_pattern keys): relative to the task model
        self.params = [
            (n, p) for n, p in self.tuner.model.named_parameters() if "lora_" in n and ADAPTER in n
        ]
        self.steps = 0  # optimizer updates applied so far: AdaLoRA's global_step
        self._grads: dict[str, torch.Tensor] | None = None

    def on_zero3(self, root: torch.nn.Module) -> None:
        """The orthogonality regulariser reads every lora_A / lora_B after the model's forward,
        outside the modules that own them (peft gathers them only when transformers' own
        DeepSpeed integration is on): make them external parameters of the root module, which
        ZeRO-3 gathers for the whole forward."""
        import deepspeed

        for n, p in self.params:
            if "lora_A" in n or "lora_B" in n:
                deepspeed.zero.register_external_parameter(root, p)

    def before_step(self) -> None:
        self._grads = {n: full_grad(p) for n, p in self.params}

    def after_step(self, applied: bool) -> None:
        """peft's ``AdaLoraModel.update_and_allocate(global_step)``, on the fp32 masters."""
        grads, self._grads = self._grads, None
        if not applied or grads is None:
            return
        self.steps += 1
        step, c = self.steps, self.config
        named = []
        for n, p in self.params:
            t = full_param(p)
            t.grad = grads[n]
            named.append((n, t))
        proxy = _Proxy(named)
        end = c.total_step - c.tfinal
        if step < end:
            _, pattern = self.allocator.update_and_allocate(proxy, step)
            if pattern:
                c.rank_pattern = pattern
            masked = bool(pattern)
        elif step == end:
            _, c.rank_pattern = self.allocator.update_and_allocate(proxy, step, force_mask=True)
            self.allocator.reset_ipt()
            masked = True
        else:
            self.allocator.mask_using_rank_pattern(proxy, c.rank_pattern)
            masked = True
        if masked:
            values = dict(named)
            for n, p in self.params:
                if "lora_E" in n:
                    set_full_param(p, values[n].detach())

    def state_dict(self) -> dict[str, Any]:
        a = self.allocator

        def host(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: t.cpu() for n, t in d.items()}

        return {
            "steps": self.steps,
            "ipt": host(a.ipt),
            "exp_avg_ipt": host(a.exp_avg_ipt),
            "exp_avg_unc": host(a.exp_avg_unc),
            "rank_pattern": self.config.rank_pattern,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        a = self.allocator
        device = self.params[0][1].device  # where full_param / full_grad put their values

        def here(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: t.to(device) for n, t in d.items()}

        self.steps = int(state["steps"])
        a.ipt, a.exp_avg_ipt, a.exp_avg_unc = (
            here(state[k]) for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")
        )
        self.config.rank_pattern = state["rank_pattern"]

    def save(self, step_dir: Path) -> None:
        torch.save(self.state_dict(), Path(step_dir) / ADALORA_STATE)

    def load(self, step_dir: Path) -> None:
        path = Path(step_dir) / ADALORA_STATE
        if not path.is_file():
            raise RuntimeError(f"AdaLoRA checkpoint without its rank allocator state ({path})")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
