"""Losses of the three roles (teacher fine-tuning, the student's KD loss, the quiz meta-loss) and the teacher's
meta cotangent. Classification goes through the fused kernels (Triton on CUDA, a chunked torch path on CPU);
the create_graph reference path uses the plain-torch loss, which is differentiable in both logits.

All losses here are *sums* over rows: the caller divides by the number of rows in the whole (global,
accumulated) batch, so micro-batching and data parallelism give the same result as one large batch.
Rows labelled -100 (padding tokens of a causal LM) carry no loss.

Causal LMs hand their logits over as HeadLogits (final hidden states and the LM head, lm/chunked.py); every
function here dispatches on that type to the row-chunked path, so the MetaDistil step is written once.

What the student's loss is comes from an objectives.Objective: today's alpha/temperature/soft_loss objective
runs on the fused kernels and closed-form cotangents (the fast path); any other mix of terms runs through the
objective's loss functions and the generic cotangent (a double backward through the loss alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from metadistil_scale.kernels import kd_loss, kd_loss_reference, meta_cotangent
from metadistil_scale.lm.chunked import (
    IGNORE_INDEX,
    HeadCotangent,
    HeadLogits,
    HeadTangent,
    head_ce_sum,
    head_central_difference,
    head_contract,
    head_cotangent,
    head_cotangent_by,
    head_kd_loss_sum,
    head_tangent,
    head_terms_loss_sum,
)
from metadistil_scale.objectives import (
    Cotangent,
    Objective,
    Outputs,
    contract_generic,
    detach_outputs,
    generic_cotangent,
    logits_in,
)

Logits = torch.Tensor | HeadLogits


def hard_loss_sum(logits: Logits | Outputs, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    logits = logits_in(logits)
    if isinstance(logits, HeadLogits):
        return head_ce_sum(logits, labels)
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction="sum")
    return F.cross_entropy(logits, labels, reduction="sum")


def student_loss_sum(
    student_logits: Logits | Outputs,
    teacher_logits: Logits | Outputs,
    labels: torch.Tensor,
    objective: Objective,
    mask: torch.Tensor | None = None,
    *,
    through_teacher: bool = False,
) -> torch.Tensor:
    """hard_weight·hard + the soft terms, summed over rows. `through_teacher` keeps the teacher outputs
    differentiable (the unrolled reference needs ∂/∂O_t of the student's gradient). `mask`: the attention
    mask of the inputs, for terms over tokens."""
    if objective.fast:
        return _legacy_loss_sum(student_logits, teacher_logits, labels, objective, through_teacher)
    if isinstance(student_logits, HeadLogits):
        _refuse_hidden_terms_on_lm(objective)
        if not through_teacher:
            return head_terms_loss_sum(student_logits, teacher_logits, labels,
                                       lambda z, z_t: objective.soft_sum(z, z_t, None), objective.hard_weight)
        # The create_graph reference needs a twice-differentiable loss: it materialises [N, V].
        student_logits, teacher_logits = student_logits.materialize(), teacher_logits.materialize()
        labels = labels.reshape(-1)
    if not through_teacher:
        teacher_logits = detach_outputs(teacher_logits)
    labels = labels.reshape(-1)  # a causal LM's [B, L] labels against its [B·L, V] logits
    keep = _rows_with_loss(labels)
    if keep is not None:  # a causal LM's padding and document ends (logits only: no hidden-state terms here)
        student_logits, teacher_logits, labels = student_logits[keep], teacher_logits[keep], labels[keep]
    soft = objective.soft_sum(student_logits, teacher_logits, mask)
    if objective.hard_weight == 0:
        return soft
    return soft + objective.hard_weight * hard_loss_sum(student_logits, labels, objective.hard == "mse")


def _legacy_loss_sum(student_logits: Logits, teacher_logits: Logits, labels: torch.Tensor, objective: Objective,
                     through_teacher: bool) -> torch.Tensor:
    """α·hard + (1−α)·soft on the fused kernels (the chunked path for a causal LM)."""
    cfg = objective.legacy
    if isinstance(student_logits, HeadLogits):
        if not through_teacher:
            return head_kd_loss_sum(student_logits, teacher_logits, labels, cfg)
        # The create_graph reference needs a twice-differentiable loss: it materialises [N, V].
        student_logits, teacher_logits = student_logits.materialize(), teacher_logits.materialize()
        labels = labels.reshape(-1)
    if objective.hard == "mse":
        s, t = student_logits.squeeze(-1), teacher_logits.squeeze(-1)
        if not through_teacher:
            t = t.detach()
        hard = (s - labels.to(s.dtype)).pow(2)
        return (cfg.alpha * hard + (1 - cfg.alpha) * (s - t).pow(2)).sum()
    kwargs = dict(temperature=cfg.temperature, alpha=cfg.alpha, soft_loss=cfg.soft_loss, reduction="sum")
    if through_teacher:
        return kd_loss_reference(student_logits, teacher_logits, labels, **kwargs)
    return kd_loss(student_logits, teacher_logits.detach(), labels, **kwargs)


def teacher_cotangent(
    teacher_logits: Logits | Outputs,
    tangent: torch.Tensor | Outputs,
    student_logits: Logits | Outputs | None,
    objective: Objective,
    pilot_lr: float,
    n_rows: int,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor | HeadCotangent | Cotangent:
    """w such that ∇θt L_meta = J_tᵀ w, given u = J_s·v (each form derived in docs/metagrad.md §2–3).
    Rows labelled -100 have no loss, hence w = 0 there."""
    if not objective.fast:
        return _generic_cotangent(teacher_logits, tangent, student_logits, objective, pilot_lr / n_rows, labels, mask)
    cfg = objective.legacy
    if objective.hard == "mse":
        # soft = (s − t)²  ⇒  ⟨∇_s, u⟩ = 2(1−α)/N (s − t)·u  ⇒  −λ ∂/∂t = 2λ(1−α)/N · u
        return (2 * pilot_lr * (1 - cfg.alpha) / n_rows) * tangent
    if cfg.soft_loss == "kl":
        scale = pilot_lr * (1 - cfg.alpha) / n_rows
    else:
        scale = 2 * pilot_lr * (1 - cfg.alpha) / (n_rows * cfg.temperature**2)
    if isinstance(teacher_logits, HeadLogits):
        return head_cotangent(teacher_logits, tangent, student_logits, labels, temperature=cfg.temperature,
                              scale=scale, soft_loss=cfg.soft_loss)
    w = meta_cotangent(
        teacher_logits.detach(),
        tangent.detach(),
        temperature=cfg.temperature,
        scale=scale,
        soft_loss=cfg.soft_loss,
        student_logits=None if student_logits is None else student_logits.detach(),
    )
    if labels is not None and not labels.is_floating_point():
        w = w * (labels != IGNORE_INDEX).unsqueeze(-1).to(w.dtype)
    return w


def _generic_cotangent(teacher: Logits | Outputs, tangent: torch.Tensor | HeadTangent | Outputs,
                       student: Logits | Outputs, objective: Objective, scale: float, labels: torch.Tensor | None,
                       mask: torch.Tensor | None) -> HeadCotangent | Cotangent:
    """The generic w (objectives.generic_cotangent): chunk by chunk for a causal LM's head, w = 0 on rows
    without a loss."""
    if isinstance(teacher, HeadLogits):
        _refuse_hidden_terms_on_lm(objective)

        def chunk_cotangent(z_t: torch.Tensor, u: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
            (w,) = generic_cotangent(objective, z_s, z_t, u, None, scale)
            return torch.zeros_like(z_t) if w is None else w

        return head_cotangent_by(teacher, tangent, student, labels, chunk_cotangent)
    w = generic_cotangent(objective, student, teacher, tangent, mask, scale)
    keep = _rows_with_loss(labels)
    if keep is not None:
        w = [None if x is None else x * keep.unsqueeze(-1).to(x.dtype) for x in w]
    return w


def _rows_with_loss(labels: torch.Tensor | None) -> torch.Tensor | None:
    """The rows a causal LM's labels keep (not IGNORE_INDEX); None when every row has a loss."""
    if labels is None or labels.is_floating_point():
        return None
    keep = labels.reshape(-1) != IGNORE_INDEX
    return None if bool(keep.all()) else keep


def _refuse_hidden_terms_on_lm(objective: Objective) -> None:
    if objective.reads_layers:
        raise ValueError("distill.terms: hidden-state and attention terms are for classifiers; a causal LM distils "
                         "its logits")


def tangent_from_jvp(primal: Logits | Outputs, tangent: Logits | Outputs) -> torch.Tensor | HeadTangent | Outputs:
    """u from torch.func.jvp's (primal, tangent) output: the tangent itself, or H/W factors for HeadLogits."""
    return head_tangent(primal, tangent) if isinstance(primal, HeadLogits) else tangent


def central_difference(plus: Logits | Outputs, minus: Logits | Outputs, eps: float
                       ) -> torch.Tensor | HeadTangent | Outputs:
    """u ≈ (f(θ+εv) − f(θ−εv)) / 2ε, for every output."""
    if isinstance(plus, HeadLogits):
        return head_central_difference(plus, minus, eps)
    return tree_map(lambda a, b: (a - b) / (2 * eps), plus, minus)


def contract(teacher_logits: Logits | Outputs, cotangent: torch.Tensor | HeadCotangent | Cotangent
             ) -> torch.Tensor:
    """The surrogate ⟨O_t, w⟩ whose backward through the teacher gives J_tᵀ w."""
    if isinstance(teacher_logits, HeadLogits):
        return head_contract(teacher_logits, cotangent)
    if isinstance(cotangent, list):
        return contract_generic(teacher_logits, cotangent)
    return (teacher_logits * cotangent).sum()
