"""Training methods as objects: what each trains, what it needs, and its step.

The classification trainer and the causal-LM recipe build what a method asks for (a teacher, a trainable
teacher, quiz and pilot streams) and call its `step` once per training step. A new method is one `Method`
subclass plus its entry in `METHOD_REGISTRY`; config.METHODS lists the same names without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from metadistil_scale.backends.base import BackendModel
from metadistil_scale.config import DistillConfig, MetaConfig, OptimConfig
from metadistil_scale.loop import to_device
from metadistil_scale.meta import MetaDistil, teacher_update_steps
from metadistil_scale.steps import Batch, finetune_step, kd_step
from metadistil_scale.teacher_cache import TeacherCache

BatchSource = Callable[[int], list[Batch]]  # a BatchStream: step -> micro-batches


@dataclass
class StepContext:
    """What a method's step works on, built once per stage by its caller."""

    student: BackendModel  # the trained model (for the teacher's own fine-tuning, the teacher)
    teacher: BackendModel | None
    distill: DistillConfig
    meta: MetaConfig
    device: torch.device
    role: str = "student"  # which inputs of a batch the trained model reads
    regression: bool = False
    # Built by the caller (not here) so that a caller's own MetaDistil subclass is the one that runs.
    metadistil: MetaDistil | None = None
    quiz_stream: BatchSource | None = None
    pilot_stream: BatchSource | None = None
    teacher_cache: TeacherCache | None = None  # the frozen teacher's logits by row (teacher_cache.py)


class Method:
    """One way to train the student. Subclasses set the flags and implement `step`."""

    name: ClassVar[str]
    uses_teacher: ClassVar[bool] = False  # the stage gets a teacher model
    trains_teacher: ClassVar[bool] = False  # the teacher has an optimizer and is checkpointed with the student
    needs_quiz: ClassVar[bool] = False  # a held-out quiz stream
    needs_pilot_stream: ClassVar[bool] = False  # a second train stream for the pilot step

    def teacher_optim(self, meta: MetaConfig) -> OptimConfig | None:
        return meta.teacher_optim if self.trains_teacher else None

    def teacher_schedule_steps(self, meta: MetaConfig, steps: int) -> int:
        """The length of the teacher's lr schedule: its own updates, not the run's steps."""
        return max(1, len(teacher_update_steps(meta, steps)))

    def step(self, ctx: StepContext, step: int, parts: list[Batch], logged: bool) -> dict[str, float]:
        """One training step on the train batch `parts` (on the device); `logged` says the record is written."""
        raise NotImplementedError


class Finetune(Method):
    """The trained model alone on its labels, no teacher."""

    name = "finetune"

    def step(self, ctx: StepContext, step: int, parts: list[Batch], logged: bool) -> dict[str, float]:
        return finetune_step(ctx.student, parts, ctx.role, ctx.regression)


class KD(Method):
    """Classic knowledge distillation from a frozen teacher."""

    name = "kd"
    uses_teacher = True

    def step(self, ctx: StepContext, step: int, parts: list[Batch], logged: bool) -> dict[str, float]:
        if ctx.teacher_cache is not None:
            return _cached_kd_step(ctx, parts)
        return kd_step(ctx.teacher, ctx.student, parts, ctx.distill, ctx.regression)


class MetaDistilMethod(Method):
    """MetaDistil: the teacher is meta-updated on a quiz batch every `meta.interval` steps after
    `meta.frozen_steps`; in between the step is KD."""

    name = "metadistil"
    uses_teacher = True
    trains_teacher = True
    needs_quiz = True

    def step(self, ctx: StepContext, step: int, parts: list[Batch], logged: bool) -> dict[str, float]:
        meta = ctx.meta
        update = step >= meta.frozen_steps and (step - meta.frozen_steps) % meta.interval == 0
        if step < meta.frozen_steps and ctx.teacher_cache is not None:  # the frozen teacher: a KD step, cached
            return {**_cached_kd_step(ctx, parts), "teacher_updated": 0.0}
        quiz = to_device(ctx.quiz_stream(step), ctx.device) if update else []
        pilot = None
        if update and ctx.pilot_stream is not None:
            pilot = to_device(ctx.pilot_stream(step), ctx.device)
        record = ctx.metadistil.step(parts, quiz, update_teacher=update, pilot_parts=pilot, diagnostics=logged)
        record["teacher_updated"] = float(update)
        return record


class MetaDistilNoPilot(MetaDistilMethod):
    """The paper's ablation: the pilot step and the meta-gradient use a different train batch."""

    name = "metadistil-no-pilot"
    needs_pilot_stream = True


METHOD_REGISTRY: dict[str, type[Method]] = {
    cls.name: cls for cls in (Finetune, KD, MetaDistilMethod, MetaDistilNoPilot)
}


class UnknownMethodError(ValueError):
    """A method name that is not in the registry."""


def get_method(name: str) -> Method:
    try:
        return METHOD_REGISTRY[name]()
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}: one of {tuple(METHOD_REGISTRY)}") from None


def _cached_kd_step(ctx: StepContext, parts: list[Batch]) -> dict[str, float]:
    """A KD step whose teacher logits come through the cache, with the share of rows it found there."""
    record = kd_step(ctx.teacher, ctx.student, parts, ctx.distill, ctx.regression, ctx.teacher_cache)
    return {**record, "teacher_cache_hit_rate": ctx.teacher_cache.take_hit_rate()}

