"""MetaDistilTrainer under torchrun, for tests/test_hf_trainer.py; runs in every rank:

    torchrun --nproc_per_node 2 tests/_hf_ddp_worker.py OUT_DIR

For kd and metadistil the Trainer trains the tiny pair of test_hf_trainer for its 5 steps with DDP over gloo.
Every rank writes OUT_DIR/<method>-rank<r>.pt: the train batches it was handed, in order, and the final weights
of both models, which the test compares with the project's step in one process on the global batches.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from test_hf_trainer import ACCUMULATION, BATCH, META, STEPS, RecordingCollator, make_trainer, rows, tiny
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainingArguments

from metadistil_scale.backends import dist
from metadistil_scale.hf import MetaDistilTrainer


def main(out: Path) -> None:
    for method in ("kd", "metadistil"):
        teacher, student, collator = tiny(2, seed=0), tiny(1, seed=1), RecordingCollator()
        trainer = make_trainer(out / method, teacher, student, collator, method=method, ddp_backend="gloo")
        trainer.train()
        # Quiz batches are collated too (3 rows a rank): the batch size tells them apart.
        batches = [b for b in collator.batches if len(b["labels"]) == BATCH][: STEPS * ACCUMULATION]
        torch.save({"world": dist.world_size(), "ddp": isinstance(trainer.model_wrapped, DistributedDataParallel),
                    "batches": batches,
                    "teacher": {n: p.detach().clone() for n, p in teacher.named_parameters()},
                    "student": {n: p.detach().clone() for n, p in student.named_parameters()}},
                   out / f"{method}-rank{dist.rank()}.pt")
    torch.save(refusal(trainer.args), out / f"refusal-rank{dist.rank()}.pt")


def refusal(args: TrainingArguments) -> str:
    """The error of a quiz batch smaller than the ranks (each rank takes an equal slice of it)."""
    try:
        MetaDistilTrainer(model=tiny(1, seed=1), teacher_model=tiny(2, seed=0), args=args, train_dataset=rows(8, 0),
                          quiz_dataset=rows(12, 1), meta=dataclasses.replace(META, quiz_batch_size=1))
    except ValueError as err:
        return str(err)
    return "accepted"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    dist.exit_process(0)
