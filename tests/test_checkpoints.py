"""Checkpoints hold tensors and plain data only, are verified before use, and leave no temporaries behind.

- A crafted pickle in a checkpoint's place is refused before any of its code runs (the file, and every torch.load
  DeepSpeed makes from a checkpoint folder).
- A corrupted checkpoint (bytes flipped on disk) is refused, naming the file, instead of resuming into garbage.
- A writer killed mid-save leaves a loadable checkpoint, and its temporary is removed at the next stage start;
  temporaries of live processes are left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_deepspeed import _env
from test_trainer import save_tiny_bert, tiny_config

from metadistil_scale.backends.checkpointing import StageCheckpoint
from metadistil_scale.checkpoint import CheckpointError, load_checkpoint, write_manifest
from metadistil_scale.trainer import StopRequested, train

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class Planted:
    """Unpickling it creates `marker`: what a crafted checkpoint could do with any code it likes."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def flip_bytes(path: Path, count: int = 32) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return save_tiny_bert(root / "teacher", 2, 2, seed=0), save_tiny_bert(root / "student", 2, 2, seed=1)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_models) -> Path:
    """A kd run stopped after 2 of its 6 steps: its real `kd/last.pt`."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.raises(StopRequested):
        train(tiny_config(out, *tiny_models, "methods=[kd]"), stop_after=2)
    return out


def _copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# ---------------------------------------------------------------- crafted files run nothing


def test_a_crafted_file_is_refused_before_it_runs_code(tmp_path):
    marker, path = tmp_path / "planted", tmp_path / "last.pt"
    torch.save({"config": {}, "state": {"step": 1}, "payload": Planted(marker)}, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert not marker.exists()
    assert str(path) in message and "\n" not in message
    assert "refers to io.open" in message and "could run code" in message


def test_resume_refuses_a_crafted_last_pt(tmp_path, tiny_models, stopped_run):
    out = _copy_run(stopped_run, tmp_path / "run")
    marker = tmp_path / "planted"
    torch.save({"config": {}, "state": {"step": 2}, "payload": Planted(marker)}, out / "kd" / "last.pt")
    with pytest.raises(CheckpointError) as refused:
        train(tiny_config(out, *tiny_models, "methods=[kd]"), resume=True)
    assert not marker.exists()  # before the configuration check could refuse it
    assert str(out / "kd" / "last.pt") in str(refused.value) and "\n" not in str(refused.value)


# ---------------------------------------------------------------- corruption is refused


def test_flipped_bytes_are_refused_and_the_intact_file_resumes(tmp_path, tiny_models, stopped_run):
    out = _copy_run(stopped_run, tmp_path / "run")
    last = out / "kd" / "last.pt"
    intact = last.read_bytes()
    flip_bytes(last)
    with pytest.raises(CheckpointError, match=r"is corrupted") as refused:
        train(tiny_config(out, *tiny_models, "methods=[kd]"), resume=True)
    assert str(last) in str(refused.value) and "\n" not in str(refused.value)

    last.write_bytes(intact)
    results = train(tiny_config(out, *tiny_models, "methods=[kd]"), resume=True)
    assert [row["method"] for row in results["rows"]] == ["finetune", "kd"]


# ---------------------------------------------------------------- a killed writer's temporaries

WRITER = """
import sys, torch
from pathlib import Path
from metadistil_scale.checkpoint import atomic_save
path, step = Path(sys.argv[1]), 0
while True:
    step += 1
    atomic_save({"state": {"step": step}, "weights": torch.full((8_000_000,), float(step))}, path)
"""


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_a_writer_killed_mid_save_leaves_a_good_checkpoint_and_its_temporary_goes(tmp_path):
    out = tmp_path / "kd"
    out.mkdir()
    last = out / "last.pt"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(last)], cwd=REPO)
    temp = out / f".last.pt.tmp-{writer.pid}"
    deadline = time.monotonic() + 120
    # Kill it while it writes a temporary, once a complete checkpoint exists.
    while not (last.is_file() and temp.is_file() and temp.stat().st_size > 1_000_000):
        assert writer.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert temp.is_file()

    ckpt = load_checkpoint(last)
    step = ckpt["state"]["step"]
    assert step >= 1 and torch.equal(ckpt["weights"], torch.full((8_000_000,), float(step)))
    StageCheckpoint(out, {}, {})  # a stage starting in the folder
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]


def test_only_temporaries_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "kd"
    (out / "last").mkdir(parents=True)
    dead = _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = sleeper.pid
        stale = [out / f".last.pt.tmp-{dead}", out / f".best.old-{dead}", out / "last" / f".latest.tmp-{dead}"]
        kept = [out / f".last.pt.tmp-{live}", out / f".last.pt.tmp-{os.getpid()}", out / ".last.pt.tmp-notapid",
                out / "notes.tmp-1", out / "last.pt"]
        for path in stale + kept:
            path.write_bytes(b"x")
        (out / f".best.tmp-{dead}").mkdir()  # a folder written by atomic_dir
        (out / f".best.tmp-{dead}" / "model.safetensors").write_bytes(b"x")
        stale.append(out / f".best.tmp-{dead}")

        StageCheckpoint(out, {}, {})
        assert [p for p in stale if p.exists()] == []
        assert [p for p in kept if not p.exists()] == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_folder_swap_killed_between_its_renames_gets_the_previous_folder_back(tmp_path):
    """atomic_dir moves `best` aside, then the new folder in: killed in between, only `.best.old-<pid>` holds the
    previous best weights."""
    out = tmp_path / "kd"
    dead = _dead_pid()
    (out / f".best.old-{dead}").mkdir(parents=True)
    (out / f".best.old-{dead}" / "model.safetensors").write_text("previous")
    (out / f".best.tmp-{dead}").mkdir()
    (out / f".best.tmp-{dead}" / "model.safetensors").write_text("new")
    StageCheckpoint(out, {}, {})
    assert sorted(p.name for p in out.iterdir()) == ["best"]
    assert (out / "best" / "model.safetensors").read_text() == "previous"


# ---------------------------------------------------------------- DeepSpeed checkpoint folders


def _cli(out: Path, teacher: Path, student: Path, *extra: str) -> subprocess.CompletedProcess:
    """The teacher's fine-tuning at DeepSpeed ZeRO-2 (a checkpoint folder), in a process of its own."""
    overrides = [f"output_dir={out}", f"model.teacher={teacher}", f"model.student={student}",
                 "model.student_layers=1", "methods=[kd]", "data.max_train_examples=256",
                 "data.max_eval_examples=64", "data.max_length=24", "teacher_finetune.batch_size=8",
                 "teacher_finetune.max_steps=4", "student_train.batch_size=8", "student_train.max_steps=2",
                 "eval_every=2", "log_every=1"]
    cmd = [sys.executable, "-m", "metadistil_scale.cli", "train", "--deepspeed-teacher", "ds_configs/zero2.json",
           *sum((["--set", o] for o in overrides), []), *extra]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a command that refused to start, with exit status 2 and no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return errors[0]


@pytest.mark.slow
def test_a_deepspeed_folder_is_verified_and_loaded_weights_only(tmp_path, tiny_models):
    out = tmp_path / "run"
    proc = _cli(out, *tiny_models, "--stop-after", "2")
    assert "stopped at step 2" in proc.stdout, proc.stderr[-4000:]
    folder = out / "teacher" / "last" / "step-00000002"
    pristine = shutil.copytree(folder, tmp_path / "pristine")
    optim = next((folder / "student").glob("*optim_states.pt"))

    flip_bytes(optim)
    line = one_error_line(_cli(out, *tiny_models, "--resume"))
    assert str(optim) in line and "corrupted" in line

    # A crafted shard with a manifest to match passes the checksums, and is still refused.
    marker = tmp_path / "planted"
    torch.save({"payload": Planted(marker)}, optim)
    write_manifest(folder)
    line = one_error_line(_cli(out, *tiny_models, "--resume"))
    assert not marker.exists()
    assert str(folder / "student") in line and "refers to io.open" in line

    (folder / "manifest.json").unlink()
    line = one_error_line(_cli(out, *tiny_models, "--resume"))
    assert str(folder) in line and "manifest.json" in line

    shutil.rmtree(folder)
    shutil.copytree(pristine, folder)
    proc = _cli(out, *tiny_models, "--resume", "--stop-after", "3")
    assert f"resumed from {out / 'teacher' / 'last'} at step 2" in proc.stdout + proc.stderr, proc.stderr[-4000:]
    assert "stopped at step 3" in proc.stdout
    manifest = json.loads((out / "teacher" / "last" / "step-00000003" / "manifest.json").read_text())
    assert "trainer.pt" in manifest and any(name.startswith("student/") for name in manifest)


def _without(fingerprint: dict, section: str, key: str) -> dict:
    """The fingerprint a version without the option `section.key` wrote."""
    older = json.loads(json.dumps(fingerprint))
    del older[section][key]
    return older


def test_an_option_newer_than_a_finished_run_matches_only_at_its_default(tmp_path):
    """meta.quiz_train_mode came after runs that always ran the quiz in train mode (its default, true): such a
    run is reused when the option is at its default, and refused when it is now off."""
    from dataclasses import replace

    from metadistil_scale.checkpoint import fingerprint_differences
    from metadistil_scale.config import Config, load_config
    from metadistil_scale.trainer import load_done, stage_fingerprint

    cfg = load_config(None, [])
    defaults = stage_fingerprint(Config(), "metadistil", "metadistil")
    older = _without(stage_fingerprint(cfg, "metadistil", "metadistil"), "meta", "quiz_train_mode")
    result = {"name": "metadistil", "method": "metadistil", "steps": 3, "best_dev": 0.7, "best_step": 3,
              "test": {"accuracy": 0.7}, "wall_time_s": 1.0}
    (tmp_path / "done.json").write_text(json.dumps({"config": older, "result": result}))

    now_default = stage_fingerprint(cfg, "metadistil", "metadistil")
    off = replace(cfg, meta=replace(cfg.meta, quiz_train_mode=False))
    now_off = stage_fingerprint(off, "metadistil", "metadistil")
    assert fingerprint_differences(older, now_default, defaults) == []
    assert fingerprint_differences(older, now_off, defaults) == ["meta.quiz_train_mode"]
    assert load_done(tmp_path, now_default, defaults).test == {"accuracy": 0.7}
    assert load_done(tmp_path, now_off, defaults) is None
