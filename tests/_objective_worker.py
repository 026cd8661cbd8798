"""MetaDistil with a distillation objective of OBJECTIVES (the official GLUE one: 0.5 CE + 0.5 mse of softmaxes +
100 PKD; or KL with attention-map terms) on tests/_ds_worker.py's tiny BERT pair and data, run in every rank:

    torchrun --nproc_per_node 2 tests/_objective_worker.py OUT.pt [NAME]     # the teacher at ZeRO-3, 2 ranks
    python tests/_objective_worker.py OUT.pt [NAME]                          # one process, torch backend

Rank 0 writes the final parameters of both models (the teacher's gathered from its shards).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _ds_worker as base
import torch

from metadistil_scale.backends import dist, make_model
from metadistil_scale.checkpoint import seed_everything
from metadistil_scale.config import DistillConfig, DistillTermConfig
from metadistil_scale.meta import MetaDistil
from metadistil_scale.objectives import Objective, prepare_models
from metadistil_scale.trainer import BatchStream

OBJECTIVES = {
    # The student has one layer: PKD pairs it with the teacher's top layer and the embeddings with the embeddings.
    "official": DistillConfig(alpha=0.5, temperature=2.0, terms=[
        DistillTermConfig(kind="mse", weight=0.5, normalization="official"),
        DistillTermConfig(kind="pkd", weight=100.0, layers="uniform"),
    ]),
    # The student's one attention layer against the teacher's top one (MiniLM) and, by MSE, its first one.
    "attention": DistillConfig(alpha=0.5, temperature=2.0, terms=[
        DistillTermConfig(kind="kl", weight=0.5),
        DistillTermConfig(kind="attention", weight=2.0, layers="top"),
        DistillTermConfig(kind="attention_mse", weight=3.0, layers="uniform"),
    ]),
}
STEPS = 3


def run(teacher_zero_stage: str | None, distill: DistillConfig) -> dict[str, list[torch.Tensor]]:
    seed_everything(0)
    teacher, student = base.initial_models("metadistil")
    prepare_models(Objective.from_config(distill), teacher, student)
    batching = dict(batch_size=base.BATCH, micro_batch_size=base.MICRO, stage_key="student_train")
    student_model = make_model(student, base.STUDENT_OPTIM, 10, ds_config=None, ds_key="deepspeed_student",
                               optim_key="student_train.optim", functional=True, **batching)
    teacher_model = make_model(teacher, base.TEACHER_OPTIM, 10, ds_config=base.ds_config(teacher_zero_stage),
                               ds_key="deepspeed_teacher", optim_key="meta.teacher_optim", **batching)
    meta = MetaDistil(teacher_model, student_model, distill, base.META)
    rank, world = dist.rank(), dist.world_size()
    train, quiz = base.Rows(64, seed=1), base.Rows(30, seed=2)
    stream = BatchStream(train, base.BATCH, 0, train.collate, base.MICRO, rank, world)
    quiz_stream = BatchStream(quiz, base.QUIZ, 1, quiz.collate, None, rank, world)
    for step in range(STEPS):
        meta.step(stream(step), quiz_stream(step))
    with teacher_model.gathered(), student_model.gathered():
        return {role: [p.detach().double().clone() for p in module.parameters()]
                for role, module in (("teacher", teacher), ("student", student))}


def main(out: Path, objective: str) -> None:
    if "LOCAL_RANK" not in os.environ:
        torch.save(run(None, OBJECTIVES[objective]), out)
        return
    dist.init_distributed(use_deepspeed=True)
    params = run("zero3", OBJECTIVES[objective])
    if dist.is_main():
        torch.save(params, out)
    dist.exit_process(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "official")
