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


@pytest.mark.slow
def test_lm_train_cli_on_two_deepspeed_ranks_equals_one_process(tmp_path):
    """`lm-train` under torchrun through the multi-process entry (teacher ZeRO-3, student ZeRO-2, each rank its
    slice of every batch) trains the same MetaDistil student as one process on the torch backend."""
    import json

    from safetensors.torch import load_file
    from test_lm import VOCAB, save_tiny, tiny_corpus, tiny_llama, word_tokenizer

    from metadistil_scale.cli import main

    words = [f"w{i}" for i in range(VOCAB - 2)]
    teacher = save_tiny(tmp_path / "teacher", tiny_llama(2, seed=0), word_tokenizer(words))
    corpus = tiny_corpus(tmp_path / "corpus.txt", words)
    for name, config in (("zero3", worker.ZERO3), ("zero2", worker.ZERO2)):
        (tmp_path / f"{name}.json").write_text(json.dumps(config))
    settings = [f"model.teacher={teacher}", f"data.source={corpus}", "data.seq_len=16", "data.quiz_fraction=0.1",
                "data.heldout_fraction=0.1", "student_train.batch_size=4", "student_train.max_steps=3",
                "meta.quiz_batch_size=2", "model.chunk_rows=5", "model.student_layers=[1]", "eval_batch_size=4",
                "eval_every=2", "methods=[metadistil]", "meta.teacher_optim.lr=1e-3"]
    args = [x for o in settings for x in ("--set", o)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "metadistil_scale.launch.deepspeed_train", "lm-train",
           "--output-dir", str(tmp_path / "ranks"), "--deepspeed-teacher", str(tmp_path / "zero3.json"),
           "--deepspeed-student", str(tmp_path / "zero2.json"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("| student | metadistil | 3 |") == 1  # rank 0 alone prints the table
    assert (tmp_path / "ranks" / "metadistil" / "last" / "latest").is_file()  # DeepSpeed's checkpoint layout

    assert main(["lm-train", "--output-dir", str(tmp_path / "one"), *args]) == 0
    ranks, one = (load_file(tmp_path / run / "metadistil" / "student" / "model.safetensors") for run in ("ranks", "one"))
    assert ranks.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(ranks[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    rows = [json.loads((tmp_path / run / "results.json").read_text())["rows"][-1] for run in ("ranks", "one")]
    assert rows[0]["heldout"]["perplexity"] == pytest.approx(rows[1]["heldout"]["perplexity"], rel=1e-5)
    assert rows[0]["teacher_heldout_after"]["perplexity"] == pytest.approx(
        rows[1]["teacher_heldout_after"]["perplexity"], rel=1e-5)
