"""Losses of the three roles (teacher fine-tuning, the student's KD loss, the quiz meta-loss) and the teacher's
meta cotangent. Classification goes through the fused kernels (Triton on CUDA, a chunked torch path on CPU);
the create_graph reference path uses the plain-torch loss, which is differentiable in both logits.

All losses here are *sums* over rows: the caller divides by the number of rows in the whole (global,
accumulated) batch, so micro-batching and data parallelism give the same result as one large batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metadistil_scale.config import DistillConfig
from metadistil_scale.kernels import kd_loss, kd_loss_reference, meta_cotangent


def hard_loss_sum(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype), reduction="sum")
    return F.cross_entropy(logits, labels, reduction="sum")


def student_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: DistillConfig,
    regression: bool,
    *,
    through_teacher: bool = False,
) -> torch.Tensor:
    """α·hard + (1−α)·soft, summed over rows. `through_teacher` keeps the teacher logits differentiable
    (the unrolled reference needs ∂/∂z_t of the student's gradient)."""
    if regression:
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
    teacher_logits: torch.Tensor,
    tangent: torch.Tensor,
    student_logits: torch.Tensor | None,
    cfg: DistillConfig,
    pilot_lr: float,
    n_rows: int,
    regression: bool,
) -> torch.Tensor:
    """w such that ∇θt L_meta = J_tᵀ w, given u = J_s·v (DESIGN §2; the mse form is derived in meta.py)."""
    if regression:
        # soft = (s − t)²  ⇒  ⟨∇_s, u⟩ = 2(1−α)/N (s − t)·u  ⇒  −λ ∂/∂t = 2λ(1−α)/N · u
        return (2 * pilot_lr * (1 - cfg.alpha) / n_rows) * tangent
    if cfg.soft_loss == "kl":
        scale = pilot_lr * (1 - cfg.alpha) / n_rows
    else:
        scale = 2 * pilot_lr * (1 - cfg.alpha) / (n_rows * cfg.temperature**2)
    return meta_cotangent(
        teacher_logits.detach(),
        tangent.detach(),
        temperature=cfg.temperature,
        scale=scale,
        soft_loss=cfg.soft_loss,
        student_logits=None if student_logits is None else student_logits.detach(),
    )
