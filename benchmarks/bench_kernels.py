"""CPU benchmarks of the fused KD loss (row-chunked torch path) against naive eager torch.

Naive eager = ``kd_loss_reference`` (log_softmax + kl_div + cross_entropy, autograd backward).
Each measurement is one forward + backward w.r.t. the student logits.

    pytest benchmarks/bench_kernels.py --benchmark-only     # pytest-benchmark table
    python benchmarks/bench_kernels.py                       # time and memory ratios, one run

Peak extra memory: torch has no CPU allocator statistics, so every (implementation, size) runs in
a fresh subprocess that builds its inputs, warms up on a small problem, resets the kernel's
resident-set high-water mark (/proc/self/clear_refs) and reports VmHWM - VmRSS-before-the-step
(falling back to ru_maxrss where the reset is unavailable). It counts everything the step keeps
or frees on the way, including the gradient x.grad itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import pytest
import torch
from metadistil_scale.kernels import kd_loss, kd_loss_reference

CASES = [(4096, 2), (4096, 100), (2048, 32000)]
TEMPERATURE = 4.0
ALPHA = 0.5


def make_inputs(n: int, v: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v, generator=g)
    zt = torch.randn(n, v, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    y[::16] = -100  # some ignored rows, as padding gives in practice
    return zs, zt, y


def eager_step(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = zs.detach().requires_grad_(True)
    kd_loss_reference(x, zt, y, temperature=TEMPERATURE, alpha=ALPHA).backward()
    return x.grad


def fused_step(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = zs.detach().requires_grad_(True)
    kd_loss(x, zt, y, temperature=TEMPERATURE, alpha=ALPHA, backend="torch").backward()
    return x.grad


IMPLS = {"eager": eager_step, "fused-torch": fused_step}


# --------------------------------------------------------------------------------------------------
# memory (one fresh process per measurement)
# --------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _measure_in_this_process(impl: str, n: int, v: int) -> dict:
    step = IMPLS[impl]
    zs, zt, y = make_inputs(n, v)
    small = make_inputs(8, v)
    step(*small)  # thread pools, kernels, allocator arenas
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
        step(zs, zt, y)
        peak = _status_kib("VmHWM")
        method = "VmHWM after clear_refs"
    except OSError:
        before = _status_kib("VmRSS")
        step(zs, zt, y)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss"
    return {"extra_bytes": max(0, peak - before) * 1024, "method": method}


def peak_extra_memory(impl: str, n: int, v: int) -> dict:
    """Peak resident memory added by one forward+backward, measured in a fresh subprocess."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--measure-memory", impl, str(n), str(v)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="kd_loss fwd+bwd (CPU)")
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("n,v", CASES, ids=[f"N{n}-V{v}" for n, v in CASES])
def test_kd_loss_fwd_bwd(benchmark, impl, n, v):
    inputs = make_inputs(n, v)
    mem = peak_extra_memory(impl, n, v)
    benchmark.extra_info["peak_extra_MiB"] = round(mem["extra_bytes"] / 2**20, 1)
    benchmark.extra_info["memory_method"] = mem["method"]
    rounds = 5 if n * v > 10**7 else 30
    benchmark.pedantic(IMPLS[impl], args=inputs, rounds=rounds, warmup_rounds=1)


# --------------------------------------------------------------------------------------------------
# script mode: one table of ratios
# --------------------------------------------------------------------------------------------------


def _time_interleaved(inputs, repeats: int) -> dict[str, list[float]]:
    """Alternate the implementations so that load changes on the machine hit both alike."""
    times: dict[str, list[float]] = {name: [] for name in IMPLS}
    for fn in IMPLS.values():
        fn(*inputs)
    for _ in range(repeats):
        for name, fn in IMPLS.items():
            t0 = time.perf_counter()
            fn(*inputs)
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--measure-memory", nargs=3, metavar=("IMPL", "N", "V"), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per implementation (0: by size)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the memory subprocesses
    if args.measure_memory:
        impl, n, v = args.measure_memory
        print(json.dumps(_measure_in_this_process(impl, int(n), int(v))))
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs, "
        f"T={TEMPERATURE}, alpha={ALPHA}, fp32; load average before: {_load()}"
    )
    header = (
        "| N | V | eager ms (median) | fused ms (median) | time ratio eager/fused | "
        "eager extra MiB | fused extra MiB | memory ratio fused/eager |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for n, v in CASES:
        repeats = args.repeats or (5 if n * v > 10**7 else 30)
        times = _time_interleaved(make_inputs(n, v), repeats)
        t_eager = statistics.median(times["eager"]) * 1e3
        t_fused = statistics.median(times["fused-torch"]) * 1e3
        m_eager = peak_extra_memory("eager", n, v)["extra_bytes"] / 2**20
        m_fused = peak_extra_memory("fused-torch", n, v)["extra_bytes"] / 2**20
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
