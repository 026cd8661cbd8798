"""Peak memory added by one call of a benchmark op, measured where nothing else has run.

An op is ``MODULE.OPS[op] = (make_inputs(n, v, seed=0, device="cpu"), {impl: step(*inputs)})`` in one of
the benchmark modules beside this file (bench_kernels, bench_lm).

CPU: torch has no allocator statistics, so each (op, implementation, size) runs in a fresh subprocess
(``python peak_memory.py MODULE OP IMPL N V``) that builds its inputs, warms up on 8 rows, returns the
heap's free pages to the OS (malloc_trim), resets the kernel's resident-set high-water mark
(/proc/self/clear_refs) and reports VmHWM - VmRSS-before-the-step (falling back to ru_maxrss where the
reset is unavailable). It counts everything the step keeps or frees on the way, including its results
(gradients, w) themselves.
CUDA: the allocator's own peak (torch.cuda.max_memory_allocated) above what was allocated before, in this
process.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import subprocess
import sys


def status_kib(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS, VmHWM: this process's own resident size and peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _op(module: str, op: str, impl: str, n: int, v: int, device: str):
    make, impls = importlib.import_module(module).OPS[op]
    step = impls[impl]
    inputs = make(n, v, device=device)
    step(*make(8, v, device=device))  # thread pools, kernels, allocator arenas
    return step, inputs


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so that a step reusing them shows in the peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _measure_in_this_process(module: str, op: str, impl: str, n: int, v: int) -> dict:
    step, inputs = _op(module, op, impl, n, v, "cpu")
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = status_kib("VmRSS")
        step(*inputs)
        peak = status_kib("VmHWM")
        method = "VmHWM after clear_refs"
    except OSError:
        before = status_kib("VmRSS")
        step(*inputs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss"
    return {"extra_bytes": max(0, peak - before) * 1024, "method": method}


def _measure_cuda(module: str, op: str, impl: str, n: int, v: int) -> dict:
    import torch

    step, inputs = _op(module, op, impl, n, v, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(*inputs)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    return {"extra_bytes": extra, "method": "torch.cuda.max_memory_allocated"}


def peak_extra_memory(module: str, op: str, impl: str, n: int, v: int, device: str = "cpu") -> dict:
    """{"extra_bytes", "method"} of one call of MODULE.OPS[op]'s `impl` on an n x v problem."""
    if device == "cuda":
        return _measure_cuda(module, op, impl, n, v)
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), module, op, impl, str(n), str(v)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_info(module: str, op: str, impl: str, n: int, v: int, device: str = "cpu") -> dict:
    """peak_extra_memory as a benchmark's extra_info."""
    mem = peak_extra_memory(module, op, impl, n, v, device)
    return {"peak_extra_MiB": round(mem["extra_bytes"] / 2**20, 1), "memory_method": mem["method"]}


if __name__ == "__main__":
    module, op, impl, n, v = sys.argv[1:]
    print(json.dumps(_measure_in_this_process(module, op, impl, int(n), int(v))))
