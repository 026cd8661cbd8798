"""Causal-LM distillation at vocabulary scale: one KD step and one MetaDistil step, row-chunked vs materialised.

    python benchmarks/bench_lm.py                          # the grid below, a markdown table on stdout
    python benchmarks/bench_lm.py --vocab 8192 --tokens 512  # a smaller grid

A small Llama (hidden 64, 2 teacher layers, the student its layer 0, tied embeddings) isolates the [tokens × V]
part of the step: chunked = logits, tangent and cotangent made CHUNK_ELEMENTS (4M) logits at a time from the final
hidden states and the head (lm/chunked.py); materialised = the same step on the models' [N, V] logits (the
classification path of meta.py, with the same fused kernels). MetaDistil: u by JVP, lean schedule, quiz batch N/4
tokens. Every configuration runs in its own process; it builds the models and batches, runs one warm-up step, then
one timed step (wall time, and the process's CPU time, which a shared machine disturbs less), and reports the
process's peak resident memory (ru_maxrss) and the part of it above the resident
memory just before the steps (what the steps themselves added: activations, [N, V] temporaries, gradients and
optimizer state).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from functools import partial

VOCABS = (8192, 32768, 131072)
TOKENS = (512, 2048)
SEQ_LEN = 256


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(vocab: int, tokens: int, method: str, path: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from metadistil_scale.backends.torch_backend import TorchModel
    from metadistil_scale.config import DistillConfig, MetaConfig, OptimConfig
    from metadistil_scale.lm.models import CausalLMHead, student_from_layers
    from metadistil_scale.meta import MetaDistil
    from metadistil_scale.steps import kd_step

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                         tie_word_embeddings=True, attn_implementation="eager")
    teacher = LlamaForCausalLM(config)
    student = student_from_layers(teacher, [0])
    materialize = path == "materialised"
    optim = OptimConfig(lr=1e-4, warmup_ratio=0.0, schedule="constant")
    t = TorchModel(CausalLMHead(teacher, materialize=materialize), optim if method == "metadistil" else None, 10)
    s = TorchModel(CausalLMHead(student, materialize=materialize), optim, 10)

    def batch(n_tokens: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (max(1, n_tokens // SEQ_LEN), SEQ_LEN), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        inputs = {"input_ids": ids}
        return {"teacher": inputs, "student": inputs, "labels": labels.reshape(-1)}

    distill = DistillConfig(alpha=0.5, temperature=2.0)
    meta = MetaDistil(t, s, distill, MetaConfig(pilot_lr=1e-4, u_mode="jvp", schedule="lean"))

    def step(i: int) -> None:
        parts = [batch(tokens, seed=i)]
        if method == "kd":
            kd_step(t, s, parts, distill, regression=False)
        else:
            meta.step(parts, [batch(tokens // 4, seed=1000 + i)])

    before = _rss_mb()
    step(0)
    start, cpu_start = time.perf_counter(), time.process_time()
    step(1)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"vocab": vocab, "tokens": tokens, "method": method, "path": path, "step_s": seconds,
            "step_cpu_s": cpu_seconds, "peak_rss_mb": peak, "step_mb": peak - before,
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- the [N, V] part alone (pytest-benchmark)

HIDDEN = 64
HEAD_DISTILL = {"alpha": 0.5, "temperature": 2.0}


def make_head_inputs(n: int, v: int, seed: int = 0, device: str = "cpu") -> tuple:
    """Final hidden states [n, d] and heads [v, d] of a student and a teacher, a tangent (dH, dW) of the
    student's, and next-token labels with every 16th row ignored."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device)

    head = HIDDEN**-0.5  # logits of unit scale
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::16] = -100
    return (randn(n, HIDDEN), randn(v, HIDDEN, scale=head), randn(n, HIDDEN), randn(v, HIDDEN, scale=head),
            randn(n, HIDDEN), randn(v, HIDDEN, scale=head), labels.to(device))


def head_kd_step(h_s, w_s, h_t, w_t, dh, dw, labels, *, chunked: bool) -> tuple:
    """The student's KD loss summed over tokens, forward + backward to its hidden states and head."""
    from metadistil_scale.config import DistillConfig
    from metadistil_scale.lm.chunked import HeadLogits
    from metadistil_scale.losses import student_loss_sum
    from metadistil_scale.objectives import Objective

    h, w = h_s.detach().requires_grad_(True), w_s.detach().requires_grad_(True)
    student, teacher = HeadLogits(h, w), HeadLogits(h_t, w_t)
    if not chunked:
        student, teacher = student.materialize(), teacher.materialize()
    student_loss_sum(student, teacher, labels, Objective.from_config(DistillConfig(**HEAD_DISTILL))).backward()
    return h.grad, w.grad


def head_cotangent_step(h_s, w_s, h_t, w_t, dh, dw, labels, *, chunked: bool) -> tuple:
    """From u = dH W_sᵀ + H_s dWᵀ to J_tᵀ w at the teacher's hidden states and head: the meta cotangent w
    and its push-back (meta.py's teacher_cotangent and contract)."""
    import torch

    from metadistil_scale.config import DistillConfig
    from metadistil_scale.lm.chunked import HeadLogits
    from metadistil_scale.losses import contract, tangent_from_jvp, teacher_cotangent
    from metadistil_scale.objectives import Objective

    h, w = h_t.detach().requires_grad_(True), w_t.detach().requires_grad_(True)
    teacher = HeadLogits(h, w)
    tangent = tangent_from_jvp(HeadLogits(h_s, w_s), HeadLogits(dh, dw))
    if not chunked:
        all_rows = torch.arange(len(labels), device=labels.device)
        teacher, tangent = teacher.materialize(), tangent.rows(all_rows)
    cotangent = teacher_cotangent(teacher, tangent, None, Objective.from_config(DistillConfig(**HEAD_DISTILL)),
                                  pilot_lr=1e-4, n_rows=len(labels), labels=labels)
    contract(teacher, cotangent).backward()
    return h.grad, w.grad


# op -> (inputs of N tokens and vocabulary V, path -> step); peak_memory.py measures these
OPS = {
    op: (make_head_inputs, {"materialised": partial(fn, chunked=False), "chunked": partial(fn, chunked=True)})
    for op, fn in (("lm_kd_loss", head_kd_step), ("lm_cotangent", head_cotangent_step))
}


def markdown(rows: list[dict]) -> str:
    by = {(r["vocab"], r["tokens"], r["method"], r["path"]): r for r in rows}
    lines = ["| step | V | N | chunked: wall / CPU time (s) | peak RSS (MB) | added by the steps (MB) "
             "| materialised: wall / CPU time (s) | peak RSS (MB) | added by the steps (MB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in ("kd", "metadistil"):
        for vocab in sorted({r["vocab"] for r in rows}):
            for tokens in sorted({r["tokens"] for r in rows}):
                cells = []
                for path in ("chunked", "materialised"):
                    r = by.get((vocab, tokens, method, path))
                    cells += ([f"{r['step_s']:.2f} / {r['step_cpu_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                               f"{r['step_mb']:.0f}"] if r
                              else ["-", "-", "-"])
                name = "KD" if method == "kd" else "MetaDistil"
                lines.append(f"| {name} | {vocab // 1024}k | {tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="*", default=list(VOCABS))
    parser.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    parser.add_argument("--method", nargs="*", default=["kd", "metadistil"], choices=["kd", "metadistil"])
    parser.add_argument("--path", nargs="*", default=["chunked", "materialised"], choices=["chunked", "materialised"])
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one configuration
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.vocab[0], args.tokens[0], args.method[0], args.path[0])))
        return
    rows = []
    for method in args.method:
        for vocab in args.vocab:
            for tokens in args.tokens:
                for path in args.path:
                    cmd = [sys.executable, __file__, "--one", "--vocab", str(vocab), "--tokens", str(tokens),
                           "--method", method, "--path", path]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        print(f"{method} V={vocab} N={tokens} {path}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                        continue
                    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    print(markdown(rows))


if __name__ == "__main__":
    main()
