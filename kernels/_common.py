"""Argument validation, backend selection and the row-chunk runner shared by the kernels."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

SOFT_LOSSES = ("kl", "mse")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "METADISTIL_KERNEL_BACKEND"

# Elements of one [rows, V] fp32 temporary in the chunked torch path: a few of them per worker stay
# in a core's L2 and are negligible next to the logits; big enough to amortise per-op overhead.
TORCH_CHUNK_ELEMENTS = 1 << 18


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


def check_labels(labels: torch.Tensor | None, logits: torch.Tensor, ignore_index: int) -> None:
    """Shape, dtype and values: every label is ``ignore_index`` or a class in [0, V).

    The value check costs one host sync on CUDA. It runs before any kernel: an out-of-range label would
    otherwise index the row's neighbour (Triton) or fail deep inside a worker (torch).
    """
    if labels is None:
        return
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:-1])} (the logits {tuple(logits.shape)} "
            f"without the class dimension), got {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    n_classes = logits.shape[-1]
    flat = labels.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= n_classes))
    if flat.numel() and bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        where = f"row {row}"
        if labels.dim() > 1:
            index = ", ".join(str(int(i)) for i in torch.unravel_index(torch.tensor(row), labels.shape))
            where += f" (labels[{index}])"
        raise ValueError(
            f"label {int(flat[row])} at {where} is outside [0, V) for V = {n_classes} classes and is not "
            f"ignore_index ({ignore_index})"
        )


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


# --------------------------------------------------------------------------------------------------
# CPU row-chunk runner
# --------------------------------------------------------------------------------------------------
# A chunk is a dozen small ops. Run with intra-op (OpenMP) parallelism, every op is a parallel
# region with a barrier, and on a CPU shared with other processes a descheduled thread stalls each
# barrier: measured 5-10x slower than serial ops. So chunks go to a pool of threads whose own
# intra-op thread count is 1, one chunk per thread at a time (ops release the GIL).

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_unusable = False
_pool_lock = threading.Lock()


def _drop_pool_after_fork() -> None:
    global _pool, _pool_size
    _pool, _pool_size = None, 0  # its threads do not exist in the child


os.register_at_fork(after_in_child=_drop_pool_after_fork)


def _serial_worker_init() -> None:
    torch.get_num_threads()  # finish this thread's lazy init from the process setting first
    torch.set_num_threads(1)


def _cpu_pool() -> ThreadPoolExecutor | None:
    """The pool of single-threaded workers, sized to the caller's intra-op thread count."""
    global _pool, _pool_size, _pool_unusable
    n = torch.get_num_threads()
    if n < 2 or _pool_unusable:
        return None
    with _pool_lock:
        if _pool is not None and _pool_size == n:
            return _pool
        if _pool is not None:
            _pool.shutdown(wait=False)
            _pool, _pool_size = None, 0
        pool = ThreadPoolExecutor(n, thread_name_prefix="metadistil-kernels", initializer=_serial_worker_init)
        try:
            # Start all n workers (each blocks until all have run the initializer), then restore the
            # process-wide default that their set_num_threads(1) also moved.
            started = threading.Barrier(n + 1, timeout=30)
            futures = [pool.submit(started.wait) for _ in range(n)]
            started.wait()
            for f in futures:
                f.result()
            torch.set_num_threads(n)
            checked = threading.Barrier(n, timeout=30)
            counts = [f.result() for f in [pool.submit(_threads_after, checked) for _ in range(n)]]
        except threading.BrokenBarrierError:
            counts = []
        torch.set_num_threads(n)
        if counts != [1] * n or torch.get_num_threads() != n:
            # This build keeps the thread count process-wide: chunks stay in the caller's thread.
            pool.shutdown(wait=False)
            _pool_unusable = True
            return None
        _pool, _pool_size = pool, n
        return pool


def _threads_after(barrier: threading.Barrier) -> int:
    barrier.wait()  # one task per worker
    return torch.get_num_threads()


def map_row_chunks(
    fn: Callable[[slice, T | None], object],
    n_rows: int,
    step: int,
    device: torch.device,
    make_workspace: Callable[[], T] | None = None,
) -> None:
    """Call fn(rows, workspace) for consecutive row slices of ``step`` rows.

    On CPU with more than one chunk the calls run concurrently on the worker pool, each with a
    workspace from ``make_workspace`` that no other call uses at the same time; fn must only write
    to its own rows. Elsewhere they run in order in the caller's thread.
    """
    starts = range(0, n_rows, step)
    pool = _cpu_pool() if device.type == "cpu" and len(starts) > 1 else None
    if pool is None:
        work = make_workspace() if make_workspace is not None else None
        for start in starts:
            fn(slice(start, min(start + step, n_rows)), work)
        return

    free: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(min(_pool_size, len(starts))):
        free.put(make_workspace() if make_workspace is not None else None)

    def task(start: int) -> None:
        work = free.get()
        try:
            with torch.no_grad():  # grad mode is per thread; workers must not record a graph
                fn(slice(start, min(start + step, n_rows)), work)
        finally:
            free.put(work)

    for _ in pool.map(task, starts):
        pass
