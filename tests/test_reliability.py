"""Bad input, interruptions and full disks end in one line naming the problem, before work where possible."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_trainer import save_tiny_bert

from metadistil_scale.cli import main
from metadistil_scale.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return save_tiny_bert(root / "teacher", 2, 2, seed=0), save_tiny_bert(root / "student", 2, 2, seed=1)


def tiny_args(out: Path, teacher: Path, student: Path, *extra: str) -> list[str]:
    sets = [f"output_dir={out}", f"model.teacher_checkpoint={teacher}", f"model.student={student}",
            "model.student_layers=1", "methods=[kd]", "data.max_train_examples=256", "data.max_eval_examples=64",
            "data.max_length=24", "student_train.batch_size=8", "student_train.max_steps=4", "eval_every=2",
            "log_every=1", *extra]
    return [arg for s in sets for arg in ("--set", s)]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])


@pytest.mark.parametrize("where", ["file", "under-a-file", "unwritable"])
def test_unusable_output_dir_is_one_line(tmp_path, tiny_models, capsys, where):
    teacher, student = tiny_models
    (tmp_path / "a_file").write_text("")
    out = {"file": tmp_path / "a_file", "under-a-file": tmp_path / "a_file" / "run",
           "unwritable": Path("/proc/metadistil-run")}[where]
    code, err = run_cli(["train", *tiny_args(out, teacher, student)], capsys)
    assert code == 2
    assert_one_line(err, "output_dir:", "a_file is a file, not a folder" if where != "unwritable" else "cannot write")


def test_header_only_validation_file_is_one_line(tmp_path, capsys):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"review {i}\t{i % 2}\n" for i in range(40)))
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\n")
    code, err = run_cli(["train", "--set", "data.task=sst2", "--set", f"data.data_files={{train: {train}, "
                         f"validation: {dev}}}", "--set", f"output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert_one_line(err, "dev.tsv: no rows")


def test_train_split_smaller_than_a_batch_is_refused_before_work(tmp_path, tiny_models, capsys):
    teacher, student = tiny_models
    code, err = run_cli(["train", *tiny_args(tmp_path / "run", teacher, student, "data.max_train_examples=6")],
                        capsys)
    assert code == 2
    assert_one_line(err, "student_train.batch_size: 8 is more than the 6 examples of the train split")
    assert not (tmp_path / "run" / "kd").exists()


def test_hub_name_while_offline_is_one_line(tmp_path, tiny_models, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher, _ = tiny_models
    code, err = run_cli(["train", *tiny_args(tmp_path / "run", teacher, Path("no-such-org/no-such-model"))], capsys)
    assert code == 2
    assert_one_line(err, "no-such-org/no-such-model: not a local model folder")


@pytest.mark.parametrize("override,message", [
    ("student_train.epochs=.inf", "student_train.epochs: expected a finite number, got inf"),
    ("student_train.optim.lr=0", "student_train.optim.lr: expected > 0"),
    ("student_train.optim.lr=.inf", "student_train.optim.lr: expected a finite number"),
    ("meta.pilot_lr=.inf", "meta.pilot_lr: expected a finite number"),
    ("meta.teacher_optim.lr=.nan", "meta.teacher_optim.lr: expected a finite number"),
])
def test_values_that_cannot_train_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_model_checks_come_before_the_teacher_stage(tmp_path, tiny_models, capsys):
    teacher, student = tiny_models
    three_way = save_tiny_bert(tmp_path / "student3", 1, 3, seed=0)
    for extra, message in ((["model.student_layers=5"], "asked for 5 layers (model.student_layers), the model has 2"),
                           ([f"model.student={three_way}"], "trained with 3 labels, the task has 2")):
        # A teacher to fine-tune (no teacher_checkpoint): the refusal must come before its stage runs.
        args = tiny_args(tmp_path / "run", teacher, student, "model.teacher_checkpoint=null",
                         f"model.teacher={teacher}", "teacher_finetune.max_steps=2", *extra)
        code, err = run_cli(["train", *args], capsys)
        assert code == 2
        assert_one_line(err, message)
        assert not (tmp_path / "run" / "teacher").exists()


def test_resume_refusal_names_the_dotted_key_and_eval_every(tmp_path, tiny_models, capsys):
    teacher, student = tiny_models
    args = tiny_args(tmp_path / "run", teacher, student)
    assert main(["train", *args, "--stop-after", "2"]) == 3
    capsys.readouterr()
    code, err = run_cli(["train", *args, "--set", "student_train.optim.lr=1e-4", "--resume"], capsys)
    assert code == 2
    assert_one_line(err, "student_train.optim.lr: checkpoint 0.0002 vs now 0.0001")
    assert "weight_decay" not in err  # the keys that agree are not dumped
    code, err = run_cli(["train", *args, "--set", "eval_every=3", "--resume"], capsys)
    assert code == 2
    assert_one_line(err, "eval_every: checkpoint 2 vs now 3")


def _cli_process(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "metadistil_scale.cli", "train", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


SIGNAL_BUDGET = ["student_train.max_steps=40", "eval_every=20"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_models) -> Path:
    """The signal tests' reference: the same run, never interrupted (made once for both signals)."""
    teacher, student = tiny_models
    full = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert main(["train", *tiny_args(full, teacher, student, *SIGNAL_BUDGET)]) == 0
    return full


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_checkpoints_and_resume_finishes_the_run(tmp_path, tiny_models, uninterrupted, sig):
    teacher, student = tiny_models
    full, stopped = uninterrupted, tmp_path / "stopped"
    budget = SIGNAL_BUDGET

    proc = _cli_process(tiny_args(stopped, teacher, student, *budget))
    metrics = stopped / "kd" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig.value, output
    assert f"{sig.name} received: stopped at step" in output and "--resume" in output
    assert "Traceback" not in output

    assert main(["train", *tiny_args(stopped, teacher, student, *budget), "--resume"]) == 0
    a, b = load_file(full / "kd" / "student" / "model.safetensors"), load_file(
        stopped / "kd" / "student" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_disk_full_is_one_line(tmp_path, tiny_models):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        teacher, student = tiny_models
        proc = _cli_process(tiny_args(mount / "run", teacher, student))
        output, _ = proc.communicate(timeout=300)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    assert proc.returncode == 2, output
    last = [line for line in re.split(r"[\r\n]", output) if line.strip()][-1]  # tqdm ends lines with \r
    assert last.startswith("error: no space left on device under") and "--resume" in last, output
    assert "Traceback" not in output


@pytest.mark.slow
def test_stop_after_under_torchrun_is_not_a_crash(tmp_path, tiny_models):
    teacher, student = tiny_models
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "metadistil_scale.launch.deepspeed_train", "train", *tiny_args(tmp_path / "run", teacher, student),
         "--stop-after", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "stopped at step 2/4" in output and "ChildFailedError" not in output and "Traceback" not in output


EXIT_SCRIPT = """
import atexit, sys
from metadistil_scale.backends import dist

class Finalized:
    def __del__(self, open=open, path=sys.argv[1] + "/finalized"):  # builtins are gone late in finalization
        open(path, "w").close()

kept = Finalized()
atexit.register(lambda: open(sys.argv[1] + "/atexit", "w").close())
sys.stdout.write("buffered, no newline")
dist.exit_process(3)
"""


def test_exit_process_runs_exit_handlers_flushes_and_skips_finalization(tmp_path):
    """A launched rank leaves through dist.exit_process: loggers' and trackers' exit handlers run and output is
    flushed, but interpreter finalization (where gloo's threads abort the process) does not run."""
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "atexit").is_file()
    assert not (tmp_path / "finalized").exists()


def test_lm_model_that_cannot_be_loaded_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source in (str(tmp_path / "no_such_folder"), "no-such-org/no-such-lm"):
        code, err = run_cli(["lm-train", "--set", f"model.teacher={source}", "--set", f"output_dir={tmp_path / 'lm'}",
                             "--set", "data.max_documents=50"], capsys)
        assert code == 2
        assert_one_line(err, f"{source}: not a local model folder")


@pytest.mark.slow
def test_deepspeed_launch_leaves_no_shared_memory_buffers(tmp_path, monkeypatch):
    """DeepSpeed's CPU all-reduce keeps a 69 MB /dev/shm file per rank and never unlinks it; init_distributed
    unlinks each rank's once all are mapped, and the shared-memory all-reduce still sums right afterwards."""
    from test_deepspeed import _env, _free_port

    from metadistil_scale.backends import dist

    port = _free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           str(REPO / "tests" / "_shm_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["sum"] == [3.0, 3.0, 3.0]
        assert seen["named"] == []  # unlinked while the launch ran
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # the launcher's default address
    monkeypatch.setenv("MASTER_PORT", str(port))
    assert [str(p) for p in map(dist.shm_buffer_path, range(2)) if p.exists()] == []
