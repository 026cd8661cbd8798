"""Fused KD loss and meta cotangent (row-chunked torch path on CPU) against naive eager torch.

Naive eager = the plain-torch references: ``kd_loss_reference`` (log_softmax + kl_div + cross_entropy,
autograd backward) and ``meta_cotangent_reference``. A KD-loss measurement is one forward + backward w.r.t.
the student logits; a cotangent measurement is one call.

    python benchmarks/bench_kernels.py                       # time and memory ratios of the KD loss, one run
    python benchmarks/bench_kernels.py --op meta_cotangent   # the same for the meta cotangent
    pytest benchmarks/test_bench_kernels.py --benchmark-only # pytest-benchmark table (Triton too, on CUDA)

Peak extra memory: torch has no CPU allocator statistics, so every (implementation, size) runs in
a fresh subprocess that builds its inputs, warms up on a small problem, resets the kernel's
resident-set high-water mark (/proc/self/clear_refs) and reports VmHWM - VmRSS-before-the-step
(falling back to ru_maxrss where the reset is unavailable); see peak_memory.py. It counts everything
the step keeps or frees on the way, including the result (the gradient x.grad, or w) itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from metadistil_scale.kernels import kd_loss, kd_loss_reference, meta_cotangent, meta_cotangent_reference
from peak_memory import peak_extra_memory

CASES = [(4096, 2), (4096, 100), (2048, 32000)]
TEMPERATURE = 4.0
ALPHA = 0.5
CPU_IMPLS = ("eager", "fused-torch")


def make_inputs(
    n: int, v: int, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits, teacher logits and labels of the KD loss."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v, generator=g)
    zt = torch.randn(n, v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[::16] = -100  # some ignored rows, as padding gives in practice
    return zs.to(device), zt.to(device), y.to(device)


def make_cotangent_inputs(
    n: int, v: int, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits and the tangent u of the meta cotangent."""
    zt, u, _ = make_inputs(n, v, seed, device)
    return zt, u


def kd_loss_step(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, backend: str | None) -> torch.Tensor:
    """Forward + backward; backend None is the eager reference."""
    x = zs.detach().requires_grad_(True)
    if backend is None:
        loss = kd_loss_reference(x, zt, y, temperature=TEMPERATURE, alpha=ALPHA)
    else:
        loss = kd_loss(x, zt, y, temperature=TEMPERATURE, alpha=ALPHA, backend=backend)
    loss.backward()
    return x.grad


def cotangent_step(zt: torch.Tensor, u: torch.Tensor, backend: str | None) -> torch.Tensor:
    scale = (1 - ALPHA) / zt.shape[0]  # lambda = 1
    if backend is None:
        return meta_cotangent_reference(zt, u, temperature=TEMPERATURE, scale=scale)
    return meta_cotangent(zt, u, temperature=TEMPERATURE, scale=scale, backend=backend)


Step = Callable[..., torch.Tensor]
BACKENDS = {"eager": None, "fused-torch": "torch", "fused-triton": "triton"}


def _impls(step: Step) -> dict[str, Step]:
    return {name: partial(step, backend=backend) for name, backend in BACKENDS.items()}


# op -> (inputs of an N x V problem, implementation name -> step)
OPS: dict[str, tuple[Callable[..., tuple[torch.Tensor, ...]], dict[str, Step]]] = {
    "kd_loss": (make_inputs, _impls(kd_loss_step)),
    "meta_cotangent": (make_cotangent_inputs, _impls(cotangent_step)),
}


def default_repeats(n: int, v: int, vocab_scale: int = 5) -> int:
    """Timed runs per implementation: few at vocabulary scale, where one eager step takes seconds here."""
    return vocab_scale if n * v > 10**7 else 30


# --------------------------------------------------------------------------------------------------
# script mode: one table of ratios
# --------------------------------------------------------------------------------------------------


def _time_interleaved(impls: dict[str, Step], inputs, repeats: int) -> dict[str, list[float]]:
    """Alternate the implementations so that load changes on the machine hit both alike."""
    times: dict[str, list[float]] = {name: [] for name in impls}
    for fn in impls.values():
        fn(*inputs)
    for _ in range(repeats):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn(*inputs)
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--op", choices=list(OPS), default="kd_loss")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per implementation (0: by size)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the memory subprocesses
    make, impls = OPS[args.op]
    impls = {name: impls[name] for name in CPU_IMPLS}
    print(
        f"{args.op}: torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs, "
        f"T={TEMPERATURE}, alpha={ALPHA}, fp32; load average before: {_load()}"
    )
    header = (
        "| N | V | eager ms (median) | fused ms (median) | time ratio eager/fused | "
        "eager extra MiB | fused extra MiB | memory ratio fused/eager |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for n, v in CASES:
        times = _time_interleaved(impls, make(n, v), args.repeats or default_repeats(n, v))
        t_eager = statistics.median(times["eager"]) * 1e3
        t_fused = statistics.median(times["fused-torch"]) * 1e3
        m_eager = peak_extra_memory("bench_kernels", args.op, "eager", n, v)["extra_bytes"] / 2**20
        m_fused = peak_extra_memory("bench_kernels", args.op, "fused-torch", n, v)["extra_bytes"] / 2**20
        mem_ratio = f"{m_fused / m_eager:.2f}" if m_eager > 0 else "n/a"
        print(
            f"| {n} | {v} | {t_eager:.1f} | {t_fused:.1f} | {t_eager / t_fused:.2f}x | "
            f"{m_eager:.1f} | {m_fused:.1f} | {mem_ratio} |",
            flush=True,
        )
    print(f"load average after: {_load()}")


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
