"""The training recipe end to end on the embedded data: resume equivalence, outputs, bad input."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from metadistil_scale.checkpoint import CheckpointError, atomic_save
from metadistil_scale.config import load_config
from metadistil_scale.data.text import load_text_task
from metadistil_scale.models.text import ModelError, load_tokenizer
from metadistil_scale.trainer import StopRequested, train


def save_tiny_bert(folder: Path, layers: int, num_labels: int, seed: int) -> Path:
    """A small BERT with the real MiniLM vocabulary and tokenizer, so the real data pipeline runs fast."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(folder)
    load_tokenizer("embedded:minilm-l6").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return save_tiny_bert(root / "teacher", 2, 2, seed=0), save_tiny_bert(root / "student", 2, 2, seed=1)


def tiny_config(out: Path, teacher: Path, student: Path, *extra: str):
    return load_config(None, [
        f"output_dir={out}", f"model.teacher_checkpoint={teacher}", f"model.student={student}",
        "model.student_layers=1", "methods=[kd, metadistil]", "data.max_train_examples=256",
        "data.max_eval_examples=64", "data.max_length=24", "student_train.batch_size=8",
        "student_train.max_steps=6", "meta.quiz_batch_size=8", "eval_every=2", "log_every=1",
        "meta.teacher_optim.lr=1e-3", *extra,
    ])


def final_weights(out: Path, method: str) -> dict[str, torch.Tensor]:
    return load_file(out / method / "student" / "model.safetensors")


@pytest.mark.slow
def test_resume_ends_like_an_uninterrupted_run(tmp_path, tiny_models):
    teacher, student = tiny_models
    full = train(tiny_config(tmp_path / "full", teacher, student))

    interrupted = tmp_path / "interrupted"
    with pytest.raises(StopRequested):  # a pre-emption in the middle of the kd stage
        train(tiny_config(interrupted, teacher, student), stop_after=3)
    assert (interrupted / "kd" / "last.pt").exists() and not (interrupted / "kd" / "done.json").exists()
    with pytest.raises(StopRequested):  # and again in the middle of the metadistil stage
        train(tiny_config(interrupted, teacher, student), resume=True, stop_after=5)
    resumed = train(tiny_config(interrupted, teacher, student), resume=True)

    for a, b in zip(full["rows"], resumed["rows"]):
        assert a["test"] == b["test"] and a.get("best_dev") == b.get("best_dev")
        assert a.get("teacher_test") == b.get("teacher_test")
    for method in ("kd", "metadistil"):
        want, got = final_weights(tmp_path / "full", method), final_weights(interrupted, method)
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
        full_log = (tmp_path / "full" / method / "metrics.jsonl").read_text().splitlines()
        resumed_log = (interrupted / method / "metrics.jsonl").read_text().splitlines()
        drop_times = [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")} for line in full_log]
        assert drop_times == [
            {k: v for k, v in json.loads(line).items() if not k.startswith("time_")} for line in resumed_log
        ]


@pytest.mark.slow
def test_outputs_a_user_can_load(tmp_path, tiny_models):
    teacher, student = tiny_models
    out = tmp_path / "run"
    results = train(tiny_config(out, teacher, student))
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert [r["method"] for r in saved["rows"]] == ["finetune", "kd", "metadistil"]
    assert "teacher_test" in saved["rows"][2]
    model = AutoModelForSequenceClassification.from_pretrained(out / "metadistil" / "student")
    assert model.config.num_hidden_layers == 1 and model.config.num_labels == 2
    assert (out / "config.yaml").exists()
    records = [json.loads(line) for line in (out / "metadistil" / "metrics.jsonl").read_text().splitlines()]
    assert {"quiz_loss_before", "quiz_loss_after", "teacher_grad_norm", "time_tangent"} <= records[0].keys()
    assert any("teacher_dev_accuracy" in r for r in records)
    # The meta-trained teacher moved away from the fine-tuned one.
    before = load_file(teacher / "model.safetensors")
    after = load_file(out / "metadistil" / "best" / "teacher" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_label_count_mismatch_is_refused(tmp_path, tiny_models):
    _, student = tiny_models
    three_way = save_tiny_bert(tmp_path / "teacher3", 1, 3, seed=0)
    with pytest.raises(ModelError, match="trained with 3 labels, the task has 2"):
        train(tiny_config(tmp_path / "out", three_way, student))


def test_checkpoint_from_another_config_is_refused(tmp_path, tiny_models):
    teacher, student = tiny_models
    out = tmp_path / "run"
    with pytest.raises(StopRequested):
        train(tiny_config(out, teacher, student, "methods=[kd]"), stop_after=2)
    with pytest.raises(CheckpointError, match=r"written by another configuration \(distill.temperature: checkpoint 5.0 vs now 2.0\)"):
        train(tiny_config(out, teacher, student, "methods=[kd]", "distill.temperature=2.0"), resume=True)


def test_a_failed_write_leaves_the_good_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("disk full")

    with pytest.raises(pickle.PicklingError):
        atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=False) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no stray temporary


def test_truncated_checkpoint_is_reported(tmp_path, tiny_models):
    teacher, student = tiny_models
    out = tmp_path / "run"
    with pytest.raises(StopRequested):
        train(tiny_config(out, teacher, student, "methods=[kd]"), stop_after=2)
    last = out / "kd" / "last.pt"
    last.write_bytes(last.read_bytes()[: os.path.getsize(last) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        train(tiny_config(out, teacher, student, "methods=[kd]"), resume=True)


@pytest.mark.slow
def test_short_kd_run_beats_the_majority_class(tmp_path):
    """The real pretrained MiniLM teacher and 3-layer student on the embedded data, with a small budget."""
    cfg = load_config(None, [
        f"output_dir={tmp_path}", "methods=[kd]", "data.max_eval_examples=512", "data.max_length=48",
        "teacher_finetune.max_steps=80", "teacher_finetune.batch_size=16", "teacher_finetune.optim.lr=1e-4",
        "student_train.max_steps=100", "student_train.optim.lr=2e-4", "eval_every=50",
    ])
    results = train(cfg)
    splits, _ = load_text_task(max_eval_examples=512)
    labels = torch.tensor(splits["dev"]["label"])
    majority = max(float((labels == c).float().mean()) for c in (0, 1))
    kd_row = results["rows"][1]
    assert kd_row["method"] == "kd"
    assert kd_row["best_dev"] > majority + 0.05, (kd_row, majority)
