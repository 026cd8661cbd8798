"""Token-level distillation at vocabulary scale: logits as final hidden states times the LM head, in row chunks.

A causal LM's logits are z = H Wᵀ (H [N, d] the final hidden states of N tokens, W [V, d] the head). With a
vocabulary V of 49k–256k the [N, V] tensors of the meta path (z_s, z_t, the tangent u, the cotangent w) are
the memory problem. Here none of them exists for the whole batch; each is made and consumed a chunk of rows
at a time:

  loss (KD, CE)  z_c = H_c Wᵀ; loss and g_c = ∂loss/∂z_c by the fused kernel, pushed back at once:
                 ∂/∂H_c = g_c W,  ∂/∂W += g_cᵀ H_c                      (Liger-Kernel's fused-linear pattern)
  tangent u      u = J·v of z = H Wᵀ is dH Wᵀ + H dWᵀ (dH: the body's tangent, dW: v's entry for the head);
                 finite differences give (H₊W₊ᵀ − H₋W₋ᵀ)/2ε. u is kept as these factors, rows made on demand.
  cotangent w    w_c = meta_cotangent(z_t,c, u_c) by the fused kernel, pushed back to the teacher at once:
                 J_tᵀ w = body-VJP(w W_t) + head gradient wᵀ H_t, so only [N, d] and [V, d] sums are kept.

Rows labelled IGNORE_INDEX (padding, document ends) carry no loss and are skipped everywhere.
The functions here are reached through metadistil_scale.losses, which dispatches on HeadLogits, so the
MetaDistil step in meta.py runs unchanged on causal LMs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.autograd.function import once_differentiable

from metadistil_scale.config import DistillConfig
from metadistil_scale.kernels import kd_loss, meta_cotangent

IGNORE_INDEX = -100

# Elements of one [rows, V] logits chunk when no row count is given: 4M (16 MB in fp32), so the chunk's
# temporaries stay small next to the model whatever V is.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class HeadLogits:
    """Logits hidden @ weight.T of N rows, never materialised whole. hidden [N, d], weight [V, d]."""

    hidden: torch.Tensor
    weight: torch.Tensor
    chunk_rows: int | None = None

    def detach(self) -> HeadLogits:
        return HeadLogits(self.hidden.detach(), self.weight.detach(), self.chunk_rows)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.hidden[index] @ self.weight.T

    def materialize(self) -> torch.Tensor:
        """All [N, V] logits (the create_graph reference and the baselines need them)."""
        return self.hidden @ self.weight.T

    def chunks(self, labels: torch.Tensor) -> list[torch.Tensor]:
        """Index tensors of the rows that carry a loss, split into chunks of at most chunk_rows."""
        valid = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
        return list(valid.split(self.chunk_size))

    @property
    def chunk_size(self) -> int:
        return self.chunk_rows or max(1, CHUNK_ELEMENTS // self.weight.shape[0])


# A pytree node, so that torch.func.jvp returns the tangents of hidden and weight as a HeadLogits too;
# the chunk size travels as the node's context.
pytree.register_pytree_node(
    HeadLogits,
    lambda z: ([z.hidden, z.weight], z.chunk_rows),
    lambda children, chunk_rows: HeadLogits(*children, chunk_rows=chunk_rows),
    serialized_type_name="metadistil_scale.lm.chunked.HeadLogits",
)


@dataclass(frozen=True)
class HeadTangent:
    """u = Σ_k c_k · H_k W_kᵀ, kept as its factors; rows are made on demand."""

    terms: tuple[tuple[float, torch.Tensor, torch.Tensor], ...]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        out = None
        for coef, hidden, weight in self.terms:
            part = hidden[index] @ weight.T
            out = part.mul_(coef) if out is None else out.add_(part, alpha=coef)
        return out


@dataclass(frozen=True)
class HeadCotangent:
    """J_tᵀ w split at the head: the cotangent of the final hidden states (w W_t) and the head's gradient (wᵀ H_t)."""

    hidden: torch.Tensor
    weight: torch.Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- losses


# (student logits of a chunk, the teacher's rows of it or None, the chunk's labels) -> the chunk's loss sum
ChunkLoss = Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor]
TeacherRows = Callable[[torch.Tensor], Any]  # row index -> the teacher's output for those rows (a constant)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Σ over chunks of chunk_loss(H_c Wᵀ, teacher_rows(c), y_c). The gradients w.r.t. H and W are computed in
    the forward, chunk by chunk, and only scaled in the backward; the teacher's rows are constants."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        teacher_rows: TeacherRows | None,
        labels: torch.Tensor,
        chunks: list[torch.Tensor],
        chunk_loss: ChunkLoss,
        want_grad: bool,
    ) -> torch.Tensor:
        ct = _compute_dtype(hidden.dtype)
        total = torch.zeros((), dtype=ct, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if want_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=ct, device=weight.device) if want_grad else None
        for index in chunks:
            h = hidden[index]
            z = h @ weight.T
            z_t = teacher_rows(index) if teacher_rows is not None else None
            if not want_grad:
                total += chunk_loss(z, z_t, labels[index])
                continue
            z.requires_grad_(True)
            with torch.enable_grad():
                loss = chunk_loss(z, z_t, labels[index])
            (g,) = torch.autograd.grad(loss, z)
            total += loss.detach()
            grad_hidden[index] = g @ weight
            grad_weight.addmm_(g.T.to(ct), h.to(ct))
            del z, z_t, g, loss
        ctx.want_grad = want_grad
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        nones = (None,) * 5
        if not ctx.want_grad:
            return (None, None, *nones)
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight * grad_output.to(grad_weight.dtype),
                *nones)


def _apply_chunked(student: HeadLogits, teacher: HeadLogits | TopKTeacher | None, labels: torch.Tensor,
                   chunk_loss: ChunkLoss) -> torch.Tensor:
    y = labels.reshape(-1)
    if y.shape[0] != student.hidden.shape[0]:
        raise ValueError(f"labels give {y.shape[0]} rows, the hidden states {student.hidden.shape[0]}")
    want_grad = torch.is_grad_enabled() and (student.hidden.requires_grad or student.weight.requires_grad)
    teacher_rows = teacher.detach().rows if teacher is not None else None
    return _ChunkedHeadLoss.apply(student.hidden, student.weight, teacher_rows, y, student.chunks(y),
                                  chunk_loss, want_grad)


def head_kd_loss_sum(student: HeadLogits, teacher: HeadLogits | TopKTeacher, labels: torch.Tensor,
                     cfg: DistillConfig) -> torch.Tensor:
    """Σ over tokens of α·CE(z_s, y) + (1−α)·soft(z_s, z_t; T), by the fused KD kernel on each chunk (against
    a cached top-k teacher: `head_top_k_kd_loss_sum`)."""
    if isinstance(teacher, TopKTeacher):
        return head_top_k_kd_loss_sum(student, teacher, labels, cfg)
    if student.weight.shape[0] != teacher.weight.shape[0]:
        raise ValueError(f"student vocabulary {student.weight.shape[0]} != teacher {teacher.weight.shape[0]}")

    def chunk_loss(z: torch.Tensor, z_t: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        return kd_loss(z, z_t, y, temperature=cfg.temperature, alpha=cfg.alpha, soft_loss=cfg.soft_loss,
                       reduction="sum")

    return _apply_chunked(student, teacher, labels, chunk_loss)


def head_terms_loss_sum(student: HeadLogits, teacher: HeadLogits, labels: torch.Tensor,
                        soft_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], hard_weight: float
                        ) -> torch.Tensor:
    """Σ over tokens of hard_weight·CE(z_s, y) + soft_sum(z_s, z_t) for any soft terms (reverse KL, JSD, ...)
    given as a function of a chunk's logits, differentiated by autograd chunk by chunk."""
    if student.weight.shape[0] != teacher.weight.shape[0]:
        raise ValueError(f"student vocabulary {student.weight.shape[0]} != teacher {teacher.weight.shape[0]}")

    def chunk_loss(z: torch.Tensor, z_t: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        ct = _compute_dtype(z.dtype)
        z, z_t = z.to(ct), z_t.to(ct)
        loss = soft_sum(z, z_t)
        return loss + hard_weight * F.cross_entropy(z, y, reduction="sum") if hard_weight > 0 else loss

    return _apply_chunked(student, teacher, labels, chunk_loss)


def head_ce_sum(logits: HeadLogits, labels: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of CE(z, y): the quiz meta-loss and training without distillation."""

    def chunk_loss(z: torch.Tensor, _: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z.to(_compute_dtype(z.dtype)), y, reduction="sum")

    return _apply_chunked(logits, None, labels, chunk_loss)


@torch.no_grad()
def head_eval_stats(logits: HeadLogits, labels: torch.Tensor) -> tuple[float, int, int]:
    """(Σ CE, correct next-token predictions, tokens) over the rows that carry a label."""
    y = labels.reshape(-1)
    ce, correct, count = 0.0, 0, 0
    for index in logits.chunks(y):
        z = logits.rows(index)
        ce += float(F.cross_entropy(z.to(_compute_dtype(z.dtype)), y[index], reduction="sum"))
        correct += int((z.argmax(-1) == y[index]).sum())
        count += len(index)
    return ce, correct, count


# ---------------------------------------------------------------- the meta path


def head_tangent(primal: HeadLogits, tangent: HeadLogits) -> HeadTangent:
    """u from torch.func.jvp's output for z = H Wᵀ (product rule)."""
    return HeadTangent(((1.0, tangent.hidden, primal.weight), (1.0, primal.hidden, tangent.weight)))


def head_central_difference(plus: HeadLogits, minus: HeadLogits, eps: float) -> HeadTangent:
    return HeadTangent(((0.5 / eps, plus.hidden, plus.weight), (-0.5 / eps, minus.hidden, minus.weight)))


ChunkCotangent = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def head_cotangent(
    teacher: HeadLogits,
    tangent: HeadTangent,
    student: HeadLogits | None,
    labels: torch.Tensor,
    *,
    temperature: float,
    scale: float,
    soft_loss: str,
) -> HeadCotangent:
    """w = scale·p ⊙ (u − ⟨p, u⟩) (or the mse form) chunk by chunk, pushed back through the teacher's head."""

    def chunk_cotangent(z_t: torch.Tensor, u: torch.Tensor, z_s: torch.Tensor | None) -> torch.Tensor:
        return meta_cotangent(z_t, u, temperature=temperature, scale=scale, soft_loss=soft_loss, student_logits=z_s)

    return head_cotangent_by(teacher, tangent, student if soft_loss == "mse" else None, labels, chunk_cotangent)


@torch.no_grad()
def head_cotangent_by(teacher: HeadLogits, tangent: HeadTangent, student: HeadLogits | None, labels: torch.Tensor,
                      chunk_cotangent: ChunkCotangent) -> HeadCotangent:
    """w = chunk_cotangent(z_t, u, z_s) on each chunk of rows (z_s only when `student` is given), pushed back
    through the teacher's head: no [N, V] array exists whole."""
    hidden, weight = teacher.hidden.detach(), teacher.weight.detach()
    ct = _compute_dtype(hidden.dtype)
    grad_hidden = torch.zeros_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=ct, device=weight.device)
    for index in teacher.chunks(labels):
        h = hidden[index]
        z_s = student.detach().rows(index) if student is not None else None
        w = chunk_cotangent(h @ weight.T, tangent.rows(index), z_s)
        grad_hidden[index] = w @ weight
        grad_weight.addmm_(w.T.to(ct), h.to(ct))
        del w
    return HeadCotangent(grad_hidden, grad_weight.to(weight.dtype))


def head_contract(teacher: HeadLogits, cotangent: HeadCotangent) -> torch.Tensor:
    """A scalar whose gradient w.r.t. θt is J_tᵀ w: ⟨H_t, w W_t⟩ + ⟨W_t, wᵀ H_t⟩ with the cotangents constant."""
    return (teacher.hidden * cotangent.hidden).sum() + (teacher.weight * cotangent.weight).sum()


# ---------------------------------------------------------------- a cached top-k teacher


@dataclass(frozen=True)
class TopKTeacher:
    """The frozen teacher's tempered distribution p = softmax(z_t/T) of N token rows, kept sparse: per row the
    k largest log-probabilities with their token ids, and the log of the mass of the other V − k tokens as one
    bucket (−inf when k = V). What teacher_cache.py stores for a causal LM: 8k + 4 bytes a token in float32."""

    indices: torch.Tensor  # [N, k] token ids
    logprobs: torch.Tensor  # [N, k] log p of those tokens, largest first
    rest: torch.Tensor  # [N] log of the remaining mass
    temperature: float

    def detach(self) -> TopKTeacher:
        return self

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.indices[index], self.logprobs[index], self.rest[index]


@torch.no_grad()
def head_top_k(logits: HeadLogits, k: int, temperature: float) -> TopKTeacher:
    """The top-k form of softmax(z/T) for every row of `logits`, made a chunk of rows at a time."""
    k = min(k, logits.weight.shape[0])
    indices, logprobs, rest = [], [], []
    for index in torch.arange(logits.hidden.shape[0], device=logits.hidden.device).split(logits.chunk_size):
        z = logits.rows(index)
        log_p = torch.log_softmax(z.to(_compute_dtype(z.dtype)) / temperature, -1)
        top = log_p.topk(k, dim=-1)
        indices.append(top.indices)
        logprobs.append(top.values)
        rest.append(log_p.scatter(-1, top.indices, float("-inf")).logsumexp(-1))
    return TopKTeacher(torch.cat(indices), torch.cat(logprobs), torch.cat(rest), temperature)


def top_k_kl_sum(scaled_student: torch.Tensor, indices: torch.Tensor, teacher_logprobs: torch.Tensor,
                 teacher_rest: torch.Tensor) -> torch.Tensor:
    """Σ over rows of KL(p̃ ‖ q̃) on k + 1 outcomes: the teacher's top k tokens and one bucket for the rest, with
    q = softmax(scaled_student) coarsened the same way (q̃_rest = Σ_{j∉top k} q_j)."""
    log_q = torch.log_softmax(scaled_student, -1)
    kl = (teacher_logprobs.exp() * (teacher_logprobs - log_q.gather(-1, indices))).sum()
    if indices.shape[-1] < log_q.shape[-1]:  # at k = V the bucket is empty (and its logsumexp −inf)
        log_q_rest = log_q.scatter(-1, indices, float("-inf")).logsumexp(-1)
        rest = teacher_rest.clamp_min(torch.finfo(teacher_rest.dtype).min)  # an empty bucket adds 0, not nan
        kl = kl + (rest.exp() * (rest - log_q_rest)).sum()
    return kl


def head_top_k_kd_loss_sum(student: HeadLogits, teacher: TopKTeacher, labels: torch.Tensor, cfg: DistillConfig
                           ) -> torch.Tensor:
    """Σ over tokens of α·CE(z_s, y) + (1−α)·T²·KL(p̃ ‖ q̃) against a cached top-k teacher (`top_k_kl_sum`).

    Why the bucket rather than DistillKit's sparse Σ_{i∈top k} p_i (log p_i − log q_i): the bucket form is a KL
    between two distributions (≥ 0, exact at k = V), never above the full KL and rising to it as k grows (the
    data-processing inequality); its gradient w.r.t. z_s is T·(q − p̂), p̂ = p on the top k and the rest's mass
    shared over the other tokens in proportion to q, so the tail's total mass is kept and only its split is
    approximated. The sparse form's gradient T·(q·Σ_{top k} p − p) drives the tail's mass to zero (it fits the
    renormalised top k)."""
    if cfg.soft_loss != "kl":
        raise ValueError(f"distill.soft_loss={cfg.soft_loss!r}: a top-k teacher cache distils by KL only")
    if cfg.temperature != teacher.temperature:
        raise ValueError(f"distill.temperature={cfg.temperature} but the cached teacher was tempered at "
                         f"{teacher.temperature}")

    def chunk_loss(z: torch.Tensor, top: tuple[torch.Tensor, ...], y: torch.Tensor) -> torch.Tensor:
        z = z.to(_compute_dtype(z.dtype))
        soft = cfg.temperature**2 * top_k_kl_sum(z / cfg.temperature, *top)
        if cfg.alpha == 0:
            return soft
        hard = F.cross_entropy(z, y, reduction="sum")
        return hard if cfg.alpha == 1 else cfg.alpha * hard + (1 - cfg.alpha) * soft

    return _apply_chunked(student, teacher, labels, chunk_loss)
