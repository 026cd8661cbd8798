"""Teacher-logit cotangent of the MetaDistil meta-gradient (docs/metagrad.md §2), fused per row.

    kl:  w = scale * p*(u - <p,u>)                      p = softmax(z_t/T), u = J_s v
    mse: r = q*(u - <q,u>),  w = scale * p*(r - <p,r>)   q = softmax(z_s/T)

The teacher then runs one ordinary backward with cotangent w. w is a constant (computed without
autograd). Rows excluded from the loss (ignore_index) must have u zeroed by the caller: u = 0
gives w = 0 for that row; no labels reach this kernel, so there is nothing to range-check.

Both backends accumulate in fp32, or fp64 for fp64 inputs (the Triton kernel takes the compute dtype
as a constexpr), and handle rows of any finite magnitude, e.g. filled with finfo.min.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, map_row_chunks, resolve_backend, rows_per_chunk
from .fused_kd_loss import _rowdot, _scaled, _shift_of, launch_config, scalar_args
from .reference import _check_meta_args

# Largest class block one program holds in registers (fp32; half for fp64): see fused_kd_loss.
MAX_FUSED_SIZE = 4096

_KINDS = {"kl": 0, "mse": 1}


@triton.jit
def _meta_cotangent_kernel(
    zt_ptr,
    zt_stride,
    u_ptr,
    u_stride,
    zs_ptr,
    zs_stride,
    w_ptr,
    w_stride,
    args_ptr,
    n_cols,
    KIND: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zt_ptr += row * zt_stride
    u_ptr += row * u_stride
    zs_ptr += row * zs_stride
    w_ptr += row * w_stride
    inv_temperature = tl.load(args_ptr)
    scale = tl.load(args_ptr + 1)

    # Pass 1: online softmax normalisers with the running sums sum_v e_v * u_v (e = unnormalised
    # probability), rescaled whenever the running max moves. Maxima start at -inf, exponentials are
    # taken against _shift_of(max): see _kd_loss_kernel.
    m_t = tl.full([], float("-inf"), CT)
    d_t = tl.zeros([], CT)
    pu = tl.zeros([], CT)
    m_q = tl.full([], float("-inf"), CT)
    d_q = tl.zeros([], CT)
    qu = tl.zeros([], CT)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_cols
        a = tl.load(zt_ptr + offs, mask=mask, other=float("-inf")).to(CT) * inv_temperature
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(CT)
        new_m_t = tl.maximum(m_t, tl.max(a, 0))
        c_t = _shift_of(new_m_t)
        rescale_t = tl.exp(m_t - c_t)
        e_t = tl.exp(a - c_t)
        d_t = d_t * rescale_t + tl.sum(e_t, 0)
        pu = pu * rescale_t + tl.sum(e_t * u, 0)
        m_t = new_m_t
        if KIND == 1:
            b = tl.load(zs_ptr + offs, mask=mask, other=float("-inf")).to(CT) * inv_temperature
            new_m_q = tl.maximum(m_q, tl.max(b, 0))
            c_q = _shift_of(new_m_q)
            rescale_q = tl.exp(m_q - c_q)
            e_q = tl.exp(b - c_q)
            d_q = d_q * rescale_q + tl.sum(e_q, 0)
            qu = qu * rescale_q + tl.sum(e_q * u, 0)
            m_q = new_m_q
    c_t = _shift_of(m_t)
    c_q = _shift_of(m_q)
    log_d_t = tl.log(d_t)
    log_d_q = tl.log(d_q)
    pu = pu / d_t
    qu = qu / d_q

    # mse: <p, r> with r = q*(u - <q,u>) in its own pass, so a common offset in u cancels exactly
    # instead of leaving the difference of two large sums.
    pr = tl.zeros([], CT)
    if KIND == 1:
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n_cols
            a = tl.load(zt_ptr + offs, mask=mask, other=float("-inf")).to(CT) * inv_temperature
            b = tl.load(zs_ptr + offs, mask=mask, other=float("-inf")).to(CT) * inv_temperature
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(CT)
            pr += tl.sum(tl.exp((a - c_t) - log_d_t) * tl.exp((b - c_q) - log_d_q) * (u - qu), 0)

    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_cols
        a = tl.load(zt_ptr + offs, mask=mask, other=float("-inf")).to(CT) * inv_temperature
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(CT)
        p = tl.exp((a - c_t) - log_d_t)
        if KIND == 0:
            w = scale * p * (u - pu)
        else:
            b = tl.load(zs_ptr + offs, mask=mask, other=float("-inf")).to(CT) * inv_temperature
            r = tl.exp((b - c_q) - log_d_q) * (u - qu)
            w = scale * p * (r - pr)
        tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=mask)


def meta_cotangent_triton(
    teacher_logits: torch.Tensor,
    tangent: torch.Tensor,
    temperature: float,
    scale: float,
    soft_loss: str,
    student_logits: torch.Tensor | None,
) -> torch.Tensor:
    """Inputs [N, V]; w in the teacher logits' dtype."""
    zt = teacher_logits.contiguous()
    u = tangent.contiguous()
    zs = student_logits.contiguous() if student_logits is not None else zt
    n_rows, n_cols = zt.shape
    w = torch.empty_like(zt)
    block, num_warps, ct = launch_config(n_cols, zt.dtype, MAX_FUSED_SIZE)
    if n_rows > 0:
        _meta_cotangent_kernel[(n_rows,)](
            zt,
            zt.stride(0),
            u,
            u.stride(0),
            zs,
            zs.stride(0),
            w,
            w.stride(0),
            scalar_args(zt.device, zt.dtype, 1.0 / temperature, scale),
            n_cols,
            KIND=_KINDS[soft_loss],
            CT=ct,
            BLOCK=block,
            num_warps=num_warps,
        )
    return w


def meta_cotangent_torch(
    teacher_logits: torch.Tensor,
    tangent: torch.Tensor,
    temperature: float,
    scale: float,
    soft_loss: str,
    student_logits: torch.Tensor | None,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """Row-chunked torch version: fp32 (fp64) temporaries exist for one chunk per worker at a time."""
    n_rows, n_cols = teacher_logits.shape
    ct = compute_dtype(teacher_logits.dtype)
    inv_t = 1.0 / temperature
    w = torch.empty_like(teacher_logits, memory_format=torch.contiguous_format)

    def chunk(rows: slice, _work: None) -> None:
        p = torch.softmax(_scaled(teacher_logits[rows], ct, inv_t), dim=-1)
        u = tangent[rows].to(ct)
        if soft_loss == "kl":
            w_c = (u - _rowdot(p, u).unsqueeze(1)).mul_(p)
        else:
            q = torch.softmax(_scaled(student_logits[rows], ct, inv_t), dim=-1)
            r = (u - _rowdot(q, u).unsqueeze(1)).mul_(q)
            del q
            w_c = r.sub_(_rowdot(p, r).unsqueeze(1)).mul_(p)
        w[rows] = w_c.mul_(scale)

    map_row_chunks(chunk, n_rows, rows_per_chunk(n_rows, n_cols, chunk_elements), teacher_logits.device)
    return w


@torch.no_grad()
def meta_cotangent(
    teacher_logits: torch.Tensor,
    tangent: torch.Tensor,
    *,
    temperature: float,
    scale: float,
    soft_loss: str = "kl",
    student_logits: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """w for logits [..., V] (same shape as teacher_logits), in the teacher logits' dtype.

    Accumulates in fp32 (fp64 for fp64 inputs). ``scale`` is lambda*(1-alpha)/N for "kl" and
    2*lambda*(1-alpha)/(N*T^2) for "mse"; "mse" also needs ``student_logits``. Not differentiable.
    """
    _check_meta_args(teacher_logits, tangent, temperature, soft_loss, student_logits)
    impl = resolve_backend(backend, teacher_logits)
    shape = teacher_logits.shape
    n_cols = shape[-1]
    zs = student_logits.reshape(-1, n_cols) if student_logits is not None else None
    fn = meta_cotangent_triton if impl == "triton" else meta_cotangent_torch
    w = fn(
        teacher_logits.reshape(-1, n_cols),
        tangent.reshape(-1, n_cols),
        float(temperature),
        float(scale),
        soft_loss,
        zs if soft_loss == "mse" else None,
    )
    return w.reshape(shape)
