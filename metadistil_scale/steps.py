"""The first-order training steps: teacher fine-tuning and classic KD. The MetaDistil step is in meta.py.

A batch is a dict {"teacher": inputs, "student": inputs, "labels": tensor}, given as a list of micro-batches;
losses are sums divided by the rows of the whole (global) batch, so accumulation equals one large batch.
"""

from __future__ import annotations

import torch

from metadistil_scale.backends.base import BackendModel
from metadistil_scale.config import DistillConfig
from metadistil_scale.lm.chunked import IGNORE_INDEX
from metadistil_scale.losses import hard_loss_sum, student_loss_sum
from metadistil_scale.objectives import Objective, attention_mask
from metadistil_scale.teacher_cache import TeacherCache, frozen_teacher_logits

Batch = dict


def count_rows(parts: list[Batch], model: BackendModel) -> int:
    """Rows of the global batch: local rows summed over data-parallel ranks. Rows labelled -100 (a causal
    LM's padding and document ends) carry no loss and do not count."""
    return int(model.all_reduce_sum(float(sum(_loss_rows(p["labels"]) for p in parts))))


def _loss_rows(labels: torch.Tensor) -> int:
    return len(labels) if labels.is_floating_point() else int((labels != IGNORE_INDEX).sum())


def finetune_step(model: BackendModel, parts: list[Batch], role: str, regression: bool) -> dict[str, float]:
    """One supervised step of `model` on the `role` ("teacher" or "student") inputs."""
    n = count_rows(parts, model)
    total = 0.0
    for part in parts:
        loss = hard_loss_sum(model(part[role]), part["labels"], regression) / n
        model.backward(loss)
        total += loss.item()
    grad_norm = model.step()
    return {"loss": model.all_reduce_sum(total), "grad_norm": grad_norm}


def kd_step(
    teacher: BackendModel, student: BackendModel, parts: list[Batch], cfg: DistillConfig, regression: bool,
    cache: TeacherCache | None = None,
) -> dict[str, float]:
    """Classic KD: the student steps on the distillation objective (α·CE + (1−α)·soft by default) against the
    current (frozen) teacher."""
    n = count_rows(parts, student)
    objective = Objective.from_config(cfg, regression)
    total = 0.0
    for part in parts:
        # The cache keeps logits only: an objective that reads hidden states or attention maps runs the teacher.
        teacher_logits = frozen_teacher_logits(teacher, objective.inputs(part["teacher"]),
                                               None if objective.reads_layers else cache)
        student_logits = student(objective.inputs(part["student"]))
        loss = student_loss_sum(student_logits, teacher_logits, part["labels"], objective,
                                attention_mask(part["student"])) / n
        student.backward(loss)
        total += loss.item()
    grad_norm = student.step()
    return {"loss": student.all_reduce_sum(total), "grad_norm": grad_norm}
