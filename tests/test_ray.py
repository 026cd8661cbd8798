"""Ray orchestration: MetaDistil runs submitted with `ray job submit` to a real local Ray head.

One head (launch/start_local_ray.sh: dashboard on 127.0.0.1, token authentication, its own temp dir and ports,
2 CPUs) serves the module; two jobs run a tiny MetaDistil recipe on 2 CPU workers with teacher and student at
DeepSpeed ZeRO-2:
  - an uninterrupted job, which must end with the parameters of the same recipe in one plain process;
  - a job whose last worker kills itself (SIGKILL) right after the first checkpoint (tests/_ray_faults.py): Ray
    Train restarts the worker group, the new workers resume from that checkpoint, and the run ends with the
    first job's parameters.
The same two jobs run a tiny causal-LM MetaDistil recipe (`lm-train`'s path, chosen from the recipe's keys): the
uninterrupted one ends with the student of the same recipe in one process, the one with a lost worker with the
uninterrupted one's.
And the errors a user meets before any worker starts, each one line with exit status 2 and no folder created:
no cluster at the address, the dashboard's port or a silent port given as the cluster's address, bad numbers,
more workers than the cluster holds, a storage path that cannot be written or is relative inside a job; and a
client without the cluster's token is refused.

The head runs in the foreground (`ray start --block`) and is ended at the end with its process tree, even on
failure: `ray stop` would end every Ray process on the machine, other clusters included.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import torch
from metadistil_scale.launch.ray_job import MANIFEST, checkpoint_step, restore
from safetensors.torch import load_file
from test_checkpoints import Planted, flip_bytes, one_error_line
from transformers import BertConfig, BertForSequenceClassification

from metadistil_scale.checkpoint import CheckpointError, write_manifest
from metadistil_scale.config import load_config
from metadistil_scale.models.text import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS, EVAL_EVERY = 4, 2  # checkpoints at steps 2 and 4
ZERO2 = ["--deepspeed-teacher", "ds_configs/zero2.json", "--deepspeed-student", "ds_configs/zero2.json"]
TIMINGS: dict[str, float] = {}  # printed when the head stops (pytest -s)
ERRORS: dict[str, float] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    for name in ("TRITON_INTERPRET", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    return env


# ---------------------------------------------------------------- the cluster and the recipe


@dataclass
class Cluster:
    dashboard: str  # the job server, for `ray job submit --address`
    gcs: str  # the cluster address, for a driver started by hand
    storage: Path
    models: Path
    auth: dict[str, str] = field(default_factory=dict)  # what a client's environment needs: the token's settings

    @property
    def env(self) -> dict[str, str]:
        return _env() | self.auth

    def token(self) -> str:
        return Path(self.auth["RAY_AUTH_TOKEN_PATH"]).read_text().strip()


def _dashboard_status(url: str, token: str | None = None) -> int | None:
    """The job server's HTTP status for /api/version (None when nothing answers)."""
    request = urllib.request.Request(f"{url}/api/version")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def _end_head(proc: subprocess.Popen) -> None:
    """End the head and everything it started: `ray start --block` stops its processes on SIGTERM; what is left
    of its process tree (workers, job drivers) after a grace period is killed."""
    import psutil

    started = time.perf_counter()
    try:
        leader = psutil.Process(proc.pid)
        tree = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    proc.terminate()
    _, alive = psutil.wait_procs(tree, timeout=3)
    for p in alive:
        try:
            p.kill()  # psutil checks that the pid still names the process it listed
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    proc.wait(timeout=10)
    TIMINGS["head stop"] = time.perf_counter() - started


def save_tiny_bert(folder: Path, layers: int, seed: int) -> Path:
    """A small BERT with the real MiniLM vocabulary and tokenizer; no dropout, so that a run on 2 ranks and one
    on 1 rank draw nothing at random."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(folder)
    load_tokenizer("embedded:minilm-l6").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # A short temp dir: Ray's unix socket paths live under it and have a length limit.
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    gcs_port, dashboard_port = _free_port(), _free_port()
    # The script creates the token file; every client of the cluster reads it from there.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(temp / "auth" / "token")}
    env = _env() | auth | {"RAY_NUM_CPUS": "2", "RAY_PORT": str(gcs_port), "RAY_DASHBOARD_PORT": str(dashboard_port),
                           "RAY_TEMP_DIR": str(temp / "ray")}
    log = open(temp / "head.log", "w")  # noqa: SIM115 (closed in finally)
    started = time.perf_counter()
    proc = subprocess.Popen(
        ["bash", "launch/start_local_ray.sh", "--block", f"--ray-client-server-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        models = temp / "models"
        save_tiny_bert(models / "teacher", 2, seed=0)
        save_tiny_bert(models / "student", 2, seed=1)
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + 180
        while _dashboard_status(dashboard) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not come up:\n{(temp / 'head.log').read_text()[-4000:]}")
            time.sleep(1)
        TIMINGS["head start"] = time.perf_counter() - started
        yield Cluster(dashboard, f"127.0.0.1:{gcs_port}", temp / "storage", models, auth)
    finally:
        _end_head(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        if TIMINGS:
            print("\nRay test timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in TIMINGS.items()))
        if ERRORS:
            print("Ray test parameter errors: " + ", ".join(f"{k} {v:.1e}" for k, v in ERRORS.items()))


def recipe(models: Path) -> list[str]:
    """The tiny MetaDistil recipe as --set overrides (also the single-process reference's config)."""
    return [
        f"model.teacher_checkpoint={models / 'teacher'}", f"model.student={models / 'student'}",
        "model.student_layers=1", "methods=[metadistil]", "data.max_train_examples=256",
        "data.max_eval_examples=64", "data.max_length=24", "student_train.batch_size=8",
        f"student_train.max_steps={STEPS}", "student_train.optim.lr=1e-2", "meta.quiz_batch_size=8",
        "meta.teacher_optim.lr=1e-3", f"eval_every={EVAL_EVERY}", "log_every=1",
    ]


def submit(cluster: Cluster, name: str, env_vars: dict[str, str] | None = None, *,
           entry: str = "metadistil_scale.launch.ray_job", storage: str | None = None,
           succeed: bool = True, settings: list[str] | None = None) -> tuple[str, float]:
    """`ray job submit` a 2-worker ZeRO-2 run of `settings` (default: the tiny classification recipe); returns its
    output (driver and workers) and wall time."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
           "--submission-id", name]
    if env_vars:
        cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
    cmd += ["--", "python", "-m", entry, "--num-workers", "2", "--storage-path", storage or str(cluster.storage),
            "--name", name, "--max-failures", "2", *ZERO2]
    for override in recipe(cluster.models) if settings is None else settings:
        cmd += ["--set", override]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token()}"})
    status = client.get_job_status(name)
    want = JobStatus.SUCCEEDED if succeed else JobStatus.FAILED
    assert (proc.returncode == 0) == succeed and status == want, f"job {name}: {status}\n{output[-8000:]}"
    return output, wall


def final_parameters(run: Path) -> dict[str, torch.Tensor]:
    """The final student and the meta-trained teacher of the run folder's metadistil stage."""
    student = load_file(run / "metadistil" / "student" / "model.safetensors")
    teacher = load_file(run / "metadistil" / "best" / "teacher" / "model.safetensors")
    return {**{f"student.{k}": v for k, v in student.items()}, **{f"teacher.{k}": v for k, v in teacher.items()}}


def initial_parameters(models: Path) -> dict[str, torch.Tensor]:
    student = load_file(models / "student" / "model.safetensors")
    teacher = load_file(models / "teacher" / "model.safetensors")
    return {**{f"student.{k}": v for k, v in student.items()}, **{f"teacher.{k}": v for k, v in teacher.items()}}


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                   start: dict[str, torch.Tensor] | None = None) -> float:
    """‖got − want‖ / ‖want‖, or relative to how far training moved want from `start`."""
    assert got.keys() == want.keys()
    keys = sorted(want)
    flat = lambda d: torch.cat([d[k].reshape(-1).double() for k in keys])  # noqa: E731
    scale = (flat(want) - flat({k: start[k] for k in keys})) if start is not None else flat(want)
    return float((flat(got) - flat(want)).norm() / scale.norm())


@pytest.fixture(scope="module")
def uninterrupted(cluster: Cluster) -> tuple[str, Path]:
    output, wall = submit(cluster, "uninterrupted")
    TIMINGS["uninterrupted job"] = wall
    return output, cluster.storage / "uninterrupted" / "output"


# ---------------------------------------------------------------- the jobs


@pytest.mark.slow
def test_zero2_job_matches_one_process(cluster: Cluster, uninterrupted: tuple[str, Path], tmp_path: Path) -> None:
    from metadistil_scale.trainer import train

    output, run = uninterrupted
    assert "[ray] finished in" in output and "metadistil" in output  # the results table reached the driver
    results = json.loads((run / "results.json").read_text())
    assert [row["method"] for row in results["rows"]] == ["finetune", "metadistil"]
    # The final Ray checkpoint carries the results and the final student too.
    final = Path(output.split("final Ray checkpoint (results.json, config.yaml, students): ")[1].split()[0])
    assert json.loads((final / "results.json").read_text()) == results
    assert (final / "metadistil" / "student" / "model.safetensors").is_file()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        reference = train(load_config(None, [f"output_dir={tmp_path / 'one'}", *recipe(cluster.models)]))
        TIMINGS["one-process reference"] = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    start = initial_parameters(cluster.models)
    got, want = final_parameters(run), final_parameters(tmp_path / "one")
    start = {k: start[k] for k in want}
    ERRORS["2 workers vs one process (of the update)"] = relative_error(got, want, start)
    assert ERRORS["2 workers vs one process (of the update)"] <= 1e-5
    assert results["rows"][1]["best_dev"] == reference["rows"][1]["best_dev"]
    assert results["rows"][1]["test"] == reference["rows"][1]["test"]


@pytest.mark.slow
def test_a_lost_worker_resumes_from_the_last_checkpoint(cluster: Cluster, uninterrupted: tuple[str, Path]) -> None:
    from _ray_faults import KILL_ONCE_ENV

    marker = cluster.storage / "killed-once"
    output, wall = submit(cluster, "lost-worker", {KILL_ONCE_ENV: str(marker)}, entry="tests._ray_faults")
    TIMINGS["job with a lost worker"] = wall
    # What the failure cost: the time between the first and the last checkpoint, beyond an uninterrupted run's.
    TIMINGS["cost of the failure (first to last checkpoint)"] = checkpoint_gap(output) - checkpoint_gap(uninterrupted[0])
    TIMINGS["cost of the failure (job wall time)"] = wall - TIMINGS["uninterrupted job"]
    assert marker.read_text().split() == ["metadistil", str(EVAL_EVERY)]
    assert f"kills itself after the checkpoint at metadistil step {EVAL_EVERY}" in output
    assert f"[ray] restarting from Ray Train checkpoint {cluster.storage / 'lost-worker'}" in output
    assert f"(stage metadistil, step {EVAL_EVERY})" in output
    assert f"[metadistil] resumed from {cluster.storage / 'lost-worker' / 'output' / 'metadistil' / 'last'} " \
           f"at step {EVAL_EVERY}/{STEPS}" in output
    _, run = uninterrupted
    want, got = final_parameters(run), final_parameters(cluster.storage / "lost-worker" / "output")
    ERRORS["lost worker vs uninterrupted"] = relative_error(got, want)
    assert ERRORS["lost worker vs uninterrupted"] <= 1e-6
    assert _rows(cluster.storage / "lost-worker" / "output") == _rows(run)


def _rows(run: Path) -> list[dict]:
    """The results table without its timings."""
    timings = ("wall_time_s", "train_time_s", "step_time_s")
    return [{k: v for k, v in row.items() if k not in timings}
            for row in json.loads((run / "results.json").read_text())["rows"]]


def checkpoint_gap(output: str) -> float:
    """Seconds between the reports of the first and the last stage checkpoint of a job (rank 0 logs each)."""
    times = re.findall(r"\[ray\] reported metadistil step \d+ at (\S+)", output)
    return (datetime.fromisoformat(times[-1]) - datetime.fromisoformat(times[0])).total_seconds()


# ---------------------------------------------------------------- the causal-LM jobs


@pytest.fixture(scope="module")
def lm_recipe(cluster: Cluster) -> list[str]:
    """A tiny causal-LM MetaDistil recipe as --set overrides: a 2-layer Llama teacher (no dropout) with a word
    tokenizer, its layer 1 as the student, a 40-document corpus. The keys are an LM config's: the job takes the
    LM path without --task."""
    from test_lm import VOCAB, save_tiny, tiny_corpus, tiny_llama, word_tokenizer

    words = [f"w{i}" for i in range(VOCAB - 2)]
    folder = cluster.models / "lm"
    teacher = save_tiny(folder / "teacher", tiny_llama(2, seed=0), word_tokenizer(words))
    corpus = tiny_corpus(folder / "corpus.txt", words)
    return [f"model.teacher={teacher}", f"data.source={corpus}", "data.seq_len=16", "data.quiz_fraction=0.1",
            "data.heldout_fraction=0.1", "student_train.batch_size=4", f"student_train.max_steps={STEPS}",
            "meta.quiz_batch_size=2", "model.chunk_rows=5", "model.student_layers=[1]", "eval_batch_size=4",
            f"eval_every={EVAL_EVERY}", "log_every=1", "methods=[metadistil]", "meta.teacher_optim.lr=1e-3"]


@pytest.fixture(scope="module")
def lm_uninterrupted(cluster: Cluster, lm_recipe: list[str]) -> tuple[str, Path]:
    output, wall = submit(cluster, "lm-uninterrupted", settings=lm_recipe)
    TIMINGS["LM job"] = wall
    return output, cluster.storage / "lm-uninterrupted" / "output"


def lm_student(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "metadistil" / "student" / "model.safetensors")


@pytest.mark.slow
def test_lm_job_matches_one_process(cluster: Cluster, lm_recipe: list[str], lm_uninterrupted: tuple[str, Path],
                                    tmp_path: Path) -> None:
    from metadistil_scale.lm.recipe import load_lm_config, run_lm

    output, run = lm_uninterrupted
    assert "[ray] finished in" in output and "| student | metadistil | 4 |" in output  # the LM table, printed
    assert (run / "metadistil" / "last" / "latest").is_file()  # the workers' ZeRO-2 checkpoint
    reported = re.findall(r"\[ray\] reported (metadistil step \d+)", output)
    assert reported == [f"metadistil step {s}" for s in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)]
    final = Path(output.split("final Ray checkpoint (results.json, config.yaml, students): ")[1].split()[0])
    assert json.loads((final / "results.json").read_text()) == json.loads((run / "results.json").read_text())
    assert (final / "metadistil" / "student" / "model.safetensors").is_file()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_lm(load_lm_config(None, [f"output_dir={tmp_path / 'one'}", *lm_recipe]))
    finally:
        torch.set_num_threads(threads)
    got, want = lm_student(run), lm_student(tmp_path / "one")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    ERRORS["LM: 2 workers vs one process"] = relative_error(got, want)
    rows, one = _rows(run), _rows(tmp_path / "one")
    assert [row["method"] for row in rows] == ["-", "initial", "metadistil"]
    for key in ("heldout", "teacher_heldout_after"):
        assert rows[-1][key]["perplexity"] == pytest.approx(one[-1][key]["perplexity"], rel=1e-5)


@pytest.mark.slow
def test_lm_job_with_a_lost_worker_resumes_from_the_last_checkpoint(
        cluster: Cluster, lm_recipe: list[str], lm_uninterrupted: tuple[str, Path]) -> None:
    from _ray_faults import KILL_ONCE_ENV

    marker = cluster.storage / "lm-killed-once"
    output, wall = submit(cluster, "lm-lost-worker", {KILL_ONCE_ENV: str(marker)}, entry="tests._ray_faults",
                          settings=lm_recipe)
    TIMINGS["LM job with a lost worker"] = wall
    assert marker.read_text().split() == ["metadistil", str(EVAL_EVERY)]
    assert f"(stage metadistil, step {EVAL_EVERY})" in output
    assert f"[metadistil] resumed from {cluster.storage / 'lm-lost-worker' / 'output' / 'metadistil' / 'last'} " \
           f"at step {EVAL_EVERY}/{STEPS}" in output
    _, run = lm_uninterrupted
    got, want = lm_student(cluster.storage / "lm-lost-worker" / "output"), lm_student(run)
    ERRORS["LM: lost worker vs uninterrupted"] = relative_error(got, want)
    assert ERRORS["LM: lost worker vs uninterrupted"] <= 1e-6
    assert _rows(cluster.storage / "lm-lost-worker" / "output") == _rows(run)


# ---------------------------------------------------------------- errors before any worker starts


def _driver(*args: str, timeout: int = 120,
            env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "metadistil_scale.launch.ray_job", *args], cwd=REPO,
                          env=env or _env(), capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - started


@pytest.mark.slow
def test_more_workers_than_the_cluster_holds_fail_fast(cluster: Cluster, tmp_path: Path) -> None:
    storage = tmp_path / "new" / "storage"
    proc, wall = _driver("--address", cluster.gcs, "--num-workers", "4", "--storage-path", str(storage),
                         "--name", "too-many", *ZERO2, *sum((["--set", o] for o in recipe(cluster.models)), []),
                         env=cluster.env)
    line = one_error_line(proc)
    assert "--num-workers 4 asks for 4 workers of {'CPU': 1.0}" in line and "at most 2 such workers fit" in line
    assert wall < 90
    assert not (tmp_path / "new").exists()  # a refused run leaves no folder


@pytest.mark.slow
def test_the_dashboard_port_as_the_cluster_address(cluster: Cluster, tmp_path: Path) -> None:
    address = cluster.dashboard.removeprefix("http://")
    proc, wall = _driver("--address", address, "--storage-path", str(tmp_path / "storage"), env=cluster.env)
    line = one_error_line(proc)
    assert f"ray job submit --address http://{address}" in line and ":6379" in line
    assert wall < 60 and not (tmp_path / "storage").exists()


@pytest.mark.slow
def test_a_client_without_the_token_isone_error_line(cluster: Cluster, tmp_path: Path) -> None:
    assert _dashboard_status(cluster.dashboard) == 401
    assert _dashboard_status(cluster.dashboard, "not-the-token") == 403
    assert _dashboard_status(cluster.dashboard, cluster.token()) == 200
    assert oct(Path(cluster.auth["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o777) == "0o600"
    # The GCS listens on every interface (Ray binds it so): the token is what keeps a stranger out.
    proc, _ = _driver("--address", cluster.gcs, "--storage-path", str(tmp_path / "storage"), "--connect-timeout",
                      "60")
    assert "error: no Ray cluster reachable at" in one_error_line(proc)
    assert not (tmp_path / "storage").exists()


@pytest.mark.slow
def test_a_relative_storage_path_inside_a_job_isone_error_line(cluster: Cluster) -> None:
    output, _ = submit(cluster, "relative-storage", storage="runs/relative", succeed=False)
    assert "error: --storage-path runs/relative is relative, and this job runs in Ray's temporary copy" in output
    assert "give an absolute path" in output


@pytest.mark.slow
def test_the_task_follows_the_recipe_and_a_task_that_does_not_fit_it_isone_error_line(tmp_path: Path) -> None:
    storage = tmp_path / "new" / "storage"
    nowhere = ["--address", f"127.0.0.1:{_free_port()}", "--storage-path", str(storage)]
    # An LM recipe without --task is an LM job: its config passes and its batches are checked over the workers.
    proc, _ = _driver("--config", "configs/lm_smollm2_kjv.yaml", *nowhere)
    assert "error: no Ray cluster reachable at 127.0.0.1:" in one_error_line(proc)
    proc, _ = _driver("--config", "configs/lm_smollm2_kjv.yaml", "--num-workers", "3", *nowhere)
    assert one_error_line(proc) == "error: student_train.batch_size: expected divisible by the 3 ranks, got 4"
    proc, _ = _driver("--task", "classification", "--config", "configs/lm_smollm2_kjv.yaml", *nowhere)
    assert one_error_line(proc) == (
        "error: --task classification does not fit the recipe configs/lm_smollm2_kjv.yaml: unknown config key "
        "'data.source' for a classification run; it is a causal-LM recipe: pass --task lm or leave --task out")
    proc, _ = _driver("--task", "lm", "--config", "configs/text.yaml", *nowhere)
    assert one_error_line(proc) == (
        "error: --task lm does not fit the recipe configs/text.yaml: unknown config key 'data.task' for a causal-LM "
        "run; it is a classification recipe: pass --task classification or leave --task out")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_no_cluster_at_the_address(tmp_path: Path) -> None:
    storage = tmp_path / "new" / "storage"
    proc, _ = _driver("--address", f"127.0.0.1:{_free_port()}", "--storage-path", str(storage))
    assert "error: no Ray cluster reachable at 127.0.0.1:" in one_error_line(proc)
    assert not (tmp_path / "new").exists()  # the checks come before any folder is created
    proc, _ = _driver("--address", "http://127.0.0.1:8265", "--storage-path", str(storage))
    assert "is a dashboard (job submission) address" in one_error_line(proc)
    script = subprocess.run(["bash", "launch/submit_default.sh"], cwd=REPO, capture_output=True, text=True,
                            env=_env() | {"RAY_DASHBOARD_ADDRESS": f"http://127.0.0.1:{_free_port()}"}, timeout=60)
    assert script.returncode == 2 and "error: no Ray job server at http://127.0.0.1:" in script.stderr


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_an_http_server_or_a_silent_port_as_the_cluster_address(tmp_path: Path) -> None:
    storage = tmp_path / "new" / "storage"
    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    # Ray resolves 127.0.0.1 to the machine's address, so the silent port listens on every interface.
    silent = socket.create_server(("", 0))
    try:
        port = http_server.server_address[1]
        proc, wall = _driver("--address", f"127.0.0.1:{port}", "--storage-path", str(storage))
        line = one_error_line(proc)
        assert "answers HTTP" in line and f"ray job submit --address http://127.0.0.1:{port}" in line
        assert "127.0.0.1:6379" in line and wall < 60

        proc, wall = _driver("--address", f"127.0.0.1:{silent.getsockname()[1]}", "--storage-path", str(storage),
                             "--connect-timeout", "15")
        assert "did not answer within 15 s (--connect-timeout)" in one_error_line(proc)
        assert wall < 60
        assert not (tmp_path / "new").exists()
    finally:
        http_server.shutdown()
        silent.close()


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--cpus-per-worker", "0"], ["--cpus-per-worker", "-1"],
                                  ["--cpus-per-worker", "nan"], ["--num-workers", "0"], ["--max-failures", "-2"],
                                  ["--connect-timeout", "0"]])
def test_bad_numbers_are_refused_first(tmp_path: Path, args: list[str]) -> None:
    proc, _ = _driver(*args, "--storage-path", str(tmp_path / "storage"))
    line = one_error_line(proc)
    assert f"{args[0]} must be" in line and args[1] in line
    assert not (tmp_path / "storage").exists()


@pytest.mark.slow
def test_a_storage_path_that_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc, _ = _driver("--storage-path", str(blocker / "results"))
    assert f"error: --storage-path {blocker / 'results'} is not writable" in one_error_line(proc)


# ---------------------------------------------------------------- putting a reported checkpoint back (no cluster)


def _reported(folder: Path, stage: str, step: int, sharded: bool) -> Path:
    """A reported checkpoint as the workers upload it: the manifest, the stage checkpoint and its metrics log."""
    rel = f"{stage}/last" if sharded else f"{stage}/last.pt"
    if sharded:
        step_folder = folder / rel / f"step-{step:08d}"
        (step_folder / "student").mkdir(parents=True)
        (step_folder / "student" / "shard.pt").write_text(f"step {step}")
        write_manifest(step_folder)
        (folder / rel / "latest").write_text(f"step-{step:08d}\n")
    else:
        (folder / stage).mkdir(parents=True)
        torch.save({"state": {"step": step}}, folder / rel)
    (folder / stage / "metrics.jsonl").write_text(f'{{"step": {step}}}\n')
    (folder / MANIFEST).write_text(json.dumps({"stage": stage, "step": step, "checkpoint": rel}))
    return folder


def _damage(checkpoint: Path) -> None:
    """Flip bytes in the checkpoint's file (a folder's shard)."""
    flip_bytes(next(checkpoint.rglob("shard.pt")) if checkpoint.is_dir() else checkpoint, 2)


@pytest.mark.parametrize("sharded", [True, False])
def test_restore_fills_a_run_folder_that_lost_its_checkpoint(tmp_path: Path, sharded: bool) -> None:
    saved = _reported(tmp_path / "ray", "metadistil", 4, sharded)
    out = tmp_path / "run"
    restore(saved, out, "checkpoint_x")
    target = out / "metadistil" / ("last" if sharded else "last.pt")
    assert checkpoint_step(target) == 4
    assert (out / "metadistil" / "metrics.jsonl").read_text() == '{"step": 4}\n'
    if sharded:
        assert (target / "step-00000004" / "student" / "shard.pt").read_text() == "step 4"


@pytest.mark.parametrize("sharded", [True, False])
def test_restore_keeps_a_newer_checkpoint_and_replaces_an_older_or_broken_one(tmp_path: Path, sharded: bool) -> None:
    saved = _reported(tmp_path / "ray", "kd", 4, sharded)
    newer = _reported(tmp_path / "run", "kd", 6, sharded)
    restore(saved, newer, "checkpoint_x")
    assert checkpoint_step(newer / "kd" / ("last" if sharded else "last.pt")) == 6

    older = _reported(tmp_path / "old", "kd", 2, sharded)
    restore(saved, older, "checkpoint_x")
    target = older / "kd" / ("last" if sharded else "last.pt")
    assert checkpoint_step(target) == 4
    if sharded:  # the older step's folder went with it
        assert sorted(p.name for p in target.iterdir()) == ["latest", "step-00000004"]

    # A newer but corrupted checkpoint in the run folder is no reason to keep it.
    broken = _reported(tmp_path / "broken", "kd", 6, sharded)
    _damage(broken / "kd" / ("last" if sharded else "last.pt"))
    with pytest.raises(CheckpointError, match="corrupted|not a readable checkpoint"):
        checkpoint_step(broken / "kd" / ("last" if sharded else "last.pt"))
    restore(saved, broken, "checkpoint_x")
    assert checkpoint_step(broken / "kd" / ("last" if sharded else "last.pt")) == 4


@pytest.mark.parametrize("sharded", [True, False])
def test_a_corrupted_reported_copy_is_not_restored(tmp_path: Path, sharded: bool) -> None:
    saved = _reported(tmp_path / "ray", "kd", 4, sharded)
    _damage(saved / "kd" / ("last" if sharded else "last.pt"))
    older = _reported(tmp_path / "old", "kd", 2, sharded)
    restore(saved, older, "checkpoint_x")
    assert checkpoint_step(older / "kd" / ("last" if sharded else "last.pt")) == 2


def test_a_crafted_checkpoint_runs_nothing_on_restore(tmp_path: Path) -> None:
    marker = tmp_path / "planted"
    saved = _reported(tmp_path / "ray", "kd", 4, sharded=False)
    torch.save({"state": {"step": 9}, "payload": Planted(marker)}, saved / "kd" / "last.pt")
    older = _reported(tmp_path / "old", "kd", 2, sharded=False)
    torch.save({"state": {"step": 8}, "payload": Planted(marker)}, older / "kd" / "last.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        checkpoint_step(older / "kd" / "last.pt")
    restore(saved, older, "checkpoint_x")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="could run code"):  # neither copy was good: nothing was copied
        checkpoint_step(older / "kd" / "last.pt")
