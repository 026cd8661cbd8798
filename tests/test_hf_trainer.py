"""MetaDistilTrainer (a transformers.Trainer) takes the project's own steps: 5 optimizer steps equal the project's
MetaDistil step on the same batches and quiz batches, and a Trainer checkpoint resumes to the same weights."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments, default_data_collator

from metadistil_scale.backends.torch_backend import TorchModel
from metadistil_scale.config import DistillConfig, MetaConfig, OptimConfig
from metadistil_scale.hf import MetaDistilTrainer
from metadistil_scale.meta import MetaDistil, teacher_update_steps

LR, STEPS, BATCH, ACCUMULATION = 1e-3, 5, 4, 2
META = MetaConfig(pilot_lr=0.05, teacher_optim=OptimConfig(lr=1e-3, weight_decay=0.0, warmup_ratio=0.0),
                  quiz_batch_size=6)  # quiz batches are collated too: their size tells them apart
DISTILL = DistillConfig(alpha=0.5, temperature=2.0)


def tiny(layers: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForSequenceClassification(config)


def rows(n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (n, 8), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": torch.randint(0, 2, (n,), generator=g).tolist()})


class RecordingCollator:
    """default_data_collator, keeping every batch it makes (the order the Trainer trains on)."""

    def __init__(self) -> None:
        self.batches: list[dict] = []

    def __call__(self, features: list[dict]) -> dict:
        batch = default_data_collator(features)
        self.batches.append(copy.deepcopy(batch))
        return batch


def make_trainer(out: Path, teacher, student, collator, **args) -> MetaDistilTrainer:
    arguments = TrainingArguments(**{
        "output_dir": str(out), "max_steps": STEPS, "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": ACCUMULATION, "learning_rate": LR, "weight_decay": 0.0, "warmup_steps": 0,
        "lr_scheduler_type": "linear", "max_grad_norm": 1.0, "optim": "adamw_torch", "logging_steps": 1,
        "report_to": [], "use_cpu": True, "seed": 0, "data_seed": 0, "save_strategy": "no",
        "dataloader_num_workers": 0, **args})
    return MetaDistilTrainer(model=student, teacher_model=teacher, args=arguments, train_dataset=rows(64, 0),
                             quiz_dataset=rows(12, 1), data_collator=collator, distill=DISTILL, meta=META)


def test_five_trainer_steps_equal_the_projects_step(tmp_path):
    teacher, student = tiny(2, seed=0), tiny(1, seed=1)
    start_teacher, start_student = copy.deepcopy(teacher), copy.deepcopy(student)
    collator = RecordingCollator()
    trainer = make_trainer(tmp_path / "hf", teacher, student, collator)
    trainer.train()

    # The project's own step on the batches the Trainer drew, with the same optimizers.
    # (the data loader collates one batch ahead of the one it hands out)
    train_batches = [b for b in collator.batches if len(b["labels"]) == BATCH][: STEPS * ACCUMULATION]
    optim = OptimConfig(lr=LR, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=1.0)
    t = TorchModel(start_teacher.eval(), META.teacher_optim, len(teacher_update_steps(META, STEPS)))
    s = TorchModel(start_student.train(), optim, STEPS)
    step = MetaDistil(t, s, DISTILL, META)
    for i in range(STEPS):
        parts = []
        for batch in train_batches[i * ACCUMULATION:(i + 1) * ACCUMULATION]:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            parts.append({"teacher": inputs, "student": inputs, "labels": batch["labels"]})
        step.step(parts, trainer._quiz_batch(i), diagnostics=False)

    for got, want in ((student, start_student), (teacher, start_teacher)):
        diff = max(float((a - b).abs().max()) for a, b in zip(got.parameters(), want.parameters(), strict=True))
        assert diff <= 1e-6
    moved = max(float((a - b).abs().max()) for a, b in zip(teacher.parameters(), tiny(2, seed=0).parameters()))
    assert moved > 1e-5  # the teacher was meta-trained, so its equality is not vacuous

    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert (tmp_path / "final" / "teacher" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_trainer_checkpoint_resumes_to_the_same_weights(tmp_path):
    full_teacher, full_student = tiny(2, seed=0), tiny(1, seed=1)
    make_trainer(tmp_path / "full", full_teacher, full_student, default_data_collator).train()

    out = tmp_path / "stopped"
    first = make_trainer(out, tiny(2, seed=0), tiny(1, seed=1), default_data_collator, save_strategy="steps",
                         save_steps=3)
    first.train()
    assert (out / "checkpoint-3" / "teacher_state.pt").is_file()
    resumed_teacher, resumed_student = tiny(2, seed=7), tiny(1, seed=8)  # other weights: all come from the checkpoint
    make_trainer(out, resumed_teacher, resumed_student, default_data_collator).train(
        resume_from_checkpoint=str(out / "checkpoint-3"))
    for got, want in ((resumed_student, full_student), (resumed_teacher, full_teacher)):
        assert max(float((a - b).abs().max()) for a, b in zip(got.parameters(), want.parameters())) <= 1e-6


def test_metadistil_without_a_quiz_set_is_refused(tmp_path):
    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="needs quiz_dataset"):
        MetaDistilTrainer(model=tiny(1, 1), teacher_model=tiny(2, 0), args=arguments, train_dataset=rows(8, 0))
