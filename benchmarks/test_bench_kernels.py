"""The fused KD loss (forward + backward) and the meta cotangent against eager torch, at two sizes.

fused-torch is the row-chunked torch path (the one CPUs run); fused-triton needs CUDA. The ops are
bench_kernels.py's.
"""

from __future__ import annotations

import pytest
from bench_kernels import OPS

SHAPES = [(4096, 100), (2048, 32000)]
IMPLS = ["eager", "fused-torch", pytest.param("fused-triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("n,v", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
def test_kernel(run_op, op: str, impl: str, n: int, v: int) -> None:
    run_op("bench_kernels", op, impl, n, v, baseline="eager")
