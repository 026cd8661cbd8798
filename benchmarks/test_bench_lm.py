"""Causal-LM distillation at vocabulary scale, chunked (lm/chunked.py) against materialised [N, V] logits.

The [N, V] part of a step alone, for N tokens with hidden size 64: the student's KD loss (forward + backward
to its final hidden states and head) and the meta cotangent (u from its factors to J_tᵀ w at the teacher's
hidden states and head). 1024 x 32768 is 8 chunks of 4M logits. The ops are bench_lm.py's; whole LM steps are
`python benchmarks/bench_lm.py`'s.
"""

from __future__ import annotations

import pytest
from bench_lm import OPS

SHAPES = [(1024, 32768)]


@pytest.mark.parametrize("path", ["materialised", "chunked"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("n,v", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
def test_head(run_op, op: str, path: str, n: int, v: int) -> None:
    run_op("bench_lm", op, path, n, v, baseline="materialised")
