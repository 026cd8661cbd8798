"""GPU check and benchmark of the Triton kernels (needs CUDA; exits 2 with a message otherwise).

    python benchmarks/gpu_kernels.py [--quick] [--skip-check] [--skip-bench] [--shapes 4096x32000,...]
                                     [--max-vocab 128256] [--max-rows 8192] [--json PATH]

1. Correctness on the device: Triton kd_loss (loss and gradient) and meta_cotangent against the
   plain-torch references computed in fp64 on the same, already rounded, inputs, for fp32 and bf16
   inputs over the shapes of tests/test_kernels.py and N x V up to 8192 x 128256 (fp64 inputs on
   small shapes), both soft losses, every reduction, -inf vocabulary masks and ignored rows; plus the
   edge cases the CPU tests pin (out-of-range labels, rows filled with finfo.min, alpha = 1 with a
   class masked in the student only, grad_output 1/3 on bf16). Exits 1 on a mismatch.
2. fwd+bwd timing with triton.testing.do_bench (median) for bf16 logits N x V up to 8192 x 128256:
   Triton (fused) vs eager (kd_loss_reference) vs torch.compile(kd_loss_reference) vs, when
   liger_kernel imports, Liger's cross-entropy + KL-divergence kernels on eagerly computed
   log-softmaxes. Each row gives time, peak extra memory and the effective bandwidth
     GB/s = (bytes of z_s + z_t read once + gradient written once, all bf16) / time,
   the least traffic any implementation needs (the fused one reads the logits twice and keeps an fp32
   gradient between forward and backward), with that figure's fraction of the device-to-device copy
   bandwidth measured in the same run (a 1 GiB copy: 2 x bytes / time).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from metadistil_scale.kernels import kd_loss, kd_loss_reference, meta_cotangent, meta_cotangent_reference

TEMPERATURE = 2.0
ALPHA = 0.5
IGNORE = -100

# tests/test_kernels.py's shapes (rows x VOCABS, the 2^18 + 3 vocabulary), then training-size ones.
TEST_SHAPES = [(11, 2), (11, 3), (11, 100), (11, 1000), (11, 4099), (2, 2**18 + 3)]
LARGE_SHAPES = [(1024, 32000), (4096, 49152), (8192, 128256)]
FP64_SHAPES = [(11, 100), (11, 4099)]
BENCH_SHAPES = [(n, v) for n in (1024, 4096, 8192) for v in (32000, 128256)]

# Largest error allowed, relative to the largest reference value. Inputs are rounded first, so the
# error is the computation's: fp32 accumulation, and for bf16 one rounding of the stored result.
LOSS_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float64: 1e-12}

Record = Callable[[dict], None]


def require_cuda() -> None:
    if not torch.cuda.is_available():
        print(
            "gpu_kernels.py needs a CUDA device: torch.cuda.is_available() is False here. "
            "The Triton kernels are tested on CPU by tests/test_kernels.py under TRITON_INTERPRET=1.",
            file=sys.stderr,
        )
        raise SystemExit(2)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x32000,8192x128256' -> [(4096, 32000), (8192, 128256)]."""
    shapes = []
    for item in text.split(","):
        n, _, v = item.strip().lower().partition("x")
        if not (n.isdigit() and v.isdigit()) or int(n) < 1 or int(v) < 1:
            raise ValueError(f"shape {item!r}: expected ROWSxVOCAB, e.g. 4096x32000")
        shapes.append((int(n), int(v)))
    return shapes


def rel_max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (inf where actual is not finite where expected is)."""
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape:
        return math.inf
    if not bool((torch.isfinite(actual) == torch.isfinite(expected)).all()):
        return math.inf
    finite = torch.isfinite(expected)
    if not bool(finite.any()):
        return 0.0
    scale = expected[finite].abs().max().item()
    err = (actual[finite] - expected[finite]).abs().max().item()
    return err / scale if scale > 0 else err


# --------------------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------------------


def make_inputs(n: int, v: int, dtype: torch.dtype, *, mask: bool, seed: int = 0, device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    zs = torch.randn(n, v, device=device, generator=g) * 3
    zt = 0.6 * zs + torch.randn(n, v, device=device, generator=g) * 3
    y = torch.randint(0, v, (n,), device=device, generator=g)
    y[::5] = IGNORE
    if mask:
        masked = torch.rand(n, v, device=device, generator=g) < 0.2
        masked[torch.arange(n, device=device), y.clamp(min=0)] = False
        masked[:, 0] = False  # every row keeps a live class
        zs = zs.masked_fill(masked, float("-inf"))
        zt = zt.masked_fill(masked, float("-inf"))
    return zs.to(dtype), zt.to(dtype), y


def reference_rows(zs, zt, y, soft_loss: str, rows_per_chunk: int = 1024):
    """Per-row fp64 reference loss and d loss_row / d z_s (rows are independent), row chunk by chunk."""
    losses, grads = [], []
    for start in range(0, zs.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        x = zs[rows].double().requires_grad_(True)
        loss = kd_loss_reference(x, zt[rows].double(), y[rows], temperature=TEMPERATURE, alpha=ALPHA,
                                 soft_loss=soft_loss, reduction="none")  # fmt: skip
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append(x.grad)
    return torch.cat(losses), torch.cat(grads)


def reduced_reference(ref_loss, ref_grad, y, reduction: str, weights):
    """The reference for one reduction and grad_output from the per-row figures."""
    n_valid = max(int((y != IGNORE).sum()), 1)
    if reduction == "none":
        return ref_loss, ref_grad * weights.unsqueeze(1)
    total = ref_loss.sum()
    if reduction == "sum":
        return total, ref_grad * weights
    return total / n_valid, ref_grad * (weights / n_valid)


def _kd_case(zs, zt, y, soft_loss: str, reduction: str):
    x = zs.detach().clone().requires_grad_(True)
    loss = kd_loss(x, zt, y, temperature=TEMPERATURE, alpha=ALPHA, soft_loss=soft_loss, reduction=reduction,
                   backend="triton")  # fmt: skip
    weights = torch.linspace(0.5, 1.5, loss.numel(), device=loss.device, dtype=loss.dtype).reshape(loss.shape)
    loss.backward(weights)
    return loss.detach(), x.grad, weights.double()


def check_correctness(shapes, record: Record, fp64_shapes=FP64_SHAPES, device: str = "cuda",
                      dtypes=(torch.float32, torch.bfloat16)) -> bool:
    """Every case through ``record``; True when all pass. Runs on CPU too, under TRITON_INTERPRET=1
    (whose fp32 -> bf16 stores truncate, where a GPU rounds to nearest: keep bf16 out there)."""
    ok = True
    cases = [(n, v, d) for n, v in shapes for d in dtypes]
    cases += [(n, v, torch.float64) for n, v in fp64_shapes]
    for n, v, dtype in cases:
        for soft_loss in ("kl", "mse"):
            zs, zt, y = make_inputs(n, v, dtype, mask=v > 2, device=device)
            ref_loss, ref_grad = reference_rows(zs, zt, y, soft_loss)
            for reduction in ("mean", "sum", "none"):
                loss, grad, weights = _kd_case(zs, zt, y, soft_loss, reduction)
                exp_loss, exp_grad = reduced_reference(ref_loss, ref_grad, y, reduction, weights)
                loss_err, grad_err = rel_max_err(loss, exp_loss), rel_max_err(grad, exp_grad)
                good = loss_err <= LOSS_TOL[dtype] and grad_err <= GRAD_TOL[dtype] and grad.dtype == dtype
                ok &= good
                record({"check": "kd_loss", "n": n, "v": v, "dtype": str(dtype).removeprefix("torch."),
                        "soft_loss": soft_loss, "reduction": reduction, "loss_err": loss_err, "grad_err": grad_err,
                        "loss_tol": LOSS_TOL[dtype], "grad_tol": GRAD_TOL[dtype], "ok": good})
            del ref_loss, ref_grad
            zs, zt, _ = make_inputs(n, v, dtype, mask=v > 2, seed=1, device=device)
            u = torch.randn(n, v, device=zs.device).to(dtype)
            kw = dict(temperature=TEMPERATURE, scale=1e-3, soft_loss=soft_loss)
            w = meta_cotangent(zt, u, student_logits=zs, backend="triton", **kw)
            err = max(
                (rel_max_err(w[r], meta_cotangent_reference(zt[r].double(), u[r].double(),
                                                            student_logits=zs[r].double(), **kw))
                 for r in (slice(s, s + 1024) for s in range(0, n, 1024))),
            )  # fmt: skip
            good = err <= GRAD_TOL[dtype] and w.dtype == dtype
            ok &= good
            record({"check": "meta_cotangent", "n": n, "v": v, "dtype": str(dtype).removeprefix("torch."),
                    "soft_loss": soft_loss, "err": err, "tol": GRAD_TOL[dtype], "ok": good})
            del zs, zt, u, w
            torch.cuda.empty_cache()
    for name, fn in EDGE_CASES.items():
        try:
            detail = fn(device)
            good = detail is None
        except Exception as err:  # a crash is a failed check, not the end of the run
            detail, good = f"{type(err).__name__}: {err}", False
        ok &= good
        record({"check": name, "ok": good, "detail": detail or ""})
    return ok


def _edge_bad_label(device: str) -> str | None:
    zs, zt = torch.randn(3, 10, device=device), torch.randn(3, 10, device=device)
    try:
        kd_loss(zs, zt, torch.tensor([1, 10, 2], device=device), backend="triton")
    except ValueError as err:
        if "label 10 at row 1" not in str(err):
            return f"unclear message: {err}"
    else:
        return "no ValueError for label 10 with V = 10"
    # Unchecked, the kernel must neither read past the buffer nor give a finite loss.
    from metadistil_scale.kernels.fused_kd_loss import kd_loss_forward_triton

    loss, _, grad = kd_loss_forward_triton(zs, zt, torch.tensor([1, 2, 10], device=device), TEMPERATURE, ALPHA,
                                           "kl", IGNORE, "none", True)  # fmt: skip
    if not (bool(torch.isnan(loss[2])) and bool(torch.isnan(grad[2]).all()) and bool(torch.isfinite(loss[:2]).all())):
        return f"unchecked label 10: loss {loss.tolist()}"
    return None


def _edge_float_min_row(device: str) -> str | None:
    for v in (8, 128256):
        z = torch.full((1, v), torch.finfo(torch.float32).min, device=device)
        x = z.clone().requires_grad_(True)
        loss = kd_loss(x, z, torch.tensor([3], device=device), backend="triton")
        loss.backward()
        expected = 0.5 * math.log(v)  # uniform: CE = log V, KL = 0
        if not abs(loss.item() - expected) <= 1e-5 * expected or not bool(torch.isfinite(x.grad).all()):
            return f"V={v}: loss {loss.item()} (expected {expected}), finite grad {bool(torch.isfinite(x.grad).all())}"
        w = meta_cotangent(z, torch.randn_like(z), temperature=1.0, scale=1.0, backend="triton")
        if not bool(torch.isfinite(w).all()):
            return f"V={v}: non-finite cotangent"
    return None


def _edge_alpha_one(device: str) -> str | None:
    zs = torch.tensor([[0.0, 0.0, 0.0, float("-inf")]], device=device)
    loss = kd_loss(zs, torch.zeros_like(zs), torch.tensor([0], device=device), alpha=1.0, backend="triton")
    if not abs(loss.item() - math.log(3)) <= 1e-6:
        return f"loss {loss.item()}, expected log 3 = {math.log(3)}"
    return None


def _edge_grad_output_third(device: str) -> str | None:
    zs, zt, y = make_inputs(64, 1000, torch.bfloat16, mask=False, seed=2, device=device)
    x = zs.clone().requires_grad_(True)
    kd_loss(x, zt, y, temperature=TEMPERATURE, alpha=ALPHA, backend="triton").backward(
        torch.tensor(1 / 3, device=device))
    ref_loss, ref_grad = reference_rows(zs, zt, y, "kl")
    exp = ref_grad / (3 * max(int((y != IGNORE).sum()), 1))
    live = exp != 0
    ratio = (x.grad.double()[live] / exp[live]).median().item()
    return None if abs(ratio - 1) < 1e-3 else f"median grad ratio {ratio} (grad_output rounded before scaling?)"


# Each returns None when it passes, else what went wrong.
EDGE_CASES: dict[str, Callable[[str], str | None]] = {
    "out-of-range label": _edge_bad_label,
    "finfo.min row": _edge_float_min_row,
    "alpha=1, class masked in the student only": _edge_alpha_one,
    "bf16 grad_output 1/3": _edge_grad_output_third,
}


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
    ce = LigerCrossEntropyLoss(ignore_index=IGNORE)
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss_fn(x, zt, y):
        log_q = torch.log_softmax(x.float() / TEMPERATURE, dim=-1)
        log_p = torch.log_softmax(zt.float() / TEMPERATURE, dim=-1)
        return ALPHA * ce(x, y) + (1 - ALPHA) * TEMPERATURE**2 * kl(log_q, log_p)

    return loss_fn


def bench(shapes, record: Record) -> None:
    import triton.testing

    do_bench = triton.testing.do_bench
    copy_gbs = copy_bandwidth_gbs(do_bench)
    props = torch.cuda.get_device_properties(0)
    record({"kind": "device", "name": props.name, "copy_gbs": copy_gbs})

    def fused(x, zt, y):
        return kd_loss(x, zt, y, temperature=TEMPERATURE, alpha=ALPHA, backend="triton")

    def eager(x, zt, y):
        return kd_loss_reference(x, zt, y, temperature=TEMPERATURE, alpha=ALPHA)

    # torch.compile last: its first call per shape compiles for tens of seconds.
    impls = {"triton (fused)": fused, "eager": eager}
    liger = _liger_step()
    if liger is not None:
        impls["liger CE + kl_div"] = liger
    impls["torch.compile"] = torch.compile(eager, dynamic=False)
    if liger is None:
        record({"kind": "note", "text": "liger_kernel not importable: its column is skipped"})

    for n, v in shapes:
        zs, zt, y = make_inputs(n, v, torch.bfloat16, mask=False)
        nbytes = 3 * zs.numel() * zs.element_size()
        for name, fn in impls.items():
            row = {"kind": "kd_loss", "n": n, "v": v, "impl": name}
            x = zs.detach().clone().requires_grad_(True)

            def step(fn=fn, x=x, zt=zt, y=y):
                x.grad = None
                fn(x, zt, y).backward()

            try:
                step()  # compile / warm up outside the peak measurement
                torch.cuda.synchronize()
                x.grad = None
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                row["ms"] = do_bench(step, return_mode="median")
                row["gbs"] = nbytes / (row["ms"] * 1e-3) / 1e9
                row["fraction_of_copy"] = row["gbs"] / copy_gbs
            except Exception as err:  # OOM or a compile failure: that cell only
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            record(row)
            del x
            torch.cuda.empty_cache()

        u = torch.randn_like(zt)
        nbytes = 3 * zt.numel() * zt.element_size()
        fused_w = functools.partial(meta_cotangent, temperature=TEMPERATURE, scale=1e-4, backend="triton")
        eager_w = functools.partial(meta_cotangent_reference, temperature=TEMPERATURE, scale=1e-4)
        for name, fn in (("triton (fused)", fused_w), ("eager", eager_w)):
            run = functools.partial(fn, zt, u)

            row = {"kind": "meta_cotangent", "n": n, "v": v, "impl": name}
            try:
                row["ms"] = do_bench(run, return_mode="median")
                row["gbs"] = nbytes / (row["ms"] * 1e-3) / 1e9
                row["fraction_of_copy"] = row["gbs"] / copy_gbs
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            record(row)
        del zs, zt, y, u
        torch.cuda.empty_cache()


def bench_markdown(rows: list[dict]) -> str:
    """The benchmark rows as two markdown tables (kd_loss fwd+bwd, meta_cotangent)."""
    device = next((r for r in rows if r.get("kind") == "device"), None)
    lines = []
    if device:
        lines.append(f"{device['name']}: device-to-device copy {device['copy_gbs']:.0f} GB/s (1 GiB, read + write)\n")
    lines += ["kd_loss fwd+bwd, bf16 logits, T=2, alpha=0.5, mean over rows (median of do_bench)\n",
              "| N | V | implementation | ms | peak extra GiB | effective GB/s | fraction of copy bw |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "kd_loss":
            lines.append(_cells(r, ["ms", "peak_extra_gib", "gbs", "fraction_of_copy"]))
    lines += ["", "meta_cotangent (kl), bf16: reads z_t and u, writes w\n",
              "| N | V | implementation | ms | effective GB/s | fraction of copy bw |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") == "meta_cotangent":
            lines.append(_cells(r, ["ms", "gbs", "fraction_of_copy"]))
    lines += [f"\n{r['text']}" for r in rows if r.get("kind") == "note"]
    return "\n".join(lines)


def _cells(row: dict, keys: list[str]) -> str:
    formats = {"ms": ".3f", "peak_extra_gib": ".2f", "gbs": ".0f", "fraction_of_copy": ".2f"}
    if "error" in row:
        values = [row["error"]] + [""] * (len(keys) - 1)
    else:
        values = [format(row[k], formats[k]) if k in row else "-" for k in keys]
    return f"| {row['n']} | {row['v']} | {row['impl']} | " + " | ".join(values) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="test shapes only for the check, two benchmark shapes")
    parser.add_argument("--shapes", type=parse_shapes, help="benchmark shapes, e.g. 4096x32000,8192x128256")
    parser.add_argument("--max-rows", type=int, default=8192)
    parser.add_argument("--max-vocab", type=int, default=128256)
    parser.add_argument("--skip-check", action="store_true", help="benchmark only")
    parser.add_argument("--skip-bench", action="store_true", help="correctness only")
    parser.add_argument("--json", type=Path, help="also write every check and benchmark row here (rewritten per row)")
    args = parser.parse_args()
    require_cuda()
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        if "check" in row:
            if not row["ok"] or not args.quick:
                print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))

    ok = True
    if not args.skip_check:
        large = [(n, v) for n, v in LARGE_SHAPES if n <= args.max_rows and v <= args.max_vocab]
        ok = check_correctness(TEST_SHAPES + ([] if args.quick else large), record)
        print("correctness: all ok" if ok else "correctness: MISMATCHES above", flush=True)
    if not args.skip_bench:
        shapes = args.shapes or [(n, v) for n, v in BENCH_SHAPES if n <= args.max_rows and v <= args.max_vocab]
        bench(shapes[:2] if args.quick and not args.shapes else shapes, record)
        print(bench_markdown(rows))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
