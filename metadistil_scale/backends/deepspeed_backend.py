"""The DeepSpeed backend: a model trained by a DeepSpeed engine (ZeRO 0/1/2/3, CPU offload, bf16) behind the
backend interface (base.BackendModel) as TorchModel, so that the steps (steps.py, meta.py) run unchanged on either.

One semantics for both backends: a loss handed to backward() is a sum over this rank's rows divided by the rows
of the whole global batch, so the global gradient is the *sum* of the ranks' gradients. DeepSpeed instead
averages gradients over the data-parallel ranks (and would divide the loss by the accumulation steps);
backward() undoes both, so a run on N ranks takes the same steps as one process with the same global batch.

Who owns what: the recipe (OptimConfig) owns the optimizer, its schedule and gradient clipping, exactly as for
the torch backend; the JSON config owns ZeRO, precision, offload and communication. Batch keys and
`gradient_clipping` may be "auto" (filled from the recipe); explicit values must agree with it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metadistil_scale.backends import dist
from metadistil_scale.backends.base import hand_whole_parameters
from metadistil_scale.backends.torch_backend import build_optimizer, logits_of, lr_schedule
from metadistil_scale.checkpoint import CheckpointError, weights_only_loads
from metadistil_scale.config import ConfigError, OptimConfig

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def load_ds_config(source: str | Path | dict[str, Any], key: str) -> dict[str, Any]:
    """A DeepSpeed JSON config from a file (or a dict, as given); errors name the config key and the file."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{key}: DeepSpeed config not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key}: {path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: {path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def resolve_ds_config(
    raw: dict[str, Any],
    *,
    where: str,
    optim: OptimConfig | None,
    optim_key: str,
    micro_batch_size: int,
    grad_accum: int,
    world: int,
) -> dict[str, Any]:
    """The config handed to deepspeed.initialize: "auto" keys filled from the recipe, conflicts refused.

    `where` names the config in errors ("deepspeed_teacher (ds_configs/zero3.json)")."""
    cfg = copy.deepcopy(raw)
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ConfigError(
                f"{where}: remove '{section}': the optimizer and its schedule come from the recipe ({optim_key}), "
                "so that the torch and DeepSpeed backends train alike"
            )
    _resolve_clipping(cfg, where, optim, optim_key)
    _resolve_batch(cfg, where, micro_batch_size, grad_accum, world)
    stage = _resolve_zero(cfg, where, optim)
    if optim is not None and optim.name == "sgd" and stage > 0:
        cfg.setdefault("zero_allow_untested_optimizer", True)  # ZeRO runs SGD fine; it only lists Adam-likes
    if _offloads_optimizer(cfg) and not _uses_cpu_adam(cfg, optim):
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)  # the recipe's torch optimizer steps on the CPU
    cfg.setdefault("steps_per_print", 2**31 - 1)  # progress is the trainer's job
    return cfg


def _resolve_clipping(cfg: dict[str, Any], where: str, optim: OptimConfig | None, optim_key: str) -> None:
    # DeepSpeed clips at 1.0 when the key is absent: make every config say what it means.
    if "gradient_clipping" not in cfg:
        raise ConfigError(
            f"{where}: set 'gradient_clipping' explicitly (a number, 0 for none, or \"auto\" for "
            f"{optim_key}.max_grad_norm); DeepSpeed's default of 1.0 would clip silently"
        )
    clip = (optim.max_grad_norm or 0.0) if optim is not None else 0.0
    value = cfg["gradient_clipping"]
    if value == "auto":
        cfg["gradient_clipping"] = clip
    elif isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where}: gradient_clipping must be a number >= 0 or \"auto\", got {value!r}")
    elif optim is not None and not math.isclose(float(value), clip):
        raise ConfigError(
            f"{where}: gradient_clipping={value} but the recipe's {optim_key}.max_grad_norm is "
            f"{optim.max_grad_norm}; make them agree or write \"auto\""
        )


def _resolve_batch(cfg: dict[str, Any], where: str, micro_batch_size: int, grad_accum: int, world: int) -> None:
    recipe = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world,
    }
    for name, want in recipe.items():
        got = cfg.get(name, "auto")
        if got == "auto":
            cfg[name] = want
        elif got != want:
            raise ConfigError(
                f"{where}: {name}={got} but the recipe gives {want} (global batch = micro-batch × {world} ranks × "
                "accumulation); remove the key or write \"auto\""
            )


def _resolve_zero(cfg: dict[str, Any], where: str, optim: OptimConfig | None) -> int:
    """zero_optimization checked and completed; returns the stage."""
    zero = cfg.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: zero_optimization must be a JSON object")
    stage = zero.setdefault("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if optim is None and stage in (1, 2):
        # A frozen model (KD's teacher) has no optimizer state or gradients to shard: ZeRO 1/2 are stage 0 for
        # it, and DeepSpeed refuses them without an optimizer. ZeRO-3 still shards its parameters.
        zero["stage"] = stage = 0
    if stage == 3:
        # DeepSpeed's memory-efficient linear replaces torch.nn.functional.linear for the whole process with an
        # autograd.Function that has no forward-mode rule: the student's JVP would fail.
        zero.setdefault("memory_efficient_linear", False)
    return stage


def _offloads_optimizer(cfg: dict[str, Any]) -> bool:
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def _uses_cpu_adam(cfg: dict[str, Any], optim: OptimConfig | None) -> bool:
    """DeepSpeed's vectorised CPU Adam for an offloaded AdamW on GPUs; on a CPU-only machine the torch optimizer
    is as fast and needs no compiled op."""
    from deepspeed.accelerator import get_accelerator

    return (
        optim is not None and optim.name == "adamw" and _offloads_optimizer(cfg)
        and get_accelerator().device_name() != "cpu"
    )


def _optimizer_factory(cfg: dict[str, Any], optim: OptimConfig) -> Callable[[Any], torch.optim.Optimizer]:
    def build(params) -> torch.optim.Optimizer:
        params = list(params)
        if _uses_cpu_adam(cfg, optim):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=optim.lr, weight_decay=optim.weight_decay, adamw_mode=True)
        return build_optimizer(params, optim)

    return build


class DeepSpeedModel:
    """A model trained (or, with `optim=None`, only run) by a DeepSpeed engine.

    `micro_batch_size` and `grad_accum` are this rank's share of the stage's global batch: every optimizer step
    takes exactly `grad_accum` calls of backward() followed by one step().

    `functional` marks the MetaDistil student, whose pilot, quiz and JVP passes call the module functionally
    at parameters of their own. At ZeRO 0/1/2 they use the engine's module (its parameters are whole on every
    rank). ZeRO-3 keeps only shards and hooks every forward to gather them, so those passes run on a plain
    replica that trainable() refreshes from the gathered parameters: one full copy of the (small) student per
    rank, its gradients and optimizer state still sharded."""

    def __init__(
        self,
        module: nn.Module,
        optim: OptimConfig | None,
        total_steps: int,
        ds_config: str | Path | dict[str, Any],
        *,
        micro_batch_size: int,
        grad_accum: int,
        key: str = "deepspeed",
        optim_key: str = "optim",
        functional: bool = False,
    ) -> None:
        import deepspeed

        dist.init_distributed(use_deepspeed=True)
        where = key if isinstance(ds_config, dict) else f"{key} ({ds_config})"
        self.config = resolve_ds_config(
            load_ds_config(ds_config, key), where=where, optim=optim, optim_key=optim_key,
            micro_batch_size=micro_batch_size, grad_accum=grad_accum, world=dist.world_size(),
        )
        self._zero_stage: int = self.config["zero_optimization"]["stage"]
        self.grad_accum = grad_accum
        self._pending = 0  # backward() calls since the last step()
        self._replica = copy.deepcopy(module) if functional and self.zero_stage == 3 else None

        was_training = module.training
        params = [p for p in module.parameters() if p.requires_grad]
        kwargs: dict[str, Any] = {}
        if optim is not None:
            kwargs.update(
                model_parameters=params,
                optimizer=_optimizer_factory(self.config, optim),
                lr_scheduler=lambda opt: lr_schedule(opt, total_steps, optim),
            )
        self.engine, *_ = deepspeed.initialize(model=module, config=self.config, dist_init_required=False, **kwargs)
        self.module.train(was_training)  # the engine may switch modes; the teacher runs in eval mode
        if self.zero_stage == 3:  # parameters are shards from here on
            hand_whole_parameters(self.module, self.whole_parameter)
        self.trains = optim is not None
        self._live = dict(self.module.named_parameters())
        if self._replica is not None:  # in the engine's precision, hook-free
            self._replica.to(next(iter(self._live.values())).dtype).train(was_training)

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def zero_stage(self) -> int:
        return self._zero_stage

    @property
    def world(self) -> int:
        return self.engine.dp_world_size

    # -- what a step needs
    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return logits_of(self.engine(**inputs))

    @property
    def functional_module(self) -> nn.Module:
        """The module the MetaDistil passes call with torch.func.functional_call."""
        return self._replica if self._replica is not None else self.module

    def trainable(self) -> dict[str, nn.Parameter]:
        """The trainable parameters of functional_module, whole (a collective under a ZeRO-3 student)."""
        if self._replica is None:
            return {n: p for n, p in self._live.items() if p.requires_grad}
        import deepspeed

        replica = dict(self._replica.named_parameters())
        with deepspeed.zero.GatheredParameters(list(self._live.values()), modifier_rank=None), torch.no_grad():
            for name, param in self._live.items():
                replica[name].copy_(param.data)
        self._replica.train(self.module.training)  # the same dropout behaviour as the engine's module
        with torch.no_grad():  # BatchNorm statistics move in the engine's forwards
            buffers = dict(self._replica.named_buffers())
            for name, buffer in self.module.named_buffers():
                buffers[name].copy_(buffer)
        return {n: p for n, p in replica.items() if p.requires_grad}

    def backward(self, loss: torch.Tensor) -> None:
        if self._pending >= self.grad_accum:
            raise RuntimeError(
                f"backward() called {self._pending + 1} times before step(); the engine was built for "
                f"{self.grad_accum} micro-batches per step"
            )
        # × world: DeepSpeed averages over ranks, our losses are already shares of the global batch.
        # scale_wrt_gas=False: the same holds across micro-batches.
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        self._pending += 1
        if self._pending < self.grad_accum:
            # DeepSpeed's way through an accumulation window: step() off the boundary only counts the
            # micro-batch, so the last backward() is the one that reduces the gradients.
            self.engine.step()

    def step(self) -> float:
        """Clip, step the optimizer and the schedule, clear gradients; returns the pre-clip grad norm."""
        if self._pending != self.grad_accum:
            raise RuntimeError(f"step() after {self._pending} of {self.grad_accum} micro-batches")
        assert self.engine.is_gradient_accumulation_boundary()
        norm = None
        if not hasattr(self.engine.optimizer, "_global_grad_norm"):
            # A plain fp32 ZeRO-0 step keeps no norm; the reduced gradients are in .grad.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self.engine.step()
        self._pending = 0
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def full_grad(self, name: str, param: nn.Parameter) -> torch.Tensor:
        """The whole accumulated gradient of one parameter (a collective under ZeRO 1/2/3: call it on every
        rank, in the same order); valid between the last backward() of a step and step()."""
        from deepspeed.utils import safe_get_full_grad

        grad = safe_get_full_grad(self._live[name])  # `param` may be the replica's
        return grad.to(param.dtype).view(param.shape) if grad is not None else torch.zeros_like(param)

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        dist.all_reduce_sum_(tensors)

    def all_reduce_sum(self, value: float) -> float:
        return dist.all_reduce_sum(value)

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0]) if self.trains else 0.0

    @property
    def sharded_checkpoint(self) -> bool:
        return True  # the optimizer state is per rank even at ZeRO 0, through DeepSpeed's own format

    def whole_parameter(self, owner: nn.Module, param: nn.Parameter) -> torch.Tensor:
        """A whole copy of `param`, whose gradient flows back to it. ZeRO-3 keeps only a shard outside the modules'
        forwards; registered as `owner`'s external parameter, it is gathered for owner's forward from the second
        call on."""
        if self.zero_stage != 3:
            return param
        from deepspeed.runtime.zero.partition_parameters import (
            GatheredParameters,
            ZeroParamStatus,
            register_external_parameter,
        )

        if param.ds_status == ZeroParamStatus.AVAILABLE:
            return param.clone()
        register_external_parameter(owner, param)
        with GatheredParameters(param):
            return param.clone()

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Full parameters on every rank for the block (ZeRO-3 keeps only shards outside forward); a collective.
        For saving in the transformers format or reading weights."""
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    # -- checkpoints: DeepSpeed's own format (module, sharded optimizer, schedule); collective
    def state_dict(self) -> dict[str, Any]:
        raise CheckpointError("a DeepSpeed engine's state is per rank: save it with save_checkpoint")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise CheckpointError("a DeepSpeed engine's state is per rank: load it with load_checkpoint")

    def save_checkpoint(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load_checkpoint(self, folder: Path) -> None:
        if not folder.is_dir():
            raise CheckpointError(f"no DeepSpeed checkpoint at {folder}")
        with weights_only_loads(folder, deepspeed_checkpoint_classes()):
            path, _ = self.engine.load_checkpoint(
                str(folder.parent), tag=folder.name, load_optimizer_states=self.trains,
                load_lr_scheduler_states=self.trains,
            )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint at {folder}")
        self._pending = 0


def deepspeed_checkpoint_classes() -> list[type]:
    """The classes DeepSpeed pickles into its checkpoints besides tensors and plain data (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3, bf16 and offload checkpoints): plain
    records that unpickle without running code of their own."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
