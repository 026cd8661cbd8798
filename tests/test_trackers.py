"""Trackers: a real tiny run logs to TensorBoard, MLflow (local file store) and W&B (offline), and each
tracker's own files are read back against metrics.jsonl; a tracker whose package is missing stops the run
before any work."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest
from test_trainer import save_tiny_bert, tiny_config

from metadistil_scale.cli import main
from metadistil_scale.trainer import StopRequested, train


def jsonl_values(stage: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in each record of a stage's metrics.jsonl that has it."""
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if key in r]


def jsonl_series(out: Path, key: str) -> list[tuple[int, float]]:
    return jsonl_values(out / "kd", key)


def mlflow_kd_run(out: Path):
    """The MLflow client on the run's file store and its one run of the kd stage."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as the tracker sets it for a file store
    client = MlflowClient(tracking_uri=(out / "tracking" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(out.name)  # the run folder's name
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def tracked_config(out: Path, models: tuple[Path, Path], *extra: str):
    return tiny_config(out, *models, "methods=[kd]", "trackers=[tensorboard, mlflow, wandb]", *extra)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """W&B offline, MLflow and W&B on their defaults (the run's own folders): nothing leaves the machine."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        mp.delenv(name, raising=False)
    root = tmp_path_factory.mktemp("tracked")
    yield save_tiny_bert(root / "teacher", 2, 2, seed=0), save_tiny_bert(root / "student", 2, 2, seed=1)
    mp.undo()


@pytest.fixture(scope="module")
def tracked_run(offline, tmp_path_factory) -> Path:
    """A 6-step KD run (teacher given) with all three trackers."""
    out = tmp_path_factory.mktemp("tracked_run") / "run"
    train(tracked_config(out, offline))
    return out


@pytest.mark.slow
def test_tensorboard_events_hold_every_record(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tracking" / "tensorboard" / "kd"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "dev_accuracy"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        expected = jsonl_series(tracked_run, key)
        assert [s for s, _ in logged] == [s for s, _ in expected]
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config as a table


@pytest.mark.slow
def test_mlflow_file_store_holds_params_and_metrics(tracked_run):
    client, run = mlflow_kd_run(tracked_run)
    assert run.info.run_name == "kd" and run.info.status == "FINISHED"
    assert run.data.params["student_train.max_steps"] == "6"
    assert run.data.params["methods"] == '["kd"]'
    for key in ("loss", "dev_accuracy"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == jsonl_series(tracked_run, key)


def wandb_records(path: Path):
    """The records of a .wandb run file: W&B's 7-byte header, then a LevelDB-style log (32 KiB blocks, each
    record a 7-byte header: crc32, length, type; FULL=1, FIRST=2, MIDDLE=3, LAST=4) of Record protobufs."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, block = 7, b"", 32 * 1024
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(out: Path) -> tuple[set[str], list[tuple[int, float]], dict]:
    """The run ids, the (step, loss) history and the config of the W&B run files of the kd stage."""
    ids, history, config = set(), [], {}
    for run_file in sorted((out / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history.append((items["_step"], items["loss"]))
            elif kind == "run":
                assert record.run.display_name == "kd" and record.run.run_group == out.name
                ids.add(record.run.run_id)
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    return ids, history, config


@pytest.mark.slow
def test_wandb_offline_run_holds_history_and_config(tracked_run):
    ids, history, config = wandb_history(tracked_run)
    assert len(ids) == 1 and history == jsonl_series(tracked_run, "loss")
    assert config["student_train"]["max_steps"] == 6 and config["methods"] == ["kd"]


@pytest.mark.slow
def test_a_resumed_stage_continues_its_tracker_runs(offline, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    with pytest.raises(StopRequested):
        train(tracked_config(out, offline), stop_after=3)
    train(tracked_config(out, offline), resume=True)
    expected = jsonl_series(out, "loss")
    assert [s for s, _ in expected] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(out / "tracking" / "tensorboard" / "kd"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    client, run = mlflow_kd_run(out)  # one run, continued
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == expected
    ids, history, _ = wandb_history(out)  # offline: one folder per attempt, one run id (`wandb sync` joins them)
    assert len(ids) == 1 and history == expected


@pytest.mark.slow
def test_missing_tracker_package_stops_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # how Python marks a module as not importable
    out = tmp_path / "run"
    code = main(["train", "--set", f"output_dir={out}", "--set", "trackers=[tensorboard, mlflow]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: trackers: 'mlflow' needs the mlflow-skinny package")
    assert not out.exists()


@pytest.mark.slow
def test_experiment_runs_are_named_by_seed_and_plots_go_to_the_summary_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_image_task import write_fashion

    data = write_fashion(tmp_path / "fmnist")
    out = tmp_path / "exp"
    assert main(["experiment", "--output-dir", str(out)] + [f"--set={s}" for s in (
        "data.task=fashion_mnist", f"data.data_files.train={data}", "model.teacher=cv:resnet8",
        "model.student=cv:resnet8", "model.student_layers=null", "methods=[kd]", "seeds=[0]",
        "teacher_finetune.max_steps=2", "student_train.max_steps=2", "eval_every=2", "teacher_finetune.batch_size=8",
        "student_train.batch_size=8", "trackers=[tensorboard]",
    )]) == 0
    board = out / "tracking" / "tensorboard"
    for run in ("seed_0/teacher", "seed_0/kd"):
        events = EventAccumulator(str(board / run))
        events.Reload()
        assert [e.step for e in events.Scalars("dev_accuracy")] == [2]
    summary = EventAccumulator(str(board / "summary"))
    summary.Reload()
    assert summary.Tags()["images"] == ["dev_curves"]


def test_a_resumed_mlflow_run_skips_the_steps_it_logged_before_a_crash(tmp_path, monkeypatch):
    from metadistil_scale.trackers import MlflowTracker, RunInfo

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    info = RunInfo(tmp_path, "kd", "run", {"seed": 0})
    first = MlflowTracker(info)
    for step in (1, 2, 3):  # logged through step 3; the checkpoint the run resumes from is at step 2
        first.log_metrics({"loss": float(step)}, step)
    first.close(failed=True)
    resumed = MlflowTracker(info, resume_id=first.run_id)
    for step in (3, 4):
        resumed.log_metrics({"loss": float(step)}, step)
    resumed.close()
    run = resumed.client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"seed": "0"}
    history = resumed.client.get_metric_history(first.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]


@pytest.mark.slow
def test_lm_train_records_reach_tensorboard(tmp_path):
    """`lm-train` sends its stages' records to the trackers as `train` does: the teacher's fine-tuning stage and
    each method's, read back from the TensorBoard event files against metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_lm import VOCAB, save_tiny, tiny_corpus, tiny_llama, word_tokenizer
    from test_lm_teacher_cache import lm_train

    words = [f"w{i}" for i in range(VOCAB - 2)]
    teacher = save_tiny(tmp_path / "teacher", tiny_llama(2, seed=0), word_tokenizer(words))
    out = tmp_path / "run"
    lm_train(out, teacher, tiny_corpus(tmp_path / "corpus.txt", words), "trackers=[tensorboard]",
             "model.finetune_teacher=true", "teacher_finetune.max_steps=2", "eval_every=3")
    for stage, keys in (("teacher", ("loss", "grad_norm", "heldout_perplexity")),
                        ("kd", ("loss", "lr", "heldout_perplexity")),
                        ("metadistil", ("loss", "quiz_loss_before", "teacher_heldout_perplexity"))):
        events = EventAccumulator(str(out / "tracking" / "tensorboard" / stage))
        events.Reload()
        for key in keys:
            logged = [(e.step, e.value) for e in events.Scalars(key)]
            expected = jsonl_values(out / stage, key)
            assert logged and [s for s, _ in logged] == [s for s, _ in expected], (stage, key)
            assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), (stage, key)
    assert "config/text_summary" in events.Tags()["tensors"]
