"""One training step per method (bench_step.py's configurations and builder) on the tiny BERT pair (a 4-layer
x 128 teacher -> 2 layers, random weights), batch 8, length 32, CPU. KD is the group's baseline.

A MetaDistil step of this pair takes a fraction of a second on an idle core, so the seven methods stay cheap;
`python benchmarks/bench_step.py` measures the MiniLM pair at batch 32, length 128."""

from __future__ import annotations

import itertools

import pytest
from bench_step import CONFIGS, make_step, measure

PAIR, BATCH, LENGTH, ROUNDS = "tiny", 8, 32, 5
# The host allocator as glibc sets it: the trainer's cpu_allocator=retain is process-wide, and this process
# runs the other entries too.
ALLOCATOR = "system"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step(run, name: str) -> None:
    step = make_step(name, PAIR, BATCH, LENGTH, n_batches=ROUNDS + 1)
    batch = itertools.count()
    run(
        lambda: step(next(batch)),
        group=f"training step cpu {PAIR} b{BATCH} l{LENGTH}",
        rounds=ROUNDS,
        baseline=name == "kd",
        memory=lambda: _memory(name),
    )


def _memory(name: str) -> dict:
    row = measure(name, PAIR, BATCH, LENGTH, steps=1, allocator=ALLOCATOR)
    return {"peak_extra_MiB": round(row["step_peak_mb"], 1), "memory_method": "VmHWM - RSS before 2 steps"}
