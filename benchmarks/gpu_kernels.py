"""GPU check and benchmark of the Triton kernels (needs CUDA; exits with a message otherwise).

    python benchmarks/gpu_kernels.py [--quick] [--max-vocab 128256] [--max-rows 8192]

1. Correctness on the device: Triton kd_loss (loss and gradient) and meta_cotangent against the
   plain-torch references computed in fp32/fp64, for fp32 / bf16 / fp16 inputs, both soft losses,
   every reduction, -inf vocabulary masks. Exits non-zero on a mismatch.
2. fwd+bwd timing with triton.testing.do_bench (median) for bf16 logits N x V up to 8192 x 128k:
   Triton (fused) vs eager (kd_loss_reference) vs torch.compile(kd_loss_reference) vs, when
   liger_kernel imports, Liger's cross-entropy + KL-divergence kernels on eagerly computed
   log-softmaxes. Each row prints time, peak extra memory and the effective bandwidth
     GB/s = (bytes of z_s + z_t read once + gradient written once) / time
   with that figure's fraction of the device-to-device copy bandwidth measured in this script
   (a large tensor copy: 2 x bytes / time).
"""

from __future__ import annotations

import argparse
import sys

import torch
from metadistil_scale.kernels import kd_loss, kd_loss_reference, meta_cotangent, meta_cotangent_reference

TEMPERATURE = 2.0
ALPHA = 0.5


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        print(
            "gpu_kernels.py needs a CUDA device: torch.cuda.is_available() is False here. "
            "The Triton kernels are tested on CPU by tests/test_kernels.py under TRITON_INTERPRET=1.",
            file=sys.stderr,
        )
        raise SystemExit(2)


# --------------------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------------------


def _inputs(n: int, v: int, dtype: torch.dtype, *, mask: bool, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    zs = torch.randn(n, v, device="cuda", generator=g) * 3
    zt = 0.6 * zs + torch.randn(n, v, device="cuda", generator=g) * 3
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[::5] = -100
    if mask:
        masked = torch.rand(n, v, device="cuda", generator=g) < 0.2
        masked[torch.arange(n, device="cuda"), y.clamp(min=0)] = False
        zs = zs.masked_fill(masked, float("-inf"))
        zt = zt.masked_fill(masked, float("-inf"))
    return zs.to(dtype), zt.to(dtype), y


def _loss_and_grad(fn, zs, zt, y, **kw):
    x = zs.detach().clone().requires_grad_(True)
    loss = fn(x, zt, y, **kw)
    weight = torch.linspace(0.5, 1.5, loss.numel(), device="cuda", dtype=loss.dtype).reshape(loss.shape)
    (loss * weight).sum().backward()
    return loss.detach(), x.grad


def check_correctness(quick: bool) -> bool:
    ok = True
    grad_tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
    shapes = [(64, 1000), (16, 32000)] if quick else [(64, 2), (64, 1000), (16, 32000), (4, 131072 + 7)]
    print("correctness vs reference (fp64 on the same rounded inputs):")
    for n, v in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for soft_loss in ("kl", "mse"):
                for reduction in ("mean", "sum", "none"):
                    zs, zt, y = _inputs(n, v, dtype, mask=v > 2)
                    kw = dict(temperature=TEMPERATURE, alpha=ALPHA, soft_loss=soft_loss, reduction=reduction)
                    loss, grad = _loss_and_grad(kd_loss, zs, zt, y, backend="triton", **kw)
                    ref_loss, ref_grad = _loss_and_grad(kd_loss_reference, zs.double(), zt.double(), y, **kw)
                    loss_err = (
                        (loss.double() - ref_loss).abs().max() / ref_loss.abs().max().clamp(min=1e-12)
                    ).item()
                    grad_err = ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item()
                    good = (
                        loss_err < 1e-4
                        and grad_err < grad_tol[dtype]
                        and bool(torch.isfinite(loss).all() and torch.isfinite(grad).all())
                        and grad.dtype == dtype
                    )
                    ok &= good
                    if not good or not quick:
                        print(
                            f"  kd_loss {n}x{v} {str(dtype):15s} {soft_loss:3s} {reduction:4s} "
                            f"loss rel err {loss_err:.1e}  grad rel err {grad_err:.1e}  {'ok' if good else 'FAIL'}"
                        )
            for soft_loss in ("kl", "mse"):
                zs, zt, _ = _inputs(n, v, dtype, mask=v > 2, seed=1)
                u = torch.randn(n, v, device="cuda").to(dtype)
                kw = dict(temperature=TEMPERATURE, scale=1e-3, soft_loss=soft_loss)
                w = meta_cotangent(zt, u, student_logits=zs, backend="triton", **kw)
                ref = meta_cotangent_reference(zt.double(), u.double(), student_logits=zs.double(), **kw)
                err = ((w.double() - ref).abs().max() / ref.abs().max()).item()
                good = err < grad_tol[dtype] and w.dtype == dtype and bool(torch.isfinite(w).all())
                ok &= good
                if not good or not quick:
                    print(f"  meta_cotangent {n}x{v} {str(dtype):15s} {soft_loss:3s} rel err {err:.1e}  "
                          f"{'ok' if good else 'FAIL'}")  # fmt: skip
    print("  all ok" if ok else "  MISMATCHES above")
    return ok


# --------------------------------------------------------------------------------------------------
# bandwidth
# --------------------------------------------------------------------------------------------------


def copy_bandwidth_gbs(do_bench) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def _liger_step():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except Exception:  # not installed, or an incompatible version
        return None
    ce = LigerCrossEntropyLoss(ignore_index=-100)
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss_fn(x, zt, y):
        log_q = torch.log_softmax(x.float() / TEMPERATURE, dim=-1)
        log_p = torch.log_softmax(zt.float() / TEMPERATURE, dim=-1)
        return ALPHA * ce(x, y) + (1 - ALPHA) * TEMPERATURE**2 * kl(log_q, log_p)

    return loss_fn


def bench(max_rows: int, max_vocab: int, quick: bool) -> None:
    import triton.testing

    do_bench = triton.testing.do_bench
    copy_gbs = copy_bandwidth_gbs(do_bench)
    props = torch.cuda.get_device_properties(0)
    print(f"\n{props.name}: device-to-device copy {copy_gbs:.0f} GB/s (1 GiB tensor, read + write)")

    def fused(x, zt, y):
        return kd_loss(x, zt, y, temperature=TEMPERATURE, alpha=ALPHA, backend="triton")

    def eager(x, zt, y):
        return kd_loss_reference(x, zt, y, temperature=TEMPERATURE, alpha=ALPHA)

    impls = {"triton (fused)": fused, "eager": eager, "torch.compile": torch.compile(eager, dynamic=False)}
    liger = _liger_step()
    if liger is not None:
        impls["liger CE + kl_div"] = liger
    else:
        print("liger_kernel not importable: its column is skipped")

    shapes = [(n, v) for n in (1024, 4096, 8192) for v in (32000, 128256)]
    shapes = [(n, v) for n, v in shapes if n <= max_rows and v <= max_vocab]
    if quick:
        shapes = shapes[:2]
    print("\nkd_loss fwd+bwd, bf16 logits, T=2, alpha=0.5, mean over rows (median of do_bench)")
    print("| N | V | implementation | ms | peak extra GiB | effective GB/s | fraction of copy bw |")
    print("|---|---|---|---|---|---|---|")
    for n, v in shapes:
        zs, zt, y = _inputs(n, v, torch.bfloat16, mask=False)
        nbytes = 3 * zs.numel() * zs.element_size()
        for name, fn in impls.items():
            x = zs.detach().clone().requires_grad_(True)

            def step(fn=fn, x=x, zt=zt, y=y):
                x.grad = None
                fn(x, zt, y).backward()

            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                ms = do_bench(step, return_mode="median")
            except torch.cuda.OutOfMemoryError:
                print(f"| {n} | {v} | {name} | OOM | | | |")
                torch.cuda.empty_cache()
                continue
            gbs = nbytes / (ms * 1e-3) / 1e9
            print(
                f"| {n} | {v} | {name} | {ms:.3f} | {peak:.2f} | {gbs:.0f} | {gbs / copy_gbs:.2f} |",
                flush=True,
            )
            del x
            torch.cuda.empty_cache()

    print("\nmeta_cotangent (kl), bf16: reads z_t and u, writes w")
    print("| N | V | implementation | ms | effective GB/s | fraction of copy bw |")
    print("|---|---|---|---|---|---|")
    for n, v in shapes:
        zs, zt, _ = _inputs(n, v, torch.bfloat16, mask=False)
        u = torch.randn_like(zt)
        nbytes = 3 * zt.numel() * zt.element_size()
        kw = dict(temperature=TEMPERATURE, scale=1e-4)
        for name, impl in (("triton (fused)", meta_cotangent), ("eager", None)):

            def run(impl=impl, zt=zt, u=u, kw=kw):
                if impl is None:
                    return meta_cotangent_reference(zt, u, **kw)
                return impl(zt, u, backend="triton", **kw)

            fn = run
            ms = do_bench(fn, return_mode="median")
            gbs = nbytes / (ms * 1e-3) / 1e9
            print(f"| {n} | {v} | {name} | {ms:.3f} | {gbs:.0f} | {gbs / copy_gbs:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer correctness shapes, two benchmark shapes")
    parser.add_argument("--max-rows", type=int, default=8192)
    parser.add_argument("--max-vocab", type=int, default=128256)
    parser.add_argument("--skip-bench", action="store_true", help="correctness only")
    args = parser.parse_args()
    _require_cuda()
    ok = check_correctness(args.quick)
    if not args.skip_bench:
        bench(args.max_rows, args.max_vocab, args.quick)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
