"""Argument validation, backend selection and chunk sizing shared by the kernels."""

from __future__ import annotations

import os

import torch

SOFT_LOSSES = ("kl", "mse")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "METADISTIL_KERNEL_BACKEND"

# Elements of one [rows, V] fp32 temporary in the chunked torch path: small enough to stay in cache
# on a CPU and to keep temporaries negligible next to the logits, big enough to amortise launches.
TORCH_CHUNK_ELEMENTS = 1 << 20


def check_soft_loss(soft_loss: str) -> None:
    if soft_loss not in SOFT_LOSSES:
        raise ValueError(f"unknown soft_loss {soft_loss!r}; expected one of {SOFT_LOSSES}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_logits(name: str, x: torch.Tensor) -> None:
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have a class dimension last, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_labels(labels: torch.Tensor | None, logits: torch.Tensor) -> None:
    if labels is None:
        return
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:-1])} (the logits {tuple(logits.shape)} "
            f"without the class dimension), got {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Backend "auto" means Triton on CUDA and torch elsewhere; METADISTIL_KERNEL_BACKEND overrides it."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        forced = os.environ.get(BACKEND_ENV, "").strip().lower()
        if forced:
            if forced not in ("triton", "torch"):
                raise ValueError(f"{BACKEND_ENV} must be 'triton' or 'torch', got {forced!r}")
            backend = forced
        else:
            backend = "triton" if tensor.is_cuda else "torch"
    if backend == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            "the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
            "(interpreter mode, for tests); use backend='torch' on CPU"
        )
    return backend


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32, or fp64 when the inputs already are."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_per_chunk(n_rows: int, n_cols: int, chunk_elements: int | None = None) -> int:
    budget = TORCH_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    return max(1, min(n_rows, budget // max(n_cols, 1)))
