"""Activation checkpointing changes memory, not results: KD and MetaDistil steps with it equal steps without it
(float64, dropout on), and the passes it must stay out of are shown to go wrong with it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_meta import make_step, text_batch, tiny_bert
from torch.func import functional_call

from metadistil_scale.backends.torch_backend import TorchModel
from metadistil_scale.config import ConfigError, DistillConfig, OptimConfig, load_config
from metadistil_scale.models.checkpointing import enable_activation_checkpointing
from metadistil_scale.steps import kd_step

DROPOUT = 0.1


def pair(checkpointed: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher, student = tiny_bert(2, DROPOUT, seed=0).eval(), tiny_bert(2, DROPOUT, seed=1)
    if checkpointed:
        enable_activation_checkpointing(teacher, "teacher")
        enable_activation_checkpointing(student, "student")
    return teacher, student


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def run_steps(checkpointed: bool, method: str, schedule: str = "lean") -> tuple[torch.nn.Module, torch.nn.Module]:
    teacher, student = pair(checkpointed)
    torch.manual_seed(7)  # the dropout stream: the same in both runs
    if method == "kd":
        optim = OptimConfig(lr=1e-2, warmup_ratio=0.0, max_grad_norm=None)
        t, s = TorchModel(teacher, None), TorchModel(student, optim, 100)
        for i in range(2):
            kd_step(t, s, [text_batch(6, seed=i)], DistillConfig(temperature=2.0), regression=False)
    else:
        step = make_step(teacher, student, schedule=schedule)
        for i in range(2):
            step.step([text_batch(6, seed=i)], [text_batch(5, seed=10 + i)])
    return teacher, student


@pytest.mark.parametrize("method,schedule", [("kd", "lean"), ("metadistil", "lean"), ("metadistil", "fast")])
def test_steps_with_checkpointing_equal_steps_without(method, schedule):
    plain_teacher, plain_student = run_steps(False, method, schedule)
    ckpt_teacher, ckpt_student = run_steps(True, method, schedule)
    assert max_difference(plain_student, ckpt_student) <= 1e-6
    assert max_difference(plain_teacher, ckpt_teacher) <= 1e-6
    if method == "metadistil":  # the comparison is not vacuous: the teacher did move
        assert max_difference(plain_teacher, tiny_bert(2, DROPOUT, seed=0)) > 1e-4


def test_a_functional_pass_at_other_weights_goes_wrong_under_checkpointing():
    """Why the quiz gradient at the pilot weights runs without checkpointing: its backward reruns the layers
    with the module's own weights (functional_call has put them back by then), and the gradient is wrong."""
    _, student = pair(checkpointed=False)
    student.eval()
    quiz = text_batch(5, seed=3)
    pilot = {k: (p + 0.3 * torch.randn_like(p)).detach().requires_grad_() for k, p in student.named_parameters()}

    def quiz_grad(model: torch.nn.Module) -> list[torch.Tensor]:
        loss = F.cross_entropy(functional_call(model, pilot, kwargs=quiz["student"]).logits, quiz["labels"])
        return torch.autograd.grad(loss, list(pilot.values()), allow_unused=True)

    right = quiz_grad(student)
    checkpointed = copy.deepcopy(student)
    enable_activation_checkpointing(checkpointed, "student")
    checkpointed.train()  # HF checkpoints only in train mode; dropout 0 here keeps the forward the same
    for m in checkpointed.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    wrong = quiz_grad(checkpointed)
    errors = [float((a - b).abs().max()) for a, b in zip(right, wrong) if a is not None and b is not None]
    assert max(errors) > 1e-3


def test_checkpointing_is_refused_for_a_cnn():
    with pytest.raises(ConfigError, match=r"model\.student_activation_checkpointing"):
        load_config(None, ["data.task=fashion_mnist", "model.teacher=cv:resnet8", "model.student=cv:resnet8",
                           "model.student_layers=null", "model.student_activation_checkpointing=true"])
