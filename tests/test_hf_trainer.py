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
from metadistil_scale.meta import MetaDistil
from metadistil_scale.methods import BatchSource, StepContext, get_method

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


def make_trainer(out: Path, teacher, student, collator, method: str = "metadistil", **args) -> MetaDistilTrainer:
    arguments = TrainingArguments(**{
        "output_dir": str(out), "max_steps": STEPS, "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": ACCUMULATION, "learning_rate": LR, "weight_decay": 0.0, "warmup_steps": 0,
        "lr_scheduler_type": "linear", "max_grad_norm": 1.0, "optim": "adamw_torch", "logging_steps": 1,
        "report_to": [], "use_cpu": True, "seed": 0, "data_seed": 0, "save_strategy": "no",
        "dataloader_num_workers": 0, **args})
    return MetaDistilTrainer(model=student, teacher_model=teacher, args=arguments, train_dataset=rows(64, 0),
                             quiz_dataset=rows(12, 1), data_collator=collator, method=method, distill=DISTILL,
                             meta=META)


def project_steps(method: str, teacher, student, steps: list[list[dict]], quiz: BatchSource) -> None:
    """The project's own `method` step, in this process, on `steps` (each a list of collated micro-batches)."""
    algorithm = get_method(method)
    optim = OptimConfig(lr=LR, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=1.0)
    t = TorchModel(teacher.eval(), algorithm.teacher_optim(META), algorithm.teacher_schedule_steps(META, STEPS))
    s = TorchModel(student.train(), optim, STEPS)
    ctx = StepContext(s, t, DISTILL, META, torch.device("cpu"), quiz_stream=quiz)
    if algorithm.trains_teacher:
        ctx.metadistil = MetaDistil(t, s, DISTILL, META)
    for i, batches in enumerate(steps):
        parts = []
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            parts.append({"teacher": inputs, "student": inputs, "labels": batch["labels"]})
        algorithm.step(ctx, i, parts, logged=False)


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_five_trainer_steps_equal_the_projects_step(tmp_path):
    teacher, student = tiny(2, seed=0), tiny(1, seed=1)
    start_teacher, start_student = copy.deepcopy(teacher), copy.deepcopy(student)
    collator = RecordingCollator()
    trainer = make_trainer(tmp_path / "hf", teacher, student, collator)
    trainer.train()

    # The project's own step on the batches the Trainer drew, with the same optimizers.
    # (the data loader collates one batch ahead of the one it hands out)
    train_batches = [b for b in collator.batches if len(b["labels"]) == BATCH][: STEPS * ACCUMULATION]
    steps = [train_batches[i * ACCUMULATION:(i + 1) * ACCUMULATION] for i in range(STEPS)]
    project_steps("metadistil", start_teacher, start_student, steps, trainer._quiz_batch)

    for got, want in ((student, start_student), (teacher, start_teacher)):
        assert max_difference(got, want) <= 1e-6
    assert max_difference(teacher, tiny(2, seed=0)) > 1e-5  # the teacher was meta-trained: its equality says something

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


@pytest.mark.slow
def test_ddp_on_two_ranks_equals_the_projects_step_on_the_global_batches(tmp_path):
    """torchrun, 2 CPU ranks (gloo): the Trainer shards the batches and wraps the student in DDP; 5 steps of kd and
    of metadistil equal the project's step in one process on the ranks' batches put together (each rank's
    micro-batches of a step form the global batch) and the whole quiz batches."""
    from test_deepspeed import _run, _torchrun

    _run(_torchrun(str(Path(__file__).with_name("_hf_ddp_worker.py")), str(tmp_path)))
    for method in ("kd", "metadistil"):
        ranks = [torch.load(tmp_path / f"{method}-rank{r}.pt") for r in range(2)]
        assert [r["world"] for r in ranks] == [2, 2] and all(r["ddp"] for r in ranks)
        assert not torch.equal(ranks[0]["batches"][0]["input_ids"], ranks[1]["batches"][0]["input_ids"])
        steps = [[b for r in ranks for b in r["batches"][i * ACCUMULATION:(i + 1) * ACCUMULATION]]
                 for i in range(STEPS)]
        teacher, student = tiny(2, seed=0), tiny(1, seed=1)
        one_process = make_trainer(tmp_path / "one", teacher, student, default_data_collator, method=method)
        project_steps(method, teacher, student, steps, one_process._quiz_batch)  # whole quiz batches
        for role, model in (("teacher", teacher), ("student", student)):
            for rank in ranks:
                got = rank[role]
                assert max(float((got[n] - p.detach()).abs().max()) for n, p in model.named_parameters()) <= 1e-6, role
        if method == "metadistil":
            assert max_difference(teacher, tiny(2, seed=0)) > 1e-5
    for rank in range(2):  # a quiz batch smaller than the ranks is refused before any work
        assert torch.load(tmp_path / f"refusal-rank{rank}.pt") == (
            "a quiz batch of min(meta.quiz_batch_size=1, len(quiz_dataset)=12) rows is fewer than the 2 ranks, which "
            "each take an equal slice of it")
