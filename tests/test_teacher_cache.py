"""Cached teacher outputs: runs with the cache (cold and warm) end with the student weights of runs without it,
bit for bit, for KD and MetaDistil's frozen phase; a changed teacher or changed inputs never hit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_trackers import jsonl_values
from test_trainer import final_weights, save_tiny_bert, tiny_config
from transformers import BertForSequenceClassification

from metadistil_scale.config import ConfigError, load_config
from metadistil_scale.teacher_cache import TeacherCache, row_keys, teacher_fingerprint
from metadistil_scale.trainer import train

# 32 train rows in batches of 8: 4 steps an epoch, so the second epoch revisits every row in other batches.
SHORT = ("methods=[kd, metadistil]", "data.max_train_examples=32", "student_train.max_steps=8", "eval_every=8",
         "meta.frozen_steps=6", "meta.interval=1")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cache_models")
    return save_tiny_bert(root / "teacher", 2, 2, seed=0), save_tiny_bert(root / "student", 2, 2, seed=1)


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*/rows-*.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    for method in ("kd", "metadistil"):
        wa, wb = final_weights(a, method), final_weights(b, method)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), method


@pytest.mark.slow
def test_cached_runs_equal_an_uncached_run_bit_for_bit(tmp_path, tiny_pair):
    teacher, student = tiny_pair
    cache = tmp_path / "cache"
    plain = tmp_path / "plain"
    train(tiny_config(plain, teacher, student, *SHORT))
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    train(tiny_config(cold, teacher, student, *SHORT, "teacher_cache.enabled=true", f"teacher_cache.dir={cache}"))
    written = shards(cache)
    assert len({p.parent for p in written}) == 1  # one teacher, one folder
    assert_same_weights(plain, cold)
    # Later epochs found rows that earlier batches, of other rows, had computed: batch-invariance is tested too.
    rates = [rate for _, rate in jsonl_values(cold / "kd", "teacher_cache_hit_rate")]
    assert rates[:4] == [0.0] * 4 and 0 < max(rates[4:]) <= 1

    # The second run finds every row it needs: it computes nothing and writes no new shard.
    train(tiny_config(warm, teacher, student, *SHORT, "teacher_cache.enabled=true", f"teacher_cache.dir={cache}"))
    assert shards(cache) == written
    assert_same_weights(plain, warm)
    assert {rate for _, rate in jsonl_values(warm / "metadistil", "teacher_cache_hit_rate")} == {1.0}


def test_cache_hits_only_the_same_teacher_and_inputs(tmp_path, tiny_pair):
    teacher_dir, _ = tiny_pair
    teacher = BertForSequenceClassification.from_pretrained(teacher_dir).eval()
    fingerprint = teacher_fingerprint(teacher, "cpu")
    assert teacher_fingerprint(BertForSequenceClassification.from_pretrained(teacher_dir), "cpu") == fingerprint
    with torch.no_grad():  # one ulp of one weight is another teacher
        weight = teacher.classifier.weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))
    assert teacher_fingerprint(teacher, "cpu") != fingerprint

    ids = torch.tensor([[101, 2000, 2001, 102, 0], [101, 2000, 2001, 102, 0]])
    mask = (ids != 0).long()
    keys = row_keys({"input_ids": ids, "attention_mask": mask})
    assert keys[0] == keys[1]  # the same row is the same key wherever it sits
    assert row_keys({"input_ids": ids[:, :4], "attention_mask": mask[:, :4]})[0] != keys[0]  # other padding
    assert row_keys({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0] != keys[0]


def test_cache_returns_what_the_teacher_computes_and_persists_it(tmp_path, tiny_pair):
    from metadistil_scale.backends.torch_backend import TorchModel

    teacher = TorchModel(BertForSequenceClassification.from_pretrained(tiny_pair[0]).eval(), None)
    batch = {"input_ids": torch.randint(1000, 3000, (6, 10)), "attention_mask": torch.ones(6, 10, dtype=torch.long)}
    with torch.no_grad():
        live = teacher(batch)
    with TeacherCache(tmp_path) as cache:
        assert torch.equal(cache.logits(teacher, {k: v[:4] for k, v in batch.items()}), live[:4])
        assert torch.equal(cache.logits(teacher, batch), live)  # 4 rows cached, 2 computed
        assert (cache.hits, cache.misses) == (4, 6)
    reopened = TeacherCache(tmp_path)
    assert torch.equal(reopened.logits(teacher, batch), live) and reopened.misses == 0


def test_cache_with_a_sharded_teacher_is_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    with pytest.raises(ConfigError, match="^teacher_cache.enabled: expected false with deepspeed_teacher"):
        load_config(None, ["teacher_cache.enabled=true", f"deepspeed_teacher={ds}"])
