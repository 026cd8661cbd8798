"""`MetaDistilTrainer`: KD and MetaDistil inside a Hugging Face `transformers.Trainer` script.

    trainer = MetaDistilTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                                train_dataset=train, quiz_dataset=quiz, data_collator=collator,
                                method="metadistil", distill=DistillConfig(), meta=MetaConfig())
    trainer.train()

The step is the project's own (`methods.py`: `kd_step`, `MetaDistil.step`): the Trainer keeps what it owns for
the student (optimizer, schedule, clipping, gradient accumulation, logging, evaluation, checkpoints), and the
project's step computes the student's gradient — for MetaDistil after the pilot step and the teacher's meta-update
on a quiz batch. The teacher has its own optimizer and schedule (`meta.teacher_optim`, sized by its updates), is
saved beside the student (`<output_dir>/teacher`) and is part of every Trainer checkpoint, so
`train(resume_from_checkpoint=...)` continues both models. With gradient accumulation the micro-batches of one
optimizer step are gathered and stepped as one batch, as the project's trainer does (the pilot step needs the
whole batch). Teacher and student read the same inputs (one tokenizer).

Under torchrun (DDP, one process per rank) the Trainer shards the train batches over the ranks and wraps the
student in DDP, but the project's step runs on the unwrapped student, as `metadistil-scale train` does under
torchrun: every loss is this rank's share of the global batch, the student's gradient is all-reduced once before
the Trainer clips and applies it, the teacher is replicated (rank 0's weights) and its meta-gradient all-reduced
before its step, and each rank takes an equal slice of every quiz batch. Rank 0 alone saves. DeepSpeed and FSDP
under the Trainer are refused: the step needs whole parameters (use `metadistil-scale train` with
`deepspeed_teacher`/`deepspeed_student` to shard them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer

from metadistil_scale.backends import dist
from metadistil_scale.backends.torch_backend import TorchModel
from metadistil_scale.checkpoint import atomic_save, load_checkpoint
from metadistil_scale.config import DistillConfig, MetaConfig, validate_distill, validate_meta
from metadistil_scale.meta import MetaDistil
from metadistil_scale.methods import METHOD_REGISTRY, StepContext, get_method

TEACHER_STATE = "teacher_state.pt"


class _TrainerOwnedStudent(TorchModel):
    """The student as the project's steps see it, with the Trainer's optimizer: `step` leaves the gradient for
    the Trainer to clip and apply, and returns its norm."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module, None)

    def step(self) -> float:
        self._reduce_grads()
        self._grads_reduced = False  # the Trainer clears the gradients: the next step's are reduced afresh
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


class MetaDistilTrainer(Trainer):
    def __init__(self, *args: Any, teacher_model: nn.Module, method: str = "metadistil",
                 quiz_dataset: Dataset | None = None, distill: DistillConfig | None = None,
                 meta: MetaConfig | None = None, regression: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("MetaDistilTrainer shards no parameters (args.deepspeed/args.fsdp): run it under torchrun "
                             "for DDP, or `metadistil-scale train` with deepspeed_teacher/deepspeed_student for ZeRO")
        self.method = get_method(method)
        if not self.method.uses_teacher:
            raise ValueError(f"method={method!r} trains no teacher-student pair; one of "
                             f"{[m for m, c in METHOD_REGISTRY.items() if c.uses_teacher]}")
        self.distill, self.meta = distill or DistillConfig(), meta or MetaConfig()
        validate_distill(self.distill)
        validate_meta(self.meta)
        if self.method.needs_quiz and quiz_dataset is None:
            raise ValueError(f"method={method!r} needs quiz_dataset (held-out rows the student never trains on)")
        if quiz_dataset is not None and self.args.remove_unused_columns:  # as the Trainer does to train_dataset
            quiz_dataset = self._remove_unused_columns(quiz_dataset, description="quiz")
        if quiz_dataset is not None and min(self.meta.quiz_batch_size, len(quiz_dataset)) < self.args.world_size:
            raise ValueError(f"a quiz batch of min(meta.quiz_batch_size={self.meta.quiz_batch_size}, "
                             f"len(quiz_dataset)={len(quiz_dataset)}) rows is fewer than the {self.args.world_size} "
                             f"ranks, which each take an equal slice of it")
        self.quiz_dataset, self.regression = quiz_dataset, regression
        self.teacher = teacher_model.to(self.args.device).eval()
        self._micro_batches: list[dict] = []
        self._ctx: StepContext | None = None
        self._pending_teacher_state: dict | None = None  # from a checkpoint, until the teacher's optimizer exists

    # ------------------------------------------------------------------ the step

    def _context(self) -> StepContext:
        """Built on the first step, when the Trainer knows its number of steps (the teacher's schedule)."""
        if self._ctx is None:
            teacher = TorchModel(self.teacher, self.method.teacher_optim(self.meta),
                                 self.method.teacher_schedule_steps(self.meta, self.state.max_steps))
            student = _TrainerOwnedStudent(self.model)
            self._ctx = StepContext(student, teacher, self.distill, self.meta, self.args.device,
                                    regression=self.regression, quiz_stream=self._quiz_batch)
            if self.method.trains_teacher:
                self._ctx.metadistil = MetaDistil(teacher, student, self.distill, self.meta, self.regression)
            if self._pending_teacher_state is not None:
                teacher.load_state_dict(self._pending_teacher_state)
                self._pending_teacher_state = None
        return self._ctx

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        """Gather the micro-batches of one optimizer step; on the last one run the project's step over them."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.pop("labels")
        self._micro_batches.append({"teacher": inputs, "student": inputs, "labels": labels})
        # The Trainer sets the window's length before its micro-batches (shorter at an epoch's uneven end).
        window = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if len(self._micro_batches) < window:
            return torch.zeros((), device=self.args.device)
        parts, self._micro_batches = self._micro_batches, []
        model.train()
        record = self.method.step(self._context(), self.state.global_step, parts, logged=False)
        return torch.tensor(record["loss"], device=self.args.device)

    def _quiz_batch(self, step: int) -> list[dict]:
        """This rank's slice of the quiz batch of teacher update `step`: a deterministic function of
        (meta.quiz_seed, step), so a resumed run draws what the uninterrupted one drew. As in the project's trainer,
        the batch is rounded down to a multiple of the ranks and each takes an equal contiguous slice."""
        world = dist.world_size()
        size = min(self.meta.quiz_batch_size, len(self.quiz_dataset)) // world * world
        per_epoch = len(self.quiz_dataset) // size
        epoch, index = divmod(step, per_epoch)
        order = np.random.default_rng([self.meta.quiz_seed, epoch]).permutation(len(self.quiz_dataset))
        local = order[index * size:(index + 1) * size][dist.rank() * (size // world):][:size // world]
        rows = [self.quiz_dataset[int(i)] for i in local]
        batch = self._prepare_inputs(self.data_collator(rows))
        labels = batch.pop("labels")
        return [{"teacher": batch, "student": batch, "labels": labels}]

    # ------------------------------------------------------------------ saving and resuming

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The student as the Trainer saves it, and the teacher MetaDistil trained beside it in `teacher/`."""
        super().save_model(output_dir, _internal_call)
        if self.method.trains_teacher and self.args.should_save:
            folder = Path(output_dir or self.args.output_dir) / "teacher"
            self.teacher.save_pretrained(folder, safe_serialization=True)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self._ctx is not None and self.method.trains_teacher and self.args.should_save:
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            atomic_save(self._ctx.teacher.state_dict(), folder / TEACHER_STATE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / TEACHER_STATE
        if self.method.trains_teacher:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: a MetaDistil checkpoint holds the teacher's state; this one does "
                                        f"not ({os.listdir(resume_from_checkpoint)})")
            self._pending_teacher_state = load_checkpoint(path)  # applied once the teacher's optimizer exists
