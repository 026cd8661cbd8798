"""Plain-torch references: the definitions the fused paths are tested against.

``kd_loss_reference`` is differentiable (twice) w.r.t. both student and teacher logits, so it also
serves the create_graph (unrolled MetaDistil) path and the naive eager baseline in benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    check_alpha,
    check_labels,
    check_logits,
    check_reduction,
    check_same_shape,
    check_soft_loss,
    check_temperature,
    compute_dtype,
)


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    soft_loss: str = "kl",
    reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """alpha*CE(z_s, y) + (1-alpha)*soft per row, with soft = T^2*KL(p||q) ("kl") or sum_v (q-p)^2 ("mse").

    p = softmax(z_t/T), q = softmax(z_s/T). Rows labelled ``ignore_index`` contribute 0; "mean"
    divides by the number of valid rows (0 when there is none). A term whose weight is 0 (the soft term at
    alpha = 1, the CE at alpha = 0) is left out, not multiplied by 0: it may be infinite where a class is
    masked (-inf) in one model only. Labels outside [0, V) that are not ``ignore_index`` raise ValueError.
    Computed in the inputs' dtype.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    check_labels(labels, student_logits, ignore_index)
    check_soft_loss(soft_loss)
    check_reduction(reduction)
    check_temperature(temperature)
    check_alpha(alpha)

    lead = student_logits.shape[:-1]
    n_cols = student_logits.shape[-1]
    zs = student_logits.reshape(-1, n_cols)
    zt = teacher_logits.reshape(-1, n_cols)
    # 0 per row, yet connected to z_s (a zero gradient rather than none) whatever z_s holds.
    first = zs[:, 0]
    per_row = first.where(torch.zeros_like(first, dtype=torch.bool), 0.0)
    if alpha < 1.0:
        per_row = per_row + (1.0 - alpha) * _soft_per_row(zs, zt, temperature, soft_loss)

    if labels is None:
        n_valid = per_row.new_tensor(float(per_row.shape[0]))
    else:
        y = labels.reshape(-1).long()
        valid = y != ignore_index
        if alpha > 0.0:
            per_row = per_row + alpha * F.cross_entropy(zs, y, ignore_index=ignore_index, reduction="none")
        per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
        n_valid = valid.sum().to(per_row.dtype)

    if reduction == "none":
        return per_row.reshape(lead)
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / n_valid.clamp(min=1.0)


def _soft_per_row(zs: torch.Tensor, zt: torch.Tensor, temperature: float, soft_loss: str) -> torch.Tensor:
    log_q = F.log_softmax(zs / temperature, dim=-1)
    log_p = F.log_softmax(zt / temperature, dim=-1)
    if soft_loss == "mse":
        return F.mse_loss(log_q.exp(), log_p.exp(), reduction="none").sum(dim=-1)
    # Masked (-inf) classes have p = 0 and contribute 0; substitute 0 before kl_div so that neither the
    # value nor any derivative sees -inf - -inf.
    keep = log_p > float("-inf")
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    kl = F.kl_div(torch.where(keep, log_q, zero), torch.where(keep, log_p, zero), reduction="none", log_target=True)
    return temperature**2 * kl.sum(dim=-1)


def meta_cotangent_reference(
    teacher_logits: torch.Tensor,
    tangent: torch.Tensor,
    *,
    temperature: float,
    scale: float,
    soft_loss: str = "kl",
    student_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher-logit cotangent w of the MetaDistil meta-gradient (docs/metagrad.md §2), per row.

    kl:  w = scale * p*(u - <p,u>)
    mse: r = q*(u - <q,u>),  w = scale * p*(r - <p,r>)
    Computed in fp32 (fp64 for fp64 inputs); returned in the teacher logits' dtype.
    """
    _check_meta_args(teacher_logits, tangent, temperature, soft_loss, student_logits)
    ct = compute_dtype(teacher_logits.dtype)
    u = tangent.to(ct)
    p = torch.softmax(teacher_logits.to(ct) / temperature, dim=-1)
    if soft_loss == "kl":
        w = p * (u - (p * u).sum(dim=-1, keepdim=True))
    else:
        q = torch.softmax(student_logits.to(ct) / temperature, dim=-1)
        r = q * (u - (q * u).sum(dim=-1, keepdim=True))
        w = p * (r - (p * r).sum(dim=-1, keepdim=True))
    return (scale * w).to(teacher_logits.dtype)


def _check_meta_args(
    teacher_logits: torch.Tensor,
    tangent: torch.Tensor,
    temperature: float,
    soft_loss: str,
    student_logits: torch.Tensor | None,
) -> None:
    check_logits("teacher_logits", teacher_logits)
    check_same_shape("teacher_logits", teacher_logits, "tangent", tangent)
    check_soft_loss(soft_loss)
    check_temperature(temperature)
    if soft_loss == "mse":
        if student_logits is None:
            raise ValueError("soft_loss='mse' needs student_logits for the meta cotangent")
        check_same_shape("teacher_logits", teacher_logits, "student_logits", student_logits)
