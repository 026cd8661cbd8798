"""The MetaDistil step (Zhou, Xu & McAuley, ACL 2022), with the teacher's meta-gradient computed without a
second-order graph.

One step on a train batch x (docs/metagrad.md §1):
  1. pilot:   θs' = θs − λ·∇θs L_S(θs; θt, x)                         (plain SGD, as the official code)
  2. teacher: θt ← Opt(θt, ∇θt CE(f_s(xq; θs'(θt)), yq))              (quiz batch xq held out of train)
  3. student: θs ← Opt(θs, ∇θs L_S(θs; θt_new, x))                    (same x, updated teacher)

The meta-gradient of step 2, exactly (docs/metagrad.md §2): with v = ∇θs' CE(f_s(xq; θs'), yq),
u = J_s(θs; x)·v and p = softmax(z_t/T),
    kl:  w = λ(1−α)/N · p ⊙ (u − ⟨p, u⟩)
    mse: w = 2λ(1−α)/(N·T²) · p ⊙ (r − ⟨p, r⟩),  r = q ⊙ (u − ⟨q, u⟩),  q = softmax(z_s/T)
    ∇θt L_meta = J_t(θt; x)ᵀ · w                                       (one teacher backward)
docs/metagrad.md derives each form (§2), says why no second-order graph is needed (§5) and counts the
passes of each schedule (§7). Any other distillation objective (objectives.py: hidden-state terms, reverse KL,
JSD, ...) gets w for every teacher output it reads by a double backward through its loss function alone, with u
for every student output from the same one JVP (§3).

u comes from one of three interchangeable u-modes: `jvp` (forward-mode AD), `finite-difference` (two no-grad
forwards) or `unrolled` (the create_graph reference, which yields the teacher gradient directly).
Two schedules: `fast` keeps the teacher's and the student's forward graphs from the first phases and reuses
them; `lean` frees each graph when its phase ends, so peak memory is the largest single phase.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.func import functional_call, jvp

from metadistil_scale.backends.base import BackendModel
from metadistil_scale.backends.torch_backend import logits_of
from metadistil_scale.config import DistillConfig, MetaConfig
from metadistil_scale.losses import (
    central_difference,
    contract,
    hard_loss_sum,
    student_loss_sum,
    tangent_from_jvp,
    teacher_cotangent,
)
from metadistil_scale.models.checkpointing import checkpointing_off, is_checkpointing
from metadistil_scale.objectives import Objective, attention_mask, detach_outputs
from metadistil_scale.replay import ForwardRandomness
from metadistil_scale.steps import Batch, count_rows, kd_step

Params = dict[str, torch.Tensor]


@dataclass
class _PilotForwards:
    """What the pilot's student forwards leave for the later phases of a step."""

    drawn: list[ForwardRandomness]  # each micro-batch's randomness (dropout masks), replayed by u and the real step
    kept: list  # fast schedule: the forward graphs, reused by the real step
    student_logits: list  # detached outputs, for the cotangent
    loss: float  # this rank's pilot loss


def teacher_update_steps(meta: MetaConfig, steps: int) -> range:
    """The (0-based) steps of a `steps`-step run at which the teacher is meta-updated: every `interval` steps
    after `frozen_steps`. Its lr schedule spans these updates, not the run's steps."""
    return range(meta.frozen_steps, steps, meta.interval)


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[f"time_{name}"] = self.seconds.get(f"time_{name}", 0.0) + time.perf_counter() - start


class MetaDistil:
    """The MetaDistil step over a teacher and a student, each a backend model (forward/backward/step/reduce)."""

    def __init__(
        self,
        teacher: BackendModel,
        student: BackendModel,
        distill: DistillConfig,
        meta: MetaConfig,
        regression: bool = False,
    ) -> None:
        self.teacher, self.student = teacher, student
        self.distill, self.meta, self.regression = distill, meta, regression
        self.objective = Objective.from_config(distill, regression)
        self._checkpointed = is_checkpointing(student.functional_module)

    # ------------------------------------------------------------------ functional student

    def _student_at(self, params: Params, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The student's logits (or the objective's outputs) at `params`, with copied buffers so that the
        pilot, quiz and JVP passes leave BatchNorm running statistics alone."""
        module = self.student.functional_module
        buffers = {n: b.clone() for n, b in module.named_buffers()}
        # Activation checkpointing reruns layers from the module's own weights: right only when `params` are them.
        own = all(params.get(name, p) is p for name, p in module.named_parameters())
        with contextlib.nullcontext() if own else checkpointing_off(module):
            return logits_of(functional_call(module, (params, buffers), args=(), kwargs=inputs))

    def _tangent(
        self, theta: Params, v: Params, inputs: dict[str, torch.Tensor], randomness: ForwardRandomness
    ) -> torch.Tensor:
        """u = J_s(θs; x)·v, by forward-mode AD or central finite differences (for a causal LM, as factors
        from which the chunked path makes u's rows), with the pilot forward's dropout masks."""
        if self.meta.u_mode == "jvp":
            with randomness.replay():
                primal, tangent = jvp(lambda p: self._student_at(p, inputs), (theta,), (v,))
            return tangent_from_jvp(primal, tangent)
        norm = sum(float(torch.linalg.vector_norm(t)) ** 2 for t in v.values()) ** 0.5  # no copy of v
        eps = self.meta.fd_epsilon / max(float(norm), 1e-30)
        with torch.no_grad():
            with randomness.replay():
                plus = self._student_at({k: theta[k] + eps * v[k] for k in theta}, inputs)
            with randomness.replay():
                minus = self._student_at({k: theta[k] - eps * v[k] for k in theta}, inputs)
        return central_difference(plus, minus, eps)

    def _quiz_loss_and_grad(self, params: Params, quiz: list[Batch], want_grad: bool) -> tuple[float, Params]:
        """CE on the quiz batch at `params`, and its gradient (v) when asked; both summed over ranks."""
        n_quiz = count_rows(quiz, self.student)
        leaves = {k: t.detach().requires_grad_(want_grad) for k, t in params.items()}
        grad = {k: torch.zeros_like(t) for k, t in leaves.items()} if want_grad else {}
        total = 0.0
        for part in quiz:
            with torch.set_grad_enabled(want_grad), self._quiz_mode():
                loss = hard_loss_sum(self._student_at(leaves, part["student"]), part["labels"], self.regression)
                loss = loss / n_quiz
            if want_grad:  # parameters the quiz does not reach (a distillation projection) get a zero gradient
                for k, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)):
                    if g is not None:
                        grad[k] += g
            total += loss.item()
        if want_grad:
            self.student.all_reduce_sum_(list(grad.values()))
        return self.student.all_reduce_sum(total), grad

    @contextlib.contextmanager
    def _quiz_mode(self) -> Iterator[None]:
        """The student's quiz forwards in train mode, or in eval mode (no dropout, BatchNorm's running
        statistics) when `meta.quiz_train_mode` is off, as the official GLUE code."""
        module = self.student.functional_module
        was_training = module.training
        if not self.meta.quiz_train_mode:
            module.eval()
        try:
            yield
        finally:
            module.train(was_training)

    # ------------------------------------------------------------------ the step

    def step(
        self,
        parts: list[Batch],
        quiz: list[Batch],
        *,
        update_teacher: bool = True,
        pilot_parts: list[Batch] | None = None,
        diagnostics: bool = True,
    ) -> dict[str, float]:
        """One MetaDistil step on the train batch `parts` (micro-batches). `pilot_parts`, when given, is a
        different batch for the pilot and the meta-gradient (the paper's no-pilot ablation). `diagnostics`
        adds the quiz loss after the teacher update (one more student forward on the quiz batch); the trainer
        asks for it on the steps it logs."""
        if not update_teacher:
            return kd_step(self.teacher, self.student, parts, self.distill, self.regression)
        timer = PhaseTimer()
        same_batch = pilot_parts is None
        meta_parts = parts if same_batch else pilot_parts
        metrics, kept, drawn = self.accumulate_teacher_grad(meta_parts, quiz, timer, keep=same_batch)
        with timer("teacher_step"):
            metrics["teacher_grad_norm"] = self.teacher.step()
        with timer("student_step"):
            metrics.update(self._real_student_step(parts, kept, drawn if same_batch else None))
        if diagnostics:
            with timer("quiz_after"):
                metrics["quiz_loss_after"] = self._quiz_loss_after(quiz)
        with timer("optimizer_step"):
            metrics["grad_norm"] = self.student.step()
        metrics.update(timer.seconds)
        return metrics

    def accumulate_teacher_grad(
        self, parts: list[Batch], quiz: list[Batch], timer: PhaseTimer | None = None, keep: bool = False
    ) -> tuple[dict[str, float], list[torch.Tensor] | None, list[ForwardRandomness]]:
        """Accumulate ∇θt L_meta into the teacher's gradients. Returns metrics, the student's kept forward
        graphs (fast schedule, when `keep`) and the randomness (dropout masks) of its forwards on `parts`."""
        timer = timer or PhaseTimer()
        if self.meta.u_mode == "unrolled":
            return self._teacher_grad_unrolled(parts, quiz, timer)
        return self._teacher_grad_decomposed(parts, quiz, timer, keep)

    def _teacher_grad_decomposed(
        self, parts: list[Batch], quiz: list[Batch], timer: PhaseTimer, keep: bool
    ) -> tuple[dict[str, float], list[torch.Tensor] | None, list[ForwardRandomness]]:
        """One JVP (or finite difference) and one VJP: no second-order graph."""
        fast = self.meta.schedule == "fast"
        n = count_rows(parts, self.student)
        params = self.student.trainable()
        theta = {k: p.detach() for k, p in params.items()}

        with timer("teacher_forward"):  # fast: keep the graph for the teacher backward at the end
            with torch.set_grad_enabled(fast):
                teacher_logits = [self.teacher(self.objective.inputs(p["teacher"])) for p in parts]

        with timer("pilot"):
            pilot, forwards = self._pilot_step(parts, teacher_logits, params, theta, n, reuse=fast and keep)

        with timer("quiz"):
            quiz_loss, v = self._quiz_loss_and_grad(pilot, quiz, want_grad=True)
            del pilot

        with timer("tangent"):
            cotangents = self._cotangents(parts, teacher_logits, forwards, theta, v, n, timer)
            del v

        with timer("teacher_backward"):
            self._teacher_meta_backward(parts, teacher_logits, cotangents, n, fast)
        metrics = {"pilot_loss": self.student.all_reduce_sum(forwards.loss), "quiz_loss_before": quiz_loss}
        return metrics, (forwards.kept if fast and keep else None), forwards.drawn

    def _pilot_step(
        self, parts: list[Batch], teacher_logits: list, params: Params, theta: Params, n: int, reuse: bool
    ) -> tuple[Params, _PilotForwards]:
        """θs' = θs − λ·g with g the student's gradient on `parts` (summed over ranks), and what the later phases
        reuse of its forwards. `reuse`: these forwards are also the real step's (fast schedule)."""
        outputs_of = self.objective.inputs  # the inputs that make each model return what the objective reads
        g = {k: torch.zeros_like(t) for k, t in theta.items()}
        forwards = _PilotForwards([], [], [], 0.0)
        for part, z_t in zip(parts, teacher_logits):
            forwards.drawn.append(ForwardRandomness(mask_replay=not self._checkpointed))
            # fast: this forward is also the real step's forward (it moves BatchNorm statistics once);
            # lean: the real step forwards again, so here the buffers are protected.
            with forwards.drawn[-1].record():
                z_s = (self.student(outputs_of(part["student"])) if reuse
                       else self._student_at(params, outputs_of(part["student"])))
            loss = student_loss_sum(z_s, z_t, part["labels"], self.objective, attention_mask(part["student"])) / n
            grads = torch.autograd.grad(loss, list(params.values()), retain_graph=reuse)
            for k, gk in zip(g, grads):
                g[k] += gk
            forwards.loss += loss.item()
            forwards.student_logits.append(detach_outputs(z_s))
            if reuse:
                forwards.kept.append(z_s)
        self.student.all_reduce_sum_(list(g.values()))
        # g is not needed past the pilot (it goes when this returns): lean's peak phases come later.
        return {k: theta[k] - self.meta.pilot_lr * g[k] for k in theta}, forwards

    def _cotangents(
        self, parts: list[Batch], teacher_logits: list, forwards: _PilotForwards, theta: Params, v: Params, n: int,
        timer: PhaseTimer
    ) -> list:
        """w for each micro-batch, from u = J_s(θs; x)·v (the pilot's dropout masks replayed)."""
        cotangents = []
        for part, z_t, z_s, randomness in zip(parts, teacher_logits, forwards.student_logits, forwards.drawn):
            u = self._tangent(theta, v, self.objective.inputs(part["student"]), randomness)
            with timer("cotangent"):  # w alone, a part of the tangent phase's time
                cotangents.append(
                    teacher_cotangent(z_t, u, z_s, self.objective, self.meta.pilot_lr, n, part["labels"],
                                      attention_mask(part["student"]))
                )
        return cotangents

    def _teacher_meta_backward(
        self, parts: list[Batch], teacher_logits: list, cotangents: list, n: int, fast: bool
    ) -> None:
        """One teacher backward per micro-batch with w (plus β·its own CE): ∇θt of the meta-loss. `lean` forwards
        the teacher again; `fast` reuses the first phase's graph."""
        beta = self.meta.teacher_ce_weight
        for i, (part, w) in enumerate(zip(parts, cotangents)):
            z_t = teacher_logits[i] if fast else self.teacher(self.objective.inputs(part["teacher"]))
            surrogate = contract(z_t, w)
            if beta > 0:
                surrogate = surrogate + beta * hard_loss_sum(z_t, part["labels"], self.regression) / n
            self.teacher.backward(surrogate)
            teacher_logits[i] = None  # free the graph as soon as it is used

    def _teacher_grad_unrolled(
        self, parts: list[Batch], quiz: list[Batch], timer: PhaseTimer
    ) -> tuple[dict[str, float], None, list[ForwardRandomness]]:
        """The reference: differentiate the quiz loss through the pilot step with create_graph."""
        n = count_rows(parts, self.student)
        n_quiz = count_rows(quiz, self.student)
        params = self.student.trainable()
        teacher_params = list(self.teacher.trainable().values())
        with timer("pilot"):
            drawn, losses = [], []
            for part in parts:
                z_t = self.teacher(self.objective.inputs(part["teacher"]))
                drawn.append(ForwardRandomness(mask_replay=not self._checkpointed))
                with drawn[-1].record():
                    z_s = self._student_at(params, self.objective.inputs(part["student"]))
                losses.append(student_loss_sum(z_s, z_t, part["labels"], self.objective,
                                               attention_mask(part["student"]), through_teacher=True) / n)
            pilot_loss = sum(losses)
            g = torch.autograd.grad(pilot_loss, list(params.values()), create_graph=True)
            pilot = {k: p - self.meta.pilot_lr * gk for (k, p), gk in zip(params.items(), g)}
        with timer("quiz"), self._quiz_mode():
            meta_loss = sum(
                hard_loss_sum(self._student_at(pilot, q["student"]), q["labels"], self.regression) / n_quiz
                for q in quiz
            )
            beta = self.meta.teacher_ce_weight
            if beta > 0:
                meta_loss = meta_loss + beta * sum(
                    hard_loss_sum(self.teacher(p["teacher"]), p["labels"], self.regression) / n for p in parts
                )
        with timer("teacher_backward"):
            # Only the teacher's gradients: the student's come from its real step below.
            torch.autograd.backward(meta_loss, inputs=teacher_params)
        metrics = {"pilot_loss": pilot_loss.item(), "quiz_loss_before": meta_loss.item()}
        return metrics, None, drawn

    def _real_student_step(
        self, parts: list[Batch], kept: list[torch.Tensor] | None, drawn: list[ForwardRandomness] | None
    ) -> dict[str, float]:
        """The student's backward with the updated teacher: through the pilot's kept graphs (fast), or a new
        forward with the pilot's dropout masks (lean). The optimizer step comes after the diagnostics."""
        n = count_rows(parts, self.student)
        total = 0.0
        for i, part in enumerate(parts):
            with torch.no_grad():
                z_t = self.teacher(self.objective.inputs(part["teacher"]))
            if kept is not None:
                z_s = kept[i]
            else:
                with drawn[i].replay() if drawn is not None else contextlib.nullcontext():
                    z_s = self.student(self.objective.inputs(part["student"]))
            loss = student_loss_sum(z_s, z_t, part["labels"], self.objective, attention_mask(part["student"])) / n
            self.student.backward(loss)
            total += loss.item()
        return {"loss": self.student.all_reduce_sum(total)}

    def _quiz_loss_after(self, quiz: list[Batch]) -> float:
        """The quiz loss at θs − λ·∇θs L_S(θs; θt_new): where the pilot would have landed with the updated
        teacher. Reads the gradient the real step has just accumulated."""
        params = self.student.trainable()
        with torch.no_grad():
            pilot = {k: p.detach() - self.meta.pilot_lr * self.student.full_grad(k, p) for k, p in params.items()}
        return self._quiz_loss_and_grad(pilot, quiz, want_grad=False)[0]
