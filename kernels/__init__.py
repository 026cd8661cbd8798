"""Fused distillation kernels: the KD loss and the MetaDistil teacher cotangent.

Triton on CUDA, a row-chunked torch path everywhere else, and plain-torch references that define
the maths (and serve the create_graph path).
"""

from .fused_kd_loss import KDLoss, KDLossFunction, kd_loss
from .fused_meta_cotangent import meta_cotangent
from .reference import kd_loss_reference, meta_cotangent_reference

__all__ = [
    "KDLoss",
    "KDLossFunction",
    "kd_loss",
    "kd_loss_reference",
    "meta_cotangent",
    "meta_cotangent_reference",
]
