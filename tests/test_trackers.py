"""Trackers: a real tiny run logs to TensorBoard, MLflow (local file store) and W&B (offline), and each
tracker's own files are read back against metrics.jsonl; a tracker whose package is missing stops the run
before any work."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from test_trainer import save_tiny_bert, tiny_config

from metadistil_scale.cli import main
from metadistil_scale.trainer import train


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    """A 6-step KD run (teacher given) with all three trackers, W&B offline: nothing leaves the machine."""
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        mp.delenv(name, raising=False)
    root = tmp_path_factory.mktemp("tracked")
    teacher = save_tiny_bert(root / "teacher", 2, 2, seed=0)
    student = save_tiny_bert(root / "student", 2, 2, seed=1)
    out = root / "run"
    try:
        train(tiny_config(out, teacher, student, "methods=[kd]", "trackers=[tensorboard, mlflow, wandb]"))
    finally:
        mp.undo()
    return out


def jsonl_values(stage: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in each record of a stage's metrics.jsonl that has it."""
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if key in r]


def jsonl_series(out: Path, key: str) -> list[tuple[int, float]]:
    return jsonl_values(out / "kd", key)


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
def test_mlflow_file_store_holds_params_and_metrics(tracked_run, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tracked_run / "tracking" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("run")  # the run folder's name
    (run,) = client.search_runs([experiment.experiment_id])
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


@pytest.mark.slow
def test_wandb_offline_run_holds_history_and_config(tracked_run):
    (run_file,) = (tracked_run / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append(items)
        elif kind == "run":
            assert record.run.display_name == "kd" and record.run.run_group == "run"
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    assert [(h["_step"], h["loss"]) for h in history] == jsonl_series(tracked_run, "loss")
    assert config["student_train"]["max_steps"] == 6 and config["methods"] == ["kd"]


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
