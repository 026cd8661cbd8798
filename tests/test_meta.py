"""The MetaDistil step against an independent, hand-written unrolled (create_graph) reference, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers import BertConfig, BertForSequenceClassification

from metadistil_scale.backends.torch_backend import TorchModel, logits_of
from metadistil_scale.config import DistillConfig, MetaConfig, OptimConfig
from metadistil_scale.meta import MetaDistil
from metadistil_scale.replay import ForwardRandomness
from metadistil_scale.steps import kd_step

NUM_LABELS = 3


# ---------------------------------------------------------------- tiny models and batches


def tiny_bert(layers: int, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, num_labels=NUM_LABELS, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, attn_implementation="eager",
    )
    return BertForSequenceClassification(config).double()


class TinyCNN(nn.Module):
    """A conv net with BatchNorm: exercises buffers on the functional meta path."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, NUM_LABELS),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.body(pixel_values)


def text_batch(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (n, 7), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):  # padding of varying length, so the masks matter
        cut = 3 + (i % 4)
        mask[i, cut:] = 0
        ids[i, cut:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    return {"teacher": inputs, "student": inputs, "labels": torch.randint(0, NUM_LABELS, (n,), generator=g)}


def image_batch(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = {"pixel_values": torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)}
    return {"teacher": x, "student": x, "labels": torch.randint(0, NUM_LABELS, (n,), generator=g)}


def make_pair(kind: str, dropout: float = 0.0) -> tuple[nn.Module, nn.Module, callable]:
    # The teacher gives its logits in eval mode (no dropout, fixed BatchNorm statistics), as in training.
    if kind == "bert":
        return tiny_bert(2, dropout, seed=0).eval(), tiny_bert(1, dropout, seed=1), text_batch
    return TinyCNN(6, seed=0).double().eval(), TinyCNN(4, seed=1).double(), image_batch


def make_step(teacher, student, *, soft="kl", alpha=0.5, u_mode="jvp", schedule="lean", teacher_optim=None,
              student_optim=None, beta=0.0) -> MetaDistil:
    teacher_optim = teacher_optim or OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0,
                                                 warmup_ratio=0.0, max_grad_norm=None)
    student_optim = student_optim or OptimConfig(lr=1e-2, warmup_ratio=0.0, max_grad_norm=None)
    meta = MetaConfig(pilot_lr=0.5, u_mode=u_mode, schedule=schedule, fd_epsilon=1e-5, teacher_ce_weight=beta)
    distill = DistillConfig(alpha=alpha, temperature=2.0, soft_loss=soft)
    return MetaDistil(TorchModel(teacher, teacher_optim, 100), TorchModel(student, student_optim, 100),
                      distill, meta)


# ---------------------------------------------------------------- the independent reference


def reference_teacher_grad(teacher, student, batch, quiz, *, soft, alpha, temperature, pilot_lr, beta=0.0):
    """∇θt CE(f_s(xq; θs − λ∇θs L_S(θs; θt)), yq) by create_graph, written with torch's own losses only."""
    params = dict(student.named_parameters())
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    z_t = logits_of(teacher(**batch["teacher"]))
    z_s = logits_of(functional_call(student, (params, buffers), kwargs=batch["student"]))
    n = len(batch["labels"])
    log_q, log_p = F.log_softmax(z_s / temperature, -1), F.log_softmax(z_t / temperature, -1)
    if soft == "kl":
        soft_sum = temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    else:
        soft_sum = F.mse_loss(log_q.exp(), log_p.exp(), reduction="sum")
    loss = (alpha * F.cross_entropy(z_s, batch["labels"], reduction="sum") + (1 - alpha) * soft_sum) / n
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    pilot = {k: p - pilot_lr * g for (k, p), g in zip(params.items(), grads)}
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    z_q = logits_of(functional_call(student, (pilot, buffers), kwargs=quiz["student"]))
    meta_loss = F.cross_entropy(z_q, quiz["labels"])
    if beta:
        meta_loss = meta_loss + beta * F.cross_entropy(z_t, batch["labels"])
    return torch.autograd.grad(meta_loss, list(teacher.parameters()), allow_unused=True)


def rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    got_flat = torch.cat([g.reshape(-1) for g in got])
    want_flat = torch.cat([w.reshape(-1) for w in want])
    return float((got_flat - want_flat).norm() / want_flat.norm())


def teacher_grads(teacher: nn.Module, like: list) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in teacher.parameters()]


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["bert", "cnn"])
@pytest.mark.parametrize("soft", ["kl", "mse"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("u_mode,tol", [("jvp", 1e-8), ("finite-difference", 1e-5), ("unrolled", 1e-10)])
def test_teacher_meta_gradient_equals_unrolled(kind, soft, alpha, u_mode, tol):
    teacher, student, batch_fn = make_pair(kind)
    batch, quiz = batch_fn(6, seed=1), batch_fn(5, seed=2)
    want = reference_teacher_grad(teacher, student, batch, quiz, soft=soft, alpha=alpha, temperature=2.0,
                                  pilot_lr=0.5)
    step = make_step(teacher, student, soft=soft, alpha=alpha, u_mode=u_mode)
    step.accumulate_teacher_grad([batch], [quiz])
    got = teacher_grads(teacher, want)
    want = [w if w is not None else torch.zeros_like(g) for w, g in zip(want, got)]
    assert float(torch.cat([w.reshape(-1) for w in want]).norm()) > 0
    assert rel_error(got, want) <= tol
    # The meta passes leave the student untouched: no gradients, no moved BatchNorm statistics.
    assert all(p.grad is None for p in student.parameters())


@pytest.mark.parametrize("u_mode,tol", [("jvp", 1e-8), ("finite-difference", 1e-5)])
def test_meta_gradient_with_dropout_equals_unrolled(u_mode, tol):
    """With dropout on, u must be the JVP of the very function the pilot differentiated: the tangent
    forwards get the pilot's masks. The reference draws its masks from the same seed in the same order."""
    teacher, student, batch_fn = make_pair("bert", dropout=0.3)
    batch, quiz = batch_fn(6, seed=1), batch_fn(5, seed=2)
    torch.manual_seed(11)
    want = reference_teacher_grad(teacher, student, batch, quiz, soft="kl", alpha=0.5, temperature=2.0,
                                  pilot_lr=0.5)
    torch.manual_seed(11)
    make_step(teacher, student, u_mode=u_mode).accumulate_teacher_grad([batch], [quiz])
    got = teacher_grads(teacher, want)
    want = [w if w is not None else torch.zeros_like(g) for w, g in zip(want, got)]
    assert rel_error(got, want) <= tol
    # Without the masks (fresh dropout in the tangent forwards) the gradient is far off: the check can fail.
    teacher.zero_grad()
    torch.manual_seed(99)
    fresh = ForwardRandomness()
    fresh.mask_replay = False  # replays another seed's RNG: other masks
    torch.manual_seed(11)
    step = make_step(teacher, student, u_mode=u_mode)
    step._tangent = lambda theta, v, inputs, drawn: MetaDistil._tangent(step, theta, v, inputs, fresh)
    step.accumulate_teacher_grad([batch], [quiz])
    assert rel_error(teacher_grads(teacher, want), want) > 1e-3


def test_teacher_ce_weight_adds_the_teachers_own_loss():
    teacher, student, batch_fn = make_pair("bert")
    batch, quiz = batch_fn(6, seed=1), batch_fn(5, seed=2)
    want = reference_teacher_grad(teacher, student, batch, quiz, soft="kl", alpha=0.5, temperature=2.0,
                                  pilot_lr=0.5, beta=0.7)
    make_step(teacher, student, beta=0.7).accumulate_teacher_grad([batch], [quiz])
    assert rel_error(teacher_grads(teacher, want), want) <= 1e-8


def handwritten_unrolled_step(teacher, student, batch, quiz, *, teacher_lr, student_optim_cfg, alpha, temperature,
                              pilot_lr):
    """A whole MetaDistil step by hand: SGD teacher update from the unrolled gradient, then AdamW student."""
    grads = reference_teacher_grad(teacher, student, batch, quiz, soft="kl", alpha=alpha,
                                   temperature=temperature, pilot_lr=pilot_lr)
    with torch.no_grad():
        for p, g in zip(teacher.parameters(), grads):
            if g is not None:
                p -= teacher_lr * g
        z_t = logits_of(teacher(**batch["teacher"]))
    z_s = logits_of(student(**batch["student"]))
    log_q, log_p = F.log_softmax(z_s / temperature, -1), F.log_softmax(z_t / temperature, -1)
    loss = alpha * F.cross_entropy(z_s, batch["labels"]) + (1 - alpha) * temperature**2 * F.kl_div(
        log_q, log_p, log_target=True, reduction="batchmean")
    opt = torch.optim.AdamW(student.parameters(), lr=student_optim_cfg.lr, weight_decay=student_optim_cfg.weight_decay)
    loss.backward()
    opt.step()


@pytest.mark.parametrize("kind", ["bert", "cnn"])
@pytest.mark.parametrize("u_mode,schedule", [("jvp", "lean"), ("jvp", "fast"), ("finite-difference", "lean"),
                                             ("unrolled", "lean")])
def test_whole_step_equals_handwritten_unrolled_step(kind, u_mode, schedule):
    teacher, student, batch_fn = make_pair(kind)
    ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)
    batch, quiz = batch_fn(6, seed=1), batch_fn(5, seed=2)
    step = make_step(teacher, student, u_mode=u_mode, schedule=schedule)
    metrics = step.step([batch], [quiz])
    handwritten_unrolled_step(ref_teacher, ref_student, batch, quiz, teacher_lr=0.1,
                              student_optim_cfg=OptimConfig(lr=1e-2),
                              alpha=0.5, temperature=2.0, pilot_lr=0.5)
    tol = 1e-6 if u_mode == "finite-difference" else 1e-9
    for a, b in zip(teacher.parameters(), ref_teacher.parameters()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for a, b in zip(student.parameters(), ref_student.parameters()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for a, b in zip(student.buffers(), ref_student.buffers()):  # BatchNorm moved exactly once
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert metrics["quiz_loss_before"] > 0 and metrics["quiz_loss_after"] > 0


def test_diagnostics_do_not_change_training():
    """The quiz-after diagnostic (computed on logged steps only) reads the step; it must not alter it."""
    runs = []
    for diagnostics in (True, False):
        teacher, student, batch_fn = make_pair("bert", dropout=0.2)
        torch.manual_seed(3)
        metrics = make_step(teacher, student).step([batch_fn(6, seed=1)], [batch_fn(5, seed=2)],
                                                   diagnostics=diagnostics)
        assert ("quiz_loss_after" in metrics) == diagnostics
        runs.append([p.detach().clone() for p in [*teacher.parameters(), *student.parameters()]])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fast_and_lean_agree_with_dropout():
    """Dropout masks are replayed: the pilot, the JVP and the real step see the same masks."""
    runs = {}
    for schedule in ("fast", "lean"):
        teacher, student, batch_fn = make_pair("bert", dropout=0.2)
        torch.manual_seed(7)
        step = make_step(teacher, student, schedule=schedule)
        for i in range(2):
            step.step([batch_fn(6, seed=10 + i)], [batch_fn(5, seed=20 + i)])
        runs[schedule] = [p.detach().clone() for p in [*teacher.parameters(), *student.parameters()]]
    for a, b in zip(runs["fast"], runs["lean"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("u_mode", ["jvp", "unrolled"])
def test_micro_batches_equal_one_batch(u_mode):
    runs = []
    for micro in (None, 3):
        teacher, student, batch_fn = make_pair("bert")
        batch, quiz = batch_fn(6, seed=1), batch_fn(6, seed=2)
        parts = [batch] if micro is None else [_slice(batch, i, i + micro) for i in range(0, 6, micro)]
        quiz_parts = [quiz] if micro is None else [_slice(quiz, i, i + micro) for i in range(0, 6, micro)]
        make_step(teacher, student, u_mode=u_mode).step(parts, quiz_parts)
        runs.append([p.detach().clone() for p in [*teacher.parameters(), *student.parameters()]])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def _slice(batch: dict, start: int, stop: int) -> dict:
    def cut(d):
        return {k: v[start:stop] for k, v in d.items()}

    return {"teacher": cut(batch["teacher"]), "student": cut(batch["student"]), "labels": batch["labels"][start:stop]}


def test_metadistil_moves_the_teacher_and_differs_from_kd():
    teacher, student, batch_fn = make_pair("bert")
    kd_teacher, kd_student = copy.deepcopy(teacher), copy.deepcopy(student)
    start = [p.detach().clone() for p in teacher.parameters()]
    step = make_step(teacher, student)
    kd_t = TorchModel(kd_teacher, None)
    kd_s = TorchModel(kd_student, OptimConfig(lr=1e-2, warmup_ratio=0.0, max_grad_norm=None), 100)
    for i in range(3):
        batch, quiz = batch_fn(6, seed=30 + i), batch_fn(5, seed=40 + i)
        metrics = step.step([batch], [quiz])
        kd_step(kd_t, kd_s, [batch], step.distill, regression=False)
    assert metrics["teacher_grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(start, teacher.parameters()))
    gap = max(float((a - b).detach().abs().max()) for a, b in zip(student.parameters(), kd_student.parameters()))
    assert gap > 1e-8
    for key in ("time_pilot", "time_quiz", "time_tangent", "time_teacher_backward", "pilot_loss"):
        assert key in metrics


def test_no_pilot_ablation_takes_the_meta_gradient_from_the_other_batch():
    teacher, student, batch_fn = make_pair("bert")
    ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)
    batch, other, quiz = batch_fn(6, seed=1), batch_fn(6, seed=3), batch_fn(5, seed=2)
    want = reference_teacher_grad(ref_teacher, ref_student, other, quiz, soft="kl", alpha=0.5, temperature=2.0,
                                  pilot_lr=0.5)
    start = [p.detach().clone() for p in teacher.parameters()]
    make_step(teacher, student).step([batch], [quiz], pilot_parts=[other])
    moved = [(s - p.detach()) / 0.1 for s, p in zip(start, teacher.parameters())]  # SGD lr 0.1
    want = [w if w is not None else torch.zeros_like(m) for w, m in zip(want, moved)]
    assert rel_error(moved, want) <= 1e-6
