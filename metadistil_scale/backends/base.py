"""The backend interface: what a training step, the stage loop and the checkpoints ask of a trained model.

`BackendModel` is implemented by TorchModel (torch_backend.py) and DeepSpeedModel (deepspeed_backend.py); the
steps (steps.py, meta.py, methods.py) and checkpointing.py are written against it alone, so that what is
particular to a backend (ZeRO stages, sharded parameters, its checkpoint format) stays in that backend's
module. A new backend is one module implementing this protocol plus its branch in `make_model`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

# (module that reads it, parameter) -> the whole parameter, differentiable back to it
WholeParameter = Callable[[nn.Module, nn.Parameter], torch.Tensor]


class BackendModel(Protocol):
    """One model trained (or, without an optimizer, only run) by a backend. Losses handed to backward() are
    sums over this rank's rows divided by the rows of the whole global batch, on every backend."""

    @property
    def module(self) -> nn.Module:
        """The wrapped module (its weights may be shards: see `gathered`)."""

    @property
    def functional_module(self) -> nn.Module:
        """The module the MetaDistil passes call with torch.func.functional_call at `trainable()`."""

    @property
    def zero_stage(self) -> int | None:
        """The ZeRO stage that shards this model's state over the ranks; None for a backend that does not."""

    @property
    def sharded_checkpoint(self) -> bool:
        """Whether each rank saves its own part (save_checkpoint into a folder per model) rather than one
        `state_dict` that rank 0 writes for all."""

    @property
    def lr(self) -> float:
        """The optimizer's current learning rate (0 without an optimizer)."""

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def trainable(self) -> dict[str, nn.Parameter]:
        """The trainable parameters of functional_module, whole (a collective where they are sharded)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float:
        """Clip, step the optimizer and the schedule, clear gradients; returns the pre-clip grad norm."""

    def zero_grad(self) -> None: ...

    def full_grad(self, name: str, param: nn.Parameter) -> torch.Tensor:
        """The whole accumulated gradient of one parameter, summed over ranks (a collective)."""

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None: ...

    def all_reduce_sum(self, value: float) -> float: ...

    def gathered(self) -> AbstractContextManager:
        """Whole parameters on every rank for the block (a collective where they are sharded)."""

    def whole_parameter(self, owner: nn.Module, param: nn.Parameter) -> torch.Tensor:
        """`param` whole, for a module that reads it outside its own forward (see ReadsWholeParameters)."""

    def save_checkpoint(self, folder: Path) -> None:
        """Model, optimizer and schedule into `folder` (collective)."""

    def load_checkpoint(self, folder: Path) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer and schedule as one picklable dict (only where not `sharded_checkpoint`)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class ReadsWholeParameters(Protocol):
    """A module that uses one of its parameters after its forward (CausalLMHead hands its LM head to the chunked
    losses). A backend that shards parameters gives it `whole_parameter` when it takes the module over."""

    def read_parameters_with(self, whole: WholeParameter) -> None: ...


def hand_whole_parameters(module: nn.Module, whole: WholeParameter) -> None:
    """Tell every submodule that reads parameters outside its forward how to get them whole."""
    for sub in module.modules():
        if isinstance(sub, ReadsWholeParameters):
            sub.read_parameters_with(whole)
