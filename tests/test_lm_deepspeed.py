"""Two DeepSpeed ranks (teacher ZeRO-3, student ZeRO-2) take the same MetaDistil steps on the tiny causal LM as one
process with the torch backend (slow: launches torchrun; the first run compiles DeepSpeed's CPU comm op)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")

import lm_deepspeed_worker as worker  # noqa: E402  (tests/ is on sys.path under pytest)

from metadistil_scale.backends.torch_backend import TorchModel  # noqa: E402
from metadistil_scale.lm.models import CausalLMHead  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_deepspeed_zero3_teacher_equals_one_process(tmp_path):
    out = tmp_path / "ranks.pt"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), worker.__file__, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = torch.load(out)
    assert ranks["world"] == 2

    teacher_lm, student_lm, rows, quiz = worker.build()
    teacher_lm.eval()
    start = {n: p.detach().clone() for n, p in teacher_lm.named_parameters()}
    teacher = TorchModel(CausalLMHead(teacher_lm, chunk_rows=5), worker.TEACHER_OPTIM, worker.STEPS)
    student = TorchModel(CausalLMHead(student_lm, chunk_rows=5), worker.STUDENT_OPTIM, worker.STEPS)
    worker.run_steps(teacher, student, rows, quiz, rank=0, world=1)

    for role, lm in (("teacher", teacher_lm), ("student", student_lm)):
        for name, p in lm.named_parameters():
            torch.testing.assert_close(ranks[role][name], p.detach(), rtol=1e-5, atol=1e-6, msg=f"{role} {name}")
    moved = max(float((teacher_lm.get_parameter(n).detach() - s).abs().max()) for n, s in start.items())
    assert moved > 1e-4  # the teacher really was meta-updated
