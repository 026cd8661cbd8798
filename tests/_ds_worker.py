"""Data-parallel jobs for tests/test_deepspeed.py, run in every rank:

    torchrun --nproc_per_node 2 tests/_ds_worker.py SPEC.json OUT_DIR

A job trains a tiny float32 BERT pair for a few steps with one method (metadistil, kd, finetune) on either
backend: each model gets a DeepSpeed config (a file in ds_configs/, by stem) or None for the torch backend.
Every rank draws the same global batches through the trainer's BatchStream and keeps its slice. Rank 0 writes
each job's final parameters (gathered from ZeRO-3 shards) to OUT_DIR/<job>.pt. The test runs the same
`run_job` in one process with the torch backend as the reference.

Job keys: name, method, teacher, student (config stem or None), steps, save_at (step to checkpoint after),
resume_from (a job whose checkpoint to resume).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification

from metadistil_scale.backends import dist, make_model
from metadistil_scale.backends.checkpointing import StageCheckpoint
from metadistil_scale.checkpoint import seed_everything
from metadistil_scale.config import DistillConfig, MetaConfig, OptimConfig
from metadistil_scale.meta import MetaDistil
from metadistil_scale.steps import finetune_step, kd_step
from metadistil_scale.trainer import BatchStream

REPO = Path(__file__).resolve().parents[1]
NUM_LABELS = 3
BATCH, MICRO, QUIZ = 8, 2, 6  # global batch 8 = micro 2 × 2 ranks × 2 accumulation steps
# The teacher's clipping is active at these sizes, so clipping over shards is checked; the student's SGD (its
# clipping inactive) makes its update proportional to the gradient, so a wrong gradient scale shows.
TEACHER_OPTIM = OptimConfig(lr=1e-2, weight_decay=0.01, warmup_ratio=0.3, max_grad_norm=0.05)
STUDENT_OPTIM = OptimConfig(name="sgd", lr=0.5, momentum=0.9, weight_decay=0.01, warmup_ratio=0.3, max_grad_norm=10.0)
DISTILL = DistillConfig(alpha=0.5, temperature=2.0)
META = MetaConfig(pilot_lr=0.5, u_mode="jvp", schedule="lean")


def tiny_bert(layers: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=NUM_LABELS, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )
    return BertForSequenceClassification(config)


class Rows:
    """A split as the trainer sees it: `select(ids)` returns rows, the collator stacks them."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 40, (n, 7), generator=g)
        self.mask = torch.ones_like(self.ids)
        for i in range(n):  # padding of varying length
            self.mask[i, 3 + i % 4 :] = 0
            self.ids[i, 3 + i % 4 :] = 0
        self.labels = torch.randint(0, NUM_LABELS, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, ids: list[int]) -> list[int]:
        return ids

    def collate(self, ids: list[int]) -> dict:
        inputs = {"input_ids": self.ids[ids], "attention_mask": self.mask[ids]}
        return {"teacher": inputs, "student": inputs, "labels": self.labels[ids]}


def ds_config(stem: str | None) -> dict | None:
    """A shipped config, with clipping taken from the recipe (the test's teacher clips at 0.05)."""
    if stem is None:
        return None
    config = json.loads((REPO / "ds_configs" / f"{stem}.json").read_text())
    config["gradient_clipping"] = "auto"
    return config


def initial_models(method: str) -> tuple[BertForSequenceClassification, BertForSequenceClassification]:
    """(teacher, trained student); for `finetune` (the teacher's own fine-tuning) the trained model is a copy of
    the bigger one."""
    teacher = tiny_bert(2, seed=0).eval()
    return teacher, tiny_bert(2, seed=0) if method == "finetune" else tiny_bert(1, seed=1)


def run_job(job: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Train one job; returns its final parameters (full, on every rank) and last metrics."""
    method, steps = job["method"], job["steps"]
    seed_everything(0)
    teacher, student = initial_models(method)
    batching = dict(batch_size=BATCH, micro_batch_size=MICRO, stage_key="student_train")
    student_model = make_model(student, STUDENT_OPTIM, 10, ds_config=ds_config(job["student"]),
                               ds_key="deepspeed_student", optim_key="student_train.optim",
                               functional=method == "metadistil", **batching)
    teacher_model = make_model(teacher, TEACHER_OPTIM if method == "metadistil" else None, 10,
                               ds_config=ds_config(job["teacher"]), ds_key="deepspeed_teacher",
                               optim_key="meta.teacher_optim", **batching)
    meta = MetaDistil(teacher_model, student_model, DISTILL, META)

    rank, world = dist.rank(), dist.world_size()
    train, quiz = Rows(64, seed=1), Rows(30, seed=2)
    stream = BatchStream(train, BATCH, 0, train.collate, MICRO, rank, world)
    quiz_stream = BatchStream(quiz, QUIZ, 1, quiz.collate, None, rank, world)

    models = {"student": student_model, **({"teacher": teacher_model} if method == "metadistil" else {})}
    state = {"step": 0}
    if job.get("resume_from"):
        state = StageCheckpoint(out / job["resume_from"], {}, models).load()
    metrics: dict[str, float] = {}
    while state["step"] < steps:
        parts = stream(state["step"])
        if method == "metadistil":
            metrics = meta.step(parts, quiz_stream(state["step"]))
        elif method == "kd":
            metrics = kd_step(teacher_model, student_model, parts, DISTILL, regression=False)
        else:
            metrics = finetune_step(student_model, parts, "student", regression=False)
        state["step"] += 1
        if state["step"] == job.get("save_at"):
            StageCheckpoint(out / job["name"], {}, models).save(state)

    with teacher_model.gathered(), student_model.gathered():
        params = {role: [p.detach().float().clone() for p in module.parameters()]
                  for role, module in (("teacher", teacher), ("student", student))}
    return {**params, "metrics": {k: v for k, v in metrics.items() if not k.startswith("time_")}}


def main(spec: Path, out: Path) -> None:
    dist.init_distributed(use_deepspeed=True)
    for job in json.loads(spec.read_text()):
        result = run_job(job, out)
        if dist.is_main():
            torch.save(result, out / f"{job['name']}.pt")
    dist.exit_process(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
