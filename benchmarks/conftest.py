"""pytest-benchmark entries: the fused kernels, the causal-LM chunked losses and one training step per method.

    pytest benchmarks/ --benchmark-only        # every entry, each fused entry grouped with its baseline
    pytest benchmarks/ --benchmark-disable -q  # each entry run once, as a smoke test (no timing, no memory)

The entries live in test_bench_*.py (pytest's default test_*.py pattern collects them); the bench_*.py scripts
beside them hold the shared builders, peak_memory.py the subprocess-isolated memory measurement. The
repository's default `pytest` run (testpaths = ["tests"]) does not collect this directory.

After pytest-benchmark's own table, a summary prints each entry's median time and peak extra memory as
multiples of its group's baseline (eager, materialised, or the KD step): ratios taken within one run are
what to read on a shared machine.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

# Offline, as scripts/env.sh has it for the tests; set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from bench_kernels import default_repeats  # noqa: E402
from peak_memory import memory_info  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "triton: the entry runs the Triton kernels (skipped without CUDA)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("triton") is None:
        return
    if DEVICE != "cuda":
        pytest.skip("Triton kernels need CUDA; none here (the entries run the torch path on CPU instead)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 runs Triton in its interpreter; its timings would mean nothing")


@dataclass
class Entry:
    group: str
    name: str
    baseline: bool
    median_s: float
    peak_mib: float | None


_ENTRIES: list[Entry] = []


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def run(benchmark) -> Callable[..., None]:
    """run(fn, *args, group=, rounds=, baseline=False, memory=None): times fn(*args) with one warm-up round.

    memory() -> {"peak_extra_MiB": ..., ...} is called first, unless benchmarking is disabled, and lands in
    the entry's extra_info (saved with the run)."""

    def _run(fn: Callable, *args, group: str, rounds: int, baseline: bool = False,
             memory: Callable[[], dict] | None = None) -> None:
        benchmark.group = group
        if memory is not None and not benchmark.disabled:
            benchmark.extra_info.update(memory())
        benchmark.extra_info.update(baseline=baseline, torch_threads=torch.get_num_threads())
        target = fn
        if DEVICE == "cuda":

            def target(*a):  # kernels launch asynchronously; time them to completion
                out = fn(*a)
                torch.cuda.synchronize()
                return out

        benchmark.pedantic(target, args=args, rounds=rounds, warmup_rounds=1)
        if not benchmark.disabled:
            _ENTRIES.append(Entry(group, benchmark.name, baseline, benchmark.stats.stats.median,
                                  benchmark.extra_info.get("peak_extra_MiB")))

    return _run


@pytest.fixture
def run_op(run, device: str) -> Callable[..., None]:
    """run_op(module, op, impl, n, v, baseline=): an op of MODULE.OPS (peak_memory.py) on an n x v problem."""

    def _run_op(module: str, op: str, impl: str, n: int, v: int, *, baseline: str) -> None:
        make, impls = importlib.import_module(module).OPS[op]
        run(
            impls[impl],
            *make(n, v, device=device),
            group=f"{op} {device} {n}x{v}",
            rounds=default_repeats(n, v, vocab_scale=3),
            baseline=impl == baseline,
            memory=lambda: memory_info(module, op, impl, n, v, device),
        )

    return _run_op


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter) -> None:
    if not _ENTRIES:
        return
    write = terminalreporter.write_line
    write("")
    write("Ratios to each group's baseline (time: median / baseline's; memory: peak extra / baseline's):")
    write("| group | entry | median (ms) | time x baseline | peak extra (MiB) | memory x baseline |")
    write("|---|---|---|---|---|---|")
    groups = dict.fromkeys(e.group for e in _ENTRIES)
    for group in groups:
        entries = [e for e in _ENTRIES if e.group == group]
        base = next((e for e in entries if e.baseline), None)
        for e in sorted(entries, key=lambda e: not e.baseline):
            time_ratio = f"{e.median_s / base.median_s:.2f}" if base else "-"
            peak = f"{e.peak_mib:.1f}" if e.peak_mib is not None else "-"
            mem_ratio = (f"{e.peak_mib / base.peak_mib:.2f}"
                         if base and e.peak_mib is not None and base.peak_mib else "-")
            write(f"| {group} | {e.name} | {e.median_s * 1e3:.1f} | {time_ratio} | {peak} | {mem_ratio} |")
