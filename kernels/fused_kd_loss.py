"""Fused knowledge-distillation loss: alpha*CE(z_s, y) + (1-alpha)*soft(z_s, z_t; T).

Two implementations behind one functional entry point:

* Triton (CUDA, or CPU under TRITON_INTERPRET=1): one program per row streams the class axis in
  blocks with an online softmax for teacher, tempered student and untempered student; a second pass
  writes d loss / d z_s into an [N, V] buffer of the compute dtype; no other [N, V] temporary exists.
* torch (everywhere): the same maths over row chunks, so fp32 temporaries exist only per chunk; on
  CPU the chunks run concurrently on single-threaded workers (see ``_common.map_row_chunks``).

Both compute the gradient during forward and store it; backward only scales it by grad_output
(the Liger-Kernel pattern). The stored gradient is in the compute dtype (fp32, fp64 for fp64 logits):
bf16/fp16 logits pay 2x the memory of a gradient in their own dtype, so that grad_output is applied in
fp32 and the result rounded once (a bf16 grad_output of 1/3 is 0.33398, a 0.2% bias on every entry).
The teacher logits are treated as constants: no gradient reaches them (the create_graph / meta path
uses ``kd_loss_reference`` or ``meta_cotangent`` instead).

Both accumulate in fp32, or fp64 for fp64 logits. A term whose weight is 0 (the soft term at alpha = 1,
the CE at alpha = 0) is not computed at all: it may be infinite where a class is masked (-inf) in one
model only, and 0 * inf would be NaN.

Labels: ``kd_loss`` raises ValueError for a label outside [0, V) that is not ``ignore_index``, on every
backend, before any kernel runs (one host sync on CUDA). The Triton kernel never reads outside the row
even when called unchecked: it masks the label's load and gives that row a NaN loss and gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn
from torch.autograd.function import once_differentiable

from ._common import (
    check_alpha,
    check_labels,
    check_logits,
    check_reduction,
    check_same_shape,
    check_soft_loss,
    check_temperature,
    compute_dtype,
    map_row_chunks,
    resolve_backend,
    rows_per_chunk,
)

# Largest class block one program holds in registers (fp32 compute; half that for fp64, whose elements take
# two registers); wider vocabularies loop over blocks with the online softmax. Registers per thread from
# ptxas for sm_90a (Triton 3.9, bf16 logits, kl with CE and gradient): BLOCK 16384 at 16 warps 128,
# 8192 at 16 warps 106, 4096 at 16 warps 54 (mse 64), no spills. Above ~64 a 512-thread program leaves
# room for one program per SM, too few warps in flight to hide the memory latency of a streaming kernel.
MAX_FUSED_SIZE = 4096

_KIND_KL = 0
_KIND_MSE = 1
_KINDS = {"kl": _KIND_KL, "mse": _KIND_MSE}


def get_num_warps(block_size: int) -> int:
    """8 fp32 elements per thread for each live block tensor (what the register figures above assume)."""
    return min(16, max(4, block_size // 256))


def launch_config(n_cols: int, dtype: torch.dtype, max_block: int) -> tuple[int, int, tl.dtype]:
    """(BLOCK, num_warps, Triton compute dtype) for rows of ``n_cols`` logits of ``dtype``."""
    fp64 = compute_dtype(dtype) == torch.float64
    width = 2 if fp64 else 1  # registers per element
    block = min(max(1, max_block // width), triton.next_power_of_2(n_cols))
    return block, get_num_warps(block * width), tl.float64 if fp64 else tl.float32


def scalar_args(device: torch.device, dtype: torch.dtype, *values: float) -> torch.Tensor:
    """Float arguments as a tensor in the compute dtype: Triton passes Python floats as fp32, which
    would round 1/T and alpha for fp64 logits. The copy is asynchronous (no host sync)."""
    return torch.tensor(values, dtype=compute_dtype(dtype)).to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------


@triton.jit
def _shift_of(m):
    """What exponentials are taken against: the running max, or 0 while it is still -inf (only masked
    classes so far), where x - max would be -inf + inf = NaN. Every exp is then exp(-inf) = 0."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _kd_loss_kernel(
    zs_ptr,
    zs_stride,
    zt_ptr,
    zt_stride,
    labels_ptr,
    loss_ptr,
    grad_ptr,
    grad_stride,
    grad_scale_ptr,
    args_ptr,
    n_cols,
    ignore_index,
    KIND: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    HAS_SOFT: tl.constexpr,
    HAS_CE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    CT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_ptr += row * zs_stride
    zt_ptr += row * zt_stride
    grad_ptr += row * grad_stride
    inv_temperature = tl.load(args_ptr)
    temperature = tl.load(args_ptr + 1)
    alpha = tl.load(args_ptr + 2)

    y = 0
    y_ok = True
    if HAS_LABELS:
        y = tl.load(labels_ptr + row).to(tl.int64)
        if y == ignore_index:
            # Write both outputs: the buffers are allocated uninitialised.
            tl.store(loss_ptr + row, 0.0)
            if COMPUTE_GRAD:
                for start in range(0, n_cols, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    zero = tl.zeros([BLOCK], dtype=CT)
                    tl.store(grad_ptr + offs, zero.to(grad_ptr.dtype.element_ty), mask=offs < n_cols)
            return
        y_ok = (y >= 0) & (y < n_cols)

    # Pass 1: online max / normaliser for p = softmax(a), q = softmax(b), s = softmax(z_s) with
    # a = z_t/T, b = z_s/T; for kl also acc = sum_v e_v * ((a_v - c_t) - (b_v - c_q)), e = exp(a - c_t),
    # c = _shift_of(running max), kept relative to the running maxima so that a common offset between
    # teacher and student logits cancels exactly instead of in a difference of two large sums. The
    # maxima start at -inf so that rows far below any finite floor (e.g. filled with finfo.min) work.
    m_t = tl.full([], float("-inf"), CT)
    d_t = tl.zeros([], CT)
    m_q = tl.full([], float("-inf"), CT)
    d_q = tl.zeros([], CT)
    m_s = tl.full([], float("-inf"), CT)
    d_s = tl.zeros([], CT)
    acc = tl.zeros([], CT)
    for start in range(0, n_cols, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n_cols
        zs = tl.load(zs_ptr + offs, mask=mask, other=float("-inf")).to(CT)
        if HAS_SOFT:
            zt = tl.load(zt_ptr + offs, mask=mask, other=float("-inf")).to(CT)
            a = zt * inv_temperature
            b = zs * inv_temperature
            new_m_t = tl.maximum(m_t, tl.max(a, 0))
            new_m_q = tl.maximum(m_q, tl.max(b, 0))
            c_t = _shift_of(new_m_t)
            c_q = _shift_of(new_m_q)
            # exp(old max - new shift): 0 while the old max is -inf, whatever the new one is.
            rescale_t = tl.exp(m_t - c_t)
            e_t = tl.exp(a - c_t)
            if KIND == 0:
                # Moving the shifts moves every earlier bracket by -shift; p = 0 (masked or padded
                # class) contributes 0, also where the bracket is -inf - -inf.
                shift = (c_t - _shift_of(m_t)) - (c_q - _shift_of(m_q))
                bracket = (a - c_t) - (b - c_q)
                acc = (acc - shift * d_t) * rescale_t + tl.sum(tl.where(e_t > 0.0, e_t * bracket, 0.0), 0)
            d_t = d_t * rescale_t + tl.sum(e_t, 0)
            d_q = d_q * tl.exp(m_q - c_q) + tl.sum(tl.exp(b - c_q), 0)
            m_t = new_m_t
            m_q = new_m_q

        if HAS_CE:
            new_m_s = tl.maximum(m_s, tl.max(zs, 0))
            c_s = _shift_of(new_m_s)
            d_s = d_s * tl.exp(m_s - c_s) + tl.sum(tl.exp(zs - c_s), 0)
            m_s = new_m_s

    # log p = (a - c_t) - log d_t: subtracting the max first keeps the leading classes exact even
    # when |logits| / T is large.
    c_t = _shift_of(m_t)
    c_q = _shift_of(m_q)
    c_s = _shift_of(m_s)
    log_d_t = tl.log(d_t)
    log_d_q = tl.log(d_q)
    log_d_s = tl.log(d_s)

    loss = tl.zeros([], CT)
    qd = tl.zeros([], CT)
    if HAS_SOFT:
        # Pass 2 (mse only): sum (q-p)^2 and <q, q-p> need the final normalisers.
        soft = tl.zeros([], CT)
        if KIND == 0:
            soft = temperature * temperature * (acc / d_t - log_d_t + log_d_q)
        else:
            for start in range(0, n_cols, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < n_cols
                zs = tl.load(zs_ptr + offs, mask=mask, other=float("-inf")).to(CT)
                zt = tl.load(zt_ptr + offs, mask=mask, other=float("-inf")).to(CT)
                p = tl.exp((zt * inv_temperature - c_t) - log_d_t)
                q = tl.exp((zs * inv_temperature - c_q) - log_d_q)
                diff = q - p
                soft += tl.sum(diff * diff, 0)
                qd += tl.sum(q * diff, 0)
        loss += (1.0 - alpha) * soft
    # An out-of-range label (possible only when the host check was bypassed) reads nothing and makes
    # the row's loss and gradient NaN.
    poison = tl.where(y_ok, 0.0, float("nan")).to(CT)
    if HAS_CE:
        z_y = tl.load(zs_ptr + y, mask=y_ok, other=float("nan")).to(CT)
        loss += alpha * ((c_s - z_y) + log_d_s)
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))

    # Last pass: d loss_row / d z_s, times 1/n_valid for "mean", in the compute dtype.
    if COMPUTE_GRAD:
        grad_scale = tl.load(grad_scale_ptr)
        for start in range(0, n_cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n_cols
            zs = tl.load(zs_ptr + offs, mask=mask, other=float("-inf")).to(CT)
            g = tl.zeros([BLOCK], dtype=CT)
            if HAS_SOFT:
                zt = tl.load(zt_ptr + offs, mask=mask, other=float("-inf")).to(CT)
                p = tl.exp((zt * inv_temperature - c_t) - log_d_t)
                q = tl.exp((zs * inv_temperature - c_q) - log_d_q)
                if KIND == 0:
                    g += ((1.0 - alpha) * temperature) * (q - p)
                else:
                    g += ((1.0 - alpha) * 2.0 * inv_temperature) * q * ((q - p) - qd)
            if HAS_CE:
                s = tl.exp((zs - c_s) - log_d_s)
                g += alpha * (s - tl.where(offs == y, 1.0, 0.0)) + poison
            tl.store(grad_ptr + offs, (g * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)


def _n_valid_and_grad_scale(
    labels: torch.Tensor | None,
    n_rows: int,
    reduction: str,
    ignore_index: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Device tensors (no host sync): number of valid rows, and the gradient factor per valid row."""
    if labels is None:
        n_valid = torch.tensor(float(n_rows), dtype=dtype, device=device)
    else:
        n_valid = (labels != ignore_index).sum().to(dtype)
    if reduction == "mean":
        grad_scale = 1.0 / n_valid.clamp(min=1.0)
    else:
        grad_scale = torch.ones((), dtype=dtype, device=device)
    return n_valid, grad_scale.reshape(1)


def kd_loss_forward_triton(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
    soft_loss: str,
    ignore_index: int,
    reduction: str,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row loss [N], number of valid rows, and the (scaled) gradient or None, all in the compute
    dtype. Inputs [N, V]; labels are not range-checked here (``kd_loss`` does that)."""
    zs = student_logits.contiguous()
    zt = teacher_logits.contiguous()
    n_rows, n_cols = zs.shape
    ct = compute_dtype(zs.dtype)
    block, num_warps, ct_triton = launch_config(n_cols, zs.dtype, MAX_FUSED_SIZE)
    loss_rows = torch.empty(n_rows, dtype=ct, device=zs.device)
    grad = torch.empty(zs.shape, dtype=ct, device=zs.device) if compute_grad else None
    y = labels.reshape(-1).contiguous() if labels is not None else None
    n_valid, grad_scale = _n_valid_and_grad_scale(y, n_rows, reduction, ignore_index, zs.device, ct)
    if n_rows > 0:
        _kd_loss_kernel[(n_rows,)](
            zs,
            zs.stride(0),
            zt,
            zt.stride(0),
            y if y is not None else loss_rows,
            loss_rows,
            grad if grad is not None else loss_rows,
            grad.stride(0) if grad is not None else 0,
            grad_scale,
            scalar_args(zs.device, zs.dtype, 1.0 / temperature, temperature, alpha),
            n_cols,
            int(ignore_index),
            KIND=_KINDS[soft_loss],
            HAS_LABELS=y is not None,
            HAS_SOFT=alpha < 1.0,
            HAS_CE=y is not None and alpha > 0.0,
            COMPUTE_GRAD=compute_grad,
            CT=ct_triton,
            BLOCK=block,
            num_warps=num_warps,
        )
    return loss_rows, n_valid, grad


# --------------------------------------------------------------------------------------------------
# torch (row-chunked)
# --------------------------------------------------------------------------------------------------


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_v x[r, v] * y[r, v] without materialising x * y."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1)


def _scaled(x: torch.Tensor, dtype: torch.dtype, factor: float) -> torch.Tensor:
    """x * factor in ``dtype`` with at most one allocation."""
    y = x.to(dtype)
    if factor == 1.0:
        return y  # callers never write into it
    return y.mul_(factor) if y is not x else y * factor


def _scaled_into(x: torch.Tensor, buf: torch.Tensor, factor: float) -> torch.Tensor:
    """x * factor in buf's dtype; x itself when that needs no work (callers only read it)."""
    if x.dtype == buf.dtype:
        if factor == 1.0:
            return x
        return torch.mul(x, factor, out=buf)
    buf.copy_(x)  # upcast first: multiplying in bf16 would round before the cast
    return buf.mul_(factor) if factor != 1.0 else buf


def _kd_chunk_torch(
    zs: torch.Tensor,
    zt: torch.Tensor,
    y: torch.Tensor | None,
    temperature: float,
    alpha: float,
    soft_loss: str,
    grad_out: torch.Tensor | None,
    grad_scale: float,
    work: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Per-row loss of one chunk; writes d loss_row / d z_s * grad_scale into grad_out when given.

    y holds labels with ignored rows already replaced by a valid index (their rows are zeroed by
    the caller), or is None when there is no CE term. ``work`` is three [rows, V] buffers in the
    compute dtype, reused across chunks so that the loop does not churn the allocator.
    """
    w1, w2, w3 = work
    inv_t = 1.0 / temperature
    want_grad = grad_out is not None
    # The gradient is accumulated as g / factor so that the soft and CE parts need no separate
    # scaling passes; one fused multiply writes factor * grad_scale * g into the output buffer.
    g = None
    factor = 1.0
    loss = torch.zeros(zs.shape[0], dtype=w1.dtype, device=zs.device)
    free = w1
    if alpha < 1.0:  # at alpha = 1 the soft term, possibly inf, must not become 0 * inf
        if soft_loss == "kl":
            log_q = torch.log_softmax(_scaled_into(zs, w1, inv_t), dim=-1, out=w3)
            log_p = torch.log_softmax(_scaled_into(zt, w2, inv_t), dim=-1, out=w1)
            p = torch.exp(log_p, out=w2)
            diff = log_p.sub_(log_q)
            soft = _rowdot(p, diff)
            if not bool(torch.isfinite(soft).all()):
                # -inf - -inf at masked classes (p = 0) is the only NaN source; those classes add 0.
                diff.masked_fill_(p == 0, 0.0)
                soft = _rowdot(p, diff)
            soft = soft * (temperature * temperature)
            factor = (1.0 - alpha) * temperature
            if want_grad:
                g = log_q.exp_().sub_(p)  # q - p, in w3
        else:
            q = torch.softmax(_scaled_into(zs, w1, inv_t), dim=-1, out=w3)
            d = torch.softmax(_scaled_into(zt, w2, inv_t), dim=-1, out=w1).neg_().add_(q)
            soft = _rowdot(d, d)
            factor = (1.0 - alpha) * 2.0 * inv_t
            if want_grad:
                g = d.sub_(_rowdot(q, d).unsqueeze(1)).mul_(q)  # q * ((q - p) - <q, q - p>), in w1
            free = w2
        loss = (1.0 - alpha) * soft

    if y is not None and alpha > 0.0:
        log_s = torch.log_softmax(zs, dim=-1, dtype=free.dtype, out=free)
        idx = y.unsqueeze(1)
        loss = loss - alpha * log_s.gather(1, idx).squeeze(1)
        if want_grad:
            if g is None:
                g, factor, k = log_s.exp_(), alpha, 1.0
            else:
                k = alpha / factor
                g.add_(log_s.exp_(), alpha=k)
            g.scatter_add_(1, idx, torch.full(idx.shape, -k, dtype=g.dtype, device=g.device))

    if want_grad:
        if g is None:
            grad_out.zero_()
        else:
            torch.mul(g, factor * grad_scale, out=grad_out)
    return loss


def kd_loss_forward_torch(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
    soft_loss: str,
    ignore_index: int,
    reduction: str,
    compute_grad: bool,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Same contract as ``kd_loss_forward_triton``: loss rows and gradient in the compute dtype."""
    n_rows, n_cols = student_logits.shape
    ct = compute_dtype(student_logits.dtype)
    device = student_logits.device
    loss_rows = torch.zeros(n_rows, dtype=ct, device=device)
    grad = torch.empty(student_logits.shape, dtype=ct, device=device) if compute_grad else None

    valid = None
    y_all = None
    if labels is not None:
        y_all = labels.reshape(-1).long()
        valid = y_all != ignore_index
        n_valid = valid.sum().to(ct)
        y_all = torch.where(valid, y_all, torch.zeros_like(y_all))
    else:
        n_valid = torch.tensor(float(n_rows), dtype=ct, device=device)
    grad_scale = 1.0 / max(float(n_valid), 1.0) if reduction == "mean" else 1.0

    def chunk(rows: slice, work: torch.Tensor) -> None:
        n_c = rows.stop - rows.start
        grad_c = grad[rows] if grad is not None else None
        valid_c = valid[rows] if valid is not None else None
        if valid_c is not None and not bool(valid_c.any()):
            if grad_c is not None:
                grad_c.zero_()
            return
        loss_c = _kd_chunk_torch(
            student_logits[rows],
            teacher_logits[rows],
            y_all[rows] if y_all is not None else None,
            temperature,
            alpha,
            soft_loss,
            grad_c,
            grad_scale,
            (work[0, :n_c], work[1, :n_c], work[2, :n_c]),
        )
        if valid_c is not None:
            loss_c = torch.where(valid_c, loss_c, torch.zeros((), dtype=ct, device=device))
            if grad_c is not None and not bool(valid_c.all()):
                grad_c[~valid_c] = 0
        loss_rows[rows] = loss_c

    step = rows_per_chunk(n_rows, n_cols, chunk_elements)
    map_row_chunks(
        chunk,
        n_rows,
        step,
        device,
        lambda: torch.empty(3, min(step, n_rows), n_cols, dtype=ct, device=device),
    )
    return loss_rows, n_valid, grad


# --------------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------------


def _reduce(loss_rows: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / n_valid.to(total.dtype).clamp(min=1.0)


class KDLossFunction(torch.autograd.Function):
    """Loss in forward, precomputed d loss / d z_s saved; backward scales it by grad_output in place."""

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None,
        temperature: float,
        alpha: float,
        soft_loss: str,
        reduction: str,
        ignore_index: int,
        backend: str,
        compute_grad: bool,
    ) -> torch.Tensor:
        impl = kd_loss_forward_triton if backend == "triton" else kd_loss_forward_torch
        loss_rows, n_valid, grad = impl(
            student_logits,
            teacher_logits,
            labels,
            temperature,
            alpha,
            soft_loss,
            ignore_index,
            reduction,
            compute_grad,
        )
        loss = _reduce(loss_rows, n_valid, reduction)
        ctx.reduction = reduction
        ctx.input_dtype = student_logits.dtype
        ctx.consumed = False
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.has_grad = grad is not None
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        nones = (None,) * 9
        if not ctx.has_grad:
            return (None, *nones)
        if ctx.consumed:
            raise RuntimeError(
                "kd_loss's fused backward scales its saved gradient in place and can run once per "
                "forward; recompute the loss (or use kd_loss_reference) to backpropagate twice"
            )
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        # grad is in the compute dtype: scaling there and casting after rounds once.
        if ctx.reduction == "none":
            grad.mul_(grad_output.to(grad.dtype).unsqueeze(1))
        elif grad_output.is_cuda or float(grad_output) != 1.0:
            # On CUDA the multiply is cheaper than a host sync to test for 1.0.
            grad.mul_(grad_output.to(grad.dtype))
        return (grad.to(ctx.input_dtype), *nones)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    soft_loss: str = "kl",
    reduction: str = "mean",
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused KD loss over logits [..., V]; see ``kd_loss_reference`` for the exact definition.

    Differentiable w.r.t. ``student_logits`` only (the teacher logits are constants here). The loss
    is fp32 (fp64 for fp64 inputs) whatever the logits' dtype; "none" returns shape [...]. The
    backward is first-order only and may run once per call. backend: "auto" (Triton on CUDA, torch
    otherwise; METADISTIL_KERNEL_BACKEND=triton|torch overrides), "triton" or "torch". A label outside
    [0, V) that is not ``ignore_index`` raises ValueError naming it, its row and V, on every backend.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    check_labels(labels, student_logits, ignore_index)
    check_soft_loss(soft_loss)
    check_reduction(reduction)
    check_temperature(temperature)
    check_alpha(alpha)
    impl = resolve_backend(backend, student_logits)

    lead = student_logits.shape[:-1]
    n_cols = student_logits.shape[-1]
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss = KDLossFunction.apply(
        student_logits.reshape(-1, n_cols),
        teacher_logits.detach().reshape(-1, n_cols),
        labels.reshape(-1) if labels is not None else None,
        float(temperature),
        float(alpha),
        soft_loss,
        reduction,
        int(ignore_index),
        impl,
        compute_grad,
    )
    return loss.reshape(lead) if reduction == "none" else loss


class KDLoss(nn.Module):
    """Module form of ``kd_loss``: ``KDLoss(temperature=4, alpha=0.5)(student, teacher, labels)``."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        alpha: float = 0.5,
        soft_loss: str = "kl",
        reduction: str = "mean",
        ignore_index: int = -100,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_temperature(temperature)
        check_alpha(alpha)
        check_soft_loss(soft_loss)
        check_reduction(reduction)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.soft_loss = soft_loss
        self.reduction = reduction
        self.ignore_index = int(ignore_index)
        self.backend = backend

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kd_loss(
            student_logits,
            teacher_logits,
            labels,
            temperature=self.temperature,
            alpha=self.alpha,
            soft_loss=self.soft_loss,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, soft_loss={self.soft_loss!r}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
