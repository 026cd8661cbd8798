"""The plain-torch backend: one trained model with its optimizer, schedule and gradient clipping.

The MetaDistil step talks to a model only through the backend interface (base.BackendModel), so that the
DeepSpeed backend can stand in for it without the step being written twice.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metadistil_scale.backends import dist
from metadistil_scale.config import OptimConfig


def retain_freed_host_memory() -> bool:
    """Keep freed host memory in the process's heap (glibc). By default glibc maps each large tensor afresh and
    hands freed space back to the OS, so every pass of a step page-faults its activations in again; a MetaDistil
    step on CPU, with its many passes, lost ~8% to that (KD ~0%). The peak resident size is unchanged: memory
    is reused, not added. Returns False where glibc's mallopt is not available."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(libc.mallopt(option, value) == 1 for option, value in (
        (m_mmap_threshold, 32 * 2**20), (m_trim_threshold, 2**31 - 1), (m_top_pad, 256 * 2**20)))


def logits_of(output: Any) -> torch.Tensor:
    """HF models return an output object; CV models return the logits tensor itself."""
    return output.logits if hasattr(output, "logits") else output


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_schedule(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    """Linear warmup over `warmup_ratio` of the steps, then `cfg.schedule` (linear decay, step decays, constant)."""
    warmup = int(total_steps * cfg.warmup_ratio)
    milestones = [round(m * total_steps) for m in cfg.milestones]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= m for m in milestones)
        if cfg.schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class TorchModel:
    """A model trained in this process. Under torchrun it is data-parallel like torch DDP, by hand: the
    gradients are summed over ranks once per step (losses are already shares of the global batch)."""

    def __init__(self, module: nn.Module, optim: OptimConfig | None, total_steps: int = 1) -> None:
        self.module = module
        self.max_grad_norm = optim.max_grad_norm if optim else None
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, optim) if optim else None
        self.scheduler = (
            lr_schedule(self.optimizer, total_steps, optim) if self.optimizer else None
        )
        self._grads_reduced = False
        if dist.world_size() > 1:  # every rank starts from rank 0's weights, as DDP does
            with torch.no_grad():
                for t in [*module.parameters(), *module.buffers()]:
                    torch.distributed.broadcast(t, src=0)

    # -- what a step needs
    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return logits_of(self.module(**inputs))

    @property
    def functional_module(self) -> nn.Module:
        """The module the MetaDistil passes call with torch.func.functional_call (the DeepSpeed backend may
        hand out a replica)."""
        return self.module

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, step the optimizer and the schedule, clear gradients; returns the pre-clip grad norm."""
        self._reduce_grads()
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
        assert self.optimizer is not None and self.scheduler is not None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._grads_reduced = False
        return float(norm)

    def _reduce_grads(self) -> None:
        """Sum the accumulated gradients over data-parallel ranks, once per step (no-op in one process)."""
        if not self._grads_reduced:
            dist.all_reduce_sum_([p.grad for p in self.module.parameters() if p.grad is not None])
            self._grads_reduced = True

    def zero_grad(self) -> None:
        self.module.zero_grad(set_to_none=True)
        self._grads_reduced = False

    def full_grad(self, name: str, param: nn.Parameter) -> torch.Tensor:
        """The accumulated gradient of one parameter, summed over ranks (zeros where it got none); between
        the last backward() of a step and step()."""
        self._reduce_grads()
        return param.grad if param.grad is not None else torch.zeros_like(param)

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum tensors over data-parallel ranks in place (no-op in one process). Losses are already divided
        by the global row count, so a sum gives the global batch's gradient."""
        dist.all_reduce_sum_(tensors)

    def all_reduce_sum(self, value: float) -> float:
        return dist.all_reduce_sum(value)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer else 0.0

    @property
    def zero_stage(self) -> None:
        return None  # every rank holds the whole model

    @property
    def sharded_checkpoint(self) -> bool:
        return False

    def gathered(self) -> contextlib.AbstractContextManager:
        """Full parameters for the block: always the case here (the DeepSpeed backend gathers ZeRO-3 shards)."""
        return contextlib.nullcontext()

    def whole_parameter(self, owner: nn.Module, param: nn.Parameter) -> torch.Tensor:
        return param

    # -- checkpoints
    def save_checkpoint(self, folder: Path) -> None:
        """Into a checkpoint folder beside DeepSpeed engines' (the weights are the same on every rank)."""
        from metadistil_scale.checkpoint import atomic_save

        if dist.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_save(self.state_dict(), folder / "model.pt")

    def load_checkpoint(self, folder: Path) -> None:
        from metadistil_scale.checkpoint import load_checkpoint

        self.load_state_dict(load_checkpoint(folder / "model.pt"))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.module.state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
