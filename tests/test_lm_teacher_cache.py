"""The causal LM's teacher cache keeps the teacher's top-k tempered log-probabilities per token: the KD loss on it
matches a hand-written coarsened KL, its error against the full teacher shrinks with k and vanishes at k = V, and
`lm-train` with the cache reads a warm cache bit for bit as it wrote it cold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_lm import (
    TEMPERATURE,
    VOCAB,
    batch,
    pair,
    reference_kd_sum,
    save_tiny,
    tiny_corpus,
    tiny_llama,
    word_tokenizer,
)
from test_trackers import jsonl_values

from metadistil_scale.config import ConfigError, DistillConfig
from metadistil_scale.lm.chunked import IGNORE_INDEX, HeadLogits, head_kd_loss_sum, head_top_k
from metadistil_scale.lm.models import CausalLMHead
from metadistil_scale.lm.recipe import load_lm_config

ALPHA = 0.5
DISTILL = DistillConfig(alpha=ALPHA, temperature=TEMPERATURE)


def tiny_lm_logits() -> tuple[torch.Tensor, HeadLogits, torch.Tensor]:
    """The tiny pair's student logits [N, V] (float64), the teacher's HeadLogits and the labels, on one batch."""
    teacher, student = pair()
    b = batch("packed", 12, seed=3)
    with torch.no_grad():
        z_s = CausalLMHead(student, chunk_rows=7)(**b["student"]).materialize()
        z_t = CausalLMHead(teacher, chunk_rows=7)(**b["teacher"])
    return z_s, z_t, b["labels"].reshape(-1)


def loss_and_grad(z_s: torch.Tensor, teacher, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The chunked KD loss of logits z_s and its gradient w.r.t. them (z_s = z_s · I through the head)."""
    leaf = z_s.clone().requires_grad_(True)
    eye = torch.eye(z_s.shape[1], dtype=z_s.dtype)
    loss = head_kd_loss_sum(HeadLogits(leaf, eye, chunk_rows=7), teacher, labels, DISTILL)
    loss.backward()
    return float(loss.detach()), leaf.grad


def coarsened_kd_sum(z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """α·CE + (1−α)·T²·KL(p̃ ‖ q̃) written out on [N, V]: each distribution as its teacher-top-k entries and one
    entry for the rest's mass."""
    p, q = F.softmax(z_t / TEMPERATURE, -1), F.softmax(z_s / TEMPERATURE, -1)
    top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, p.topk(k, -1).indices, True)
    coarse = [torch.cat([d[top].reshape(len(d), k), (d * ~top).sum(-1, keepdim=True)], -1) for d in (p, q)]
    valid = labels != IGNORE_INDEX
    kl = F.kl_div(coarse[1][valid].log(), coarse[0][valid], reduction="sum")
    ce = F.cross_entropy(z_s, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return ALPHA * ce + (1 - ALPHA) * TEMPERATURE**2 * kl


def test_top_k_kd_loss_equals_the_coarsened_kl_written_out():
    z_s, z_t, labels = tiny_lm_logits()
    got, got_grad = loss_and_grad(z_s, head_top_k(z_t, 5, TEMPERATURE), labels)
    leaf = z_s.clone().requires_grad_(True)
    want = coarsened_kd_sum(leaf, z_t.materialize(), labels, 5)
    want.backward()
    assert got == pytest.approx(float(want.detach()), rel=1e-12)
    torch.testing.assert_close(got_grad, leaf.grad, rtol=1e-10, atol=1e-12)


def top_k_errors(ks: list[int]) -> list[tuple[float, float]]:
    """(|loss error| / loss, ‖gradient error‖ / ‖gradient‖) of the top-k cache against the full teacher."""
    z_s, z_t, labels = tiny_lm_logits()
    leaf = z_s.clone().requires_grad_(True)
    full = reference_kd_sum(leaf, z_t.materialize(), labels, soft="kl", alpha=ALPHA)  # torch's own softmaxes
    full.backward()
    full = float(full.detach())
    errors = []
    for k in ks:
        loss, grad = loss_and_grad(z_s, head_top_k(z_t, k, TEMPERATURE), labels)
        errors.append((abs(loss - full) / full, float((grad - leaf.grad).norm() / leaf.grad.norm())))
    return errors


def test_top_k_error_shrinks_with_k_and_vanishes_at_the_vocabulary():
    errors = top_k_errors([1, 4, 16, VOCAB])
    loss_errors, grad_errors = zip(*errors)
    assert all(a > b for a, b in zip(loss_errors, loss_errors[1:])), errors
    assert all(a > b for a, b in zip(grad_errors, grad_errors[1:])), errors
    assert loss_errors[-1] < 1e-13 and grad_errors[-1] < 1e-12, errors
    assert loss_errors[0] > 1e-4  # k = 1 on a 37-token vocabulary is visibly approximate


def test_cache_keeps_the_live_teachers_top_k_by_row_and_reads_it_back(tmp_path):
    from metadistil_scale.backends.torch_backend import TorchModel
    from metadistil_scale.teacher_cache import TeacherCache, TopKRows

    teacher = TorchModel(CausalLMHead(pair()[0].eval(), chunk_rows=7), None)
    inputs = batch("padded", 10, seed=5)["teacher"]
    first = {name: t[:3] for name, t in inputs.items()}
    with torch.no_grad():
        live = head_top_k(teacher(inputs), 6, TEMPERATURE)
    with TeacherCache(tmp_path, TopKRows(6, TEMPERATURE)) as cache:
        cache.logits(teacher, first)
        got = cache.logits(teacher, inputs)  # 3 rows cached, the others computed
        assert (cache.hits, cache.misses) == (3, len(inputs["input_ids"]))
    reopened = TeacherCache(tmp_path, TopKRows(6, TEMPERATURE)).logits(teacher, inputs)
    for result in (got, reopened):
        assert torch.equal(result.indices, live.indices)
        torch.testing.assert_close(result.logprobs, live.logprobs, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result.rest, live.rest, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- lm-train with the cache


def lm_train(out: Path, teacher: str, corpus: str, *extra: str) -> None:
    from metadistil_scale.cli import main

    settings = [f"model.teacher={teacher}", f"data.source={corpus}", "data.seq_len=16", "data.quiz_fraction=0.1",
                "data.heldout_fraction=0.1", "student_train.batch_size=4", "student_train.max_steps=6",
                "meta.quiz_batch_size=2", "model.chunk_rows=5", "model.student_layers=[1]", "eval_batch_size=4",
                "eval_every=6", "methods=[kd, metadistil]", "meta.frozen_steps=4", "distill.temperature=2.0", *extra]
    assert main(["lm-train", "--output-dir", str(out), *[x for o in settings for x in ("--set", o)]]) == 0


def student_weights(out: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(out / method / "student" / "model.safetensors")


@pytest.mark.slow
def test_lm_train_with_the_top_k_cache(tmp_path):
    words = [f"w{i}" for i in range(VOCAB - 2)]
    teacher = save_tiny(tmp_path / "teacher", tiny_llama(2, seed=0), word_tokenizer(words))
    corpus = tiny_corpus(tmp_path / "corpus.txt", words)
    cache = tmp_path / "cache"
    lm_train(tmp_path / "plain", teacher, corpus)
    exact = ("teacher_cache.enabled=true", f"teacher_cache.dir={cache}", f"teacher_cache.top_k={VOCAB}")
    lm_train(tmp_path / "cold", teacher, corpus, *exact)
    lm_train(tmp_path / "warm", teacher, corpus, *exact)
    lm_train(tmp_path / "top2", teacher, corpus, "teacher_cache.enabled=true", f"teacher_cache.dir={cache}",
             "teacher_cache.top_k=2")

    folders = sorted(cache.iterdir())  # one teacher, two k: a folder each
    assert [f.name.split("-", 1)[1] for f in folders] == sorted([f"top{VOCAB}-t2", "top2-t2"])
    (folder,) = [f for f in folders if f.name.endswith(f"-top{VOCAB}-t2")]
    shards = [load_file(p) for p in folder.glob("rows-*.safetensors")]
    assert len(shards) == 1  # the warm run computed nothing and wrote nothing
    (shard,) = shards
    tokens = int(shard["tokens"].sum())
    per_token = sum(t.numel() * t.element_size() for n, t in shard.items() if n not in ("keys", "tokens")) / tokens
    assert per_token == 8 * VOCAB + 4  # int32 ids, float32 log-probabilities, the rest's log-mass

    for method in ("kd", "metadistil"):
        plain, cold, warm = (student_weights(tmp_path / run, method) for run in ("plain", "cold", "warm"))
        assert all(torch.equal(cold[k], warm[k]) for k in cold), method  # warm reads what cold wrote
        for k in plain:  # k = V: the cached loss is the full KD loss (float32, another summation order)
            torch.testing.assert_close(cold[k], plain[k], rtol=1e-5, atol=1e-6, msg=f"{method} {k}")
        top2 = student_weights(tmp_path / "top2", method)
        assert max(float((top2[k] - plain[k]).abs().max()) for k in plain) > 1e-5  # the cache is what trained
    rates = [rate for _, rate in jsonl_values(tmp_path / "warm" / "metadistil", "teacher_cache_hit_rate")]
    assert rates == [1.0] * 4  # the 4 frozen steps, all from the cache; the meta-updated teacher runs live


def test_top_k_cache_config_is_checked():
    with pytest.raises(ConfigError, match="^teacher_cache.top_k: expected >= 1, got 0$"):
        load_lm_config(None, ["teacher_cache.top_k=0"])
    with pytest.raises(ConfigError, match="^teacher_cache.enabled: expected false unless distill is"):
        load_lm_config(None, ["teacher_cache.enabled=true", "distill.soft_loss=mse"])
