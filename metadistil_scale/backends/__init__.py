"""Execution backends: plain torch (one process, or data-parallel under torchrun) and DeepSpeed engines.

Both give a model the same surface (forward, backward, step, gradient reduction, checkpoints), so the steps in
steps.py and meta.py are written once. `make_model` picks the backend from the config.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from metadistil_scale.config import Config, ConfigError, OptimConfig


def make_model(
    module: nn.Module,
    optim: OptimConfig | None,
    total_steps: int,
    *,
    ds_config: str | None,
    ds_key: str,
    optim_key: str,
    batch_size: int,
    micro_batch_size: int | None,
    stage_key: str,
    functional: bool = False,
) -> Any:
    """A TorchModel, or a DeepSpeedModel when `ds_config` names a DeepSpeed JSON file. `batch_size` and
    `micro_batch_size` are the stage's global batch and micro-batch (config key `stage_key`); `functional`
    marks the MetaDistil student, whose meta passes read its full parameters."""
    from metadistil_scale.backends import dist
    from metadistil_scale.backends.torch_backend import TorchModel

    micro, accum = dist.local_batch(batch_size, micro_batch_size, stage_key)
    if ds_config is None:
        return TorchModel(module, optim, total_steps)
    from metadistil_scale.backends.deepspeed_backend import DeepSpeedModel

    return DeepSpeedModel(module, optim, total_steps, ds_config, micro_batch_size=micro, grad_accum=accum,
                          key=ds_key, optim_key=optim_key, functional=functional)


def check_distributed(cfg: Config, world: int) -> None:
    """Refuse, before any work, what cannot run on `world` ranks or on the chosen backends (ConfigError naming
    the key)."""
    for key in ("teacher_finetune", "student_train"):
        stage = getattr(cfg, key)
        if stage.batch_size % world:
            raise ConfigError(f"{key}.batch_size={stage.batch_size} is not divisible by the {world} data-parallel ranks")
        local = stage.batch_size // world
        if stage.micro_batch_size is not None and local % stage.micro_batch_size:
            raise ConfigError(f"{key}.micro_batch_size={stage.micro_batch_size} does not divide the per-rank batch "
                              f"{stage.batch_size}/{world}={local}")
    from metadistil_scale.methods import get_method  # imported here: methods.py imports the backends

    if not any(get_method(m).trains_teacher for m in cfg.methods):
        return
    if cfg.meta.quiz_batch_size % world:
        raise ConfigError(f"meta.quiz_batch_size={cfg.meta.quiz_batch_size} is not divisible by the {world} "
                          "data-parallel ranks")
    deepspeed = [key for key in ("deepspeed_teacher", "deepspeed_student") if getattr(cfg, key)]
    if deepspeed and cfg.meta.u_mode == "unrolled":
        raise ConfigError(f"meta.u_mode=unrolled (the create_graph reference) runs on the torch backend only; "
                          f"use jvp or finite-difference with {' and '.join(deepspeed)}")
    if cfg.deepspeed_student and cfg.meta.schedule == "fast":
        raise ConfigError("meta.schedule=fast reuses the student's forward graph for the pilot gradient, which a "
                          "DeepSpeed engine's backward hooks forbid; use meta.schedule=lean with deepspeed_student")
