"""Ray entry: a MetaDistil run as a Ray Train job whose workers each run the same trainer as the deepspeed launcher.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m metadistil_scale.launch.ray_job --config configs/text.yaml --num-workers 2 \\
        --deepspeed-teacher ds_configs/zero2.json --deepspeed-student ds_configs/zero2.json \\
        --storage-path /shared/ray_results --name my-run --max-failures 3 [--use-gpu]

The driver (this module's `main`, run by the job) validates everything it can before any worker starts, and
creates no folder until every check has passed: the arguments, the config, the storage path, the cluster's
address and whether the cluster holds the workers asked for. Then a Ray Train TorchTrainer places
`--num-workers` workers (one GPU each with `--use-gpu`); Ray Train sets up their process group, and every
worker runs the job's trainer with both models behind DeepSpeed engines when the config names DeepSpeed configs:
`metadistil_scale.trainer.train` for a classification recipe (the teacher's fine-tuning, then each method), or
`metadistil_scale.lm.recipe.run_lm` for a causal-LM one (configs/lm_*.yaml: each method's LM student). The
recipe's keys say which (`--task` names it instead).

Fault tolerance. Each time the trainer (either task's: both train in the stage loop) completes a stage
checkpoint (`<output>/<stage>/last`, at every evaluation and at the end of a stage) the workers report it through
`ray.train.report`: rank 0 copies it into the run's storage (`<storage-path>/<name>/checkpoint_*`), with the
step's metrics. When a worker is lost, Ray Train restarts the whole worker group (up to `--max-failures`
times); the new workers take the latest reported checkpoint, put it back into the run folder unless the folder
already holds that step or a later one, and resume the trainer from it — so a failure costs the work since the
last checkpoint plus a restart. The final report carries `results.json`, `config.yaml` and each method's final
student, and its metrics (the results table) reach the driver, which prints them. Resubmitting with the same
`--name` and `--storage-path` continues a stopped run.

The run folder (`output_dir`) must be one that every worker sees (a shared file system on a multi-node
cluster), exactly as for the deepspeed launcher. A relative `output_dir` (the default's `runs/default`) would
land in a job's temporary working directory, so it is placed at `<storage-path>/<name>/output` instead. For the
same reason a relative `--storage-path` is refused under `ray job submit` (where the driver runs in Ray's
temporary copy of the working directory, which Ray deletes); run by hand, it means what it says.

A restart also resumes when no Ray checkpoint was registered yet (a crash during the first report): the run
folder remembers the run's name (`ray_run.txt`), and the trainer then resumes its own checkpoints there.

Checkpoints come back from the run folder or from Ray's storage only after they pass the checks of
metadistil_scale.checkpoint (checksums, weights-only loading): a restart never runs code planted in them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from metadistil_scale.backends.checkpointing import checkpoint_step, copy_checkpoint
from metadistil_scale.checkpoint import CheckpointError

MANIFEST = "manifest.json"
RUN_MARKER = "ray_run.txt"  # in the run folder: the name of the Ray run writing it
# Set by Ray's job supervisor for the driver of a submitted job (ray._private.runtime_env.constants).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class LaunchError(RuntimeError):
    """A problem with the cluster, the resources or the storage, found before training starts."""


# ---------------------------------------------------------------- the two kinds of run


TASKS = ("classification", "lm")  # metadistil-scale train | metadistil-scale lm-train
TASK_NAMES = {"classification": "classification", "lm": "causal-LM"}  # in messages


@dataclass(frozen=True)
class JobKind:
    """How the driver and the workers load, check, run and report one kind of run. The functions import their
    modules when called: a worker sets DS_ACCELERATOR before DeepSpeed is imported."""

    config_class: Callable[[], type]
    config_from_dict: Callable[[dict[str, Any]], Any]  # validated
    check_ranks: Callable[[Any, int], None]  # batches that do not split over the workers
    run: Callable[..., dict[str, Any]]  # (cfg, *, resume, on_checkpoint) -> results
    print_results: Callable[[dict[str, Any]], None]


def _classification() -> JobKind:
    from metadistil_scale.backends import check_distributed
    from metadistil_scale.cli import print_table
    from metadistil_scale.config import Config, config_from_dict

    def run(cfg: Any, **kwargs: Any) -> dict[str, Any]:
        from metadistil_scale.trainer import train

        return train(cfg, **kwargs)

    return JobKind(lambda: Config, config_from_dict, check_distributed, run, print_table)


def _lm() -> JobKind:
    from metadistil_scale.lm import recipe

    return JobKind(lambda: recipe.LMConfig, recipe.lm_config_from_dict, recipe.check_lm_distributed, recipe.run_lm,
                   lambda results: print(recipe.results_markdown(results)))


def job_kind(task: str) -> JobKind:
    return {"classification": _classification, "lm": _lm}[task]()


def resolve_task(requested: str, raw: dict[str, Any], recipe: str) -> str:
    """The task to run: --task, or with `auto` the kind whose config knows every key of the recipe (the
    classification task when both or neither do, as `metadistil-scale train`). A --task whose config does not
    know the recipe's keys while the other kind's does is refused, naming the key."""
    from metadistil_scale.config import ConfigError, _build

    refusals = {}
    for task in TASKS:
        try:
            _build(job_kind(task).config_class(), raw)
        except ConfigError as err:
            refusals[task] = str(err).split(" (known:")[0]
    fitting = [task for task in TASKS if task not in refusals]
    if requested == "auto":
        return fitting[0] if len(fitting) == 1 else "classification"
    if fitting and requested not in fitting:
        raise LaunchError(f"--task {requested} does not fit {recipe}: {refusals[requested]} for a "
                          f"{TASK_NAMES[requested]} run; it is a {TASK_NAMES[fitting[0]]} recipe: pass --task "
                          f"{fitting[0]} or leave --task out")
    return requested


# ---------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    from metadistil_scale.cli import add_config_arguments

    parser = argparse.ArgumentParser(prog="python -m metadistil_scale.launch.ray_job",
                                     description="Run the MetaDistil recipe as a Ray Train job.")
    add_config_arguments(parser)  # --config, --set, --output-dir, --deepspeed-teacher/-student, as for `metadistil-scale train`
    ray_args = parser.add_argument_group("Ray")
    ray_args.add_argument("--num-workers", type=int, default=2, help="data-parallel workers (default 2)")
    ray_args.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    ray_args.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default 1)")
    ray_args.add_argument("--storage-path", default="~/ray_results",
                          help="where Ray Train keeps the run's checkpoints: a folder every node sees, or a "
                               "cloud URI (s3://, gs://, ...) (default ~/ray_results)")
    ray_args.add_argument("--name", help="the run's name under the storage path; reuse it to continue a stopped "
                                         "run (default: metadistil-<date>-<time>)")
    ray_args.add_argument("--max-failures", type=int, default=3,
                          help="worker-group failures to recover from, -1 for no limit (default 3)")
    ray_args.add_argument("--task", choices=("auto", *TASKS), default="auto",
                          help="what the workers run: `classification` (as `metadistil-scale train`) or `lm` (as "
                               "`metadistil-scale lm-train`); default: the recipe's kind, so a causal-LM recipe "
                               "(configs/lm_*.yaml) runs as lm")
    ray_args.add_argument("--resume", action="store_true",
                          help="resume the trainer's own checkpoints in the run folder when Ray has none")
    ray_args.add_argument("--address", help="the cluster's address (host:port of its GCS, or 'auto'); under "
                                            "`ray job submit` the job's own cluster (RAY_ADDRESS)")
    ray_args.add_argument("--connect-timeout", type=float, default=60.0,
                          help="seconds to wait for the cluster to answer before giving up (default 60)")
    ray_args.add_argument("--wait-for-resources", action="store_true",
                          help="skip the check that the cluster holds the workers now (an autoscaling cluster "
                               "adds nodes on demand); without it a run that cannot be placed stops at once")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """The numeric options, before anything else (a zero or negative resource would fail deep inside Ray)."""
    if args.num_workers < 1:
        raise LaunchError(f"--num-workers must be >= 1, got {args.num_workers}")
    cpus = args.cpus_per_worker
    if not math.isfinite(cpus) or cpus < 0 or (cpus == 0 and not args.use_gpu):
        raise LaunchError(f"--cpus-per-worker must be a number > 0 (0 only with --use-gpu), got {cpus:g}")
    if args.max_failures < -1:
        raise LaunchError(f"--max-failures must be >= 0, or -1 for no limit, got {args.max_failures}")
    if not (math.isfinite(args.connect_timeout) and args.connect_timeout > 0):
        raise LaunchError(f"--connect-timeout must be a number of seconds > 0, got {args.connect_timeout:g}")


def resolve_storage(storage_path: str) -> str:
    """An absolute storage path (or the URI as given). A relative one is refused under `ray job submit`: the
    driver runs in Ray's temporary copy of the working directory, and the checkpoints would go with it."""
    if is_uri(storage_path):
        return storage_path
    path = Path(storage_path).expanduser()
    if not path.is_absolute() and RAY_JOB_ENV in os.environ:
        raise LaunchError(
            f"--storage-path {storage_path} is relative, and this job runs in Ray's temporary copy of its working "
            f"directory ({Path.cwd()}), which Ray deletes: give an absolute path (or a cloud URI)"
        )
    return str(path.resolve())


def resolve_output_dir(output_dir: str, storage_path: str, name: str) -> str:
    if Path(output_dir).is_absolute():
        return output_dir
    if is_uri(storage_path):
        raise LaunchError(
            f"output_dir={output_dir!r} is relative and the storage path {storage_path} is not a folder: pass "
            "--output-dir, an absolute folder every worker sees (a shared file system)"
        )
    return str(Path(storage_path) / name / "output")


# ---------------------------------------------------------------- checks before any worker starts


def is_uri(path: str) -> bool:
    return "://" in path


def check_creatable(path: str, what: str) -> None:
    """Refuse, creating nothing, a local folder that could not be made: under a file, or in a folder this user
    cannot write (check_writable, after the other checks, makes sure)."""
    if is_uri(path):
        return
    existing = next(p for p in (Path(path), *Path(path).parents) if p.exists())
    if not existing.is_dir():
        raise LaunchError(f"{what} {path} is not writable: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LaunchError(f"{what} {path} is not writable: this user cannot write in {existing}")


def check_writable(path: str, what: str) -> None:
    """Create `path` if needed and write and delete a probe file in it (a local folder or a cloud URI); the last
    check, since it creates the folder."""
    probe = f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        if is_uri(path):
            import pyarrow.fs

            fs, root = pyarrow.fs.FileSystem.from_uri(path)
            fs.create_dir(root, recursive=True)
            with fs.open_output_stream(f"{root.rstrip('/')}/{probe}") as stream:
                stream.write(b"ok")
            fs.delete_file(f"{root.rstrip('/')}/{probe}")
        else:
            folder = Path(path)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / probe).write_text("ok")
            (folder / probe).unlink()
    except Exception as err:  # any failure to write is the same answer for the user
        raise LaunchError(f"{what} {path} is not writable: {type(err).__name__}: {err}") from err


def answers_http(host: str, port: int) -> bool:
    """Whether host:port is an HTTP/1 server, as Ray's dashboard is. The GCS speaks gRPC: a plain HTTP request
    gets HTTP/2 frames back, which is no HTTP/1 status line."""
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/api/version")
        conn.getresponse().close()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def connect(address: str | None, timeout: float) -> None:
    """Join the cluster (never start one here: a job runs on the cluster it was submitted to)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    if address.startswith(("http://", "https://")):
        raise LaunchError(
            f"{address} is a dashboard (job submission) address: submit this module with "
            f"`ray job submit --address {address} -- python -m metadistil_scale.launch.ray_job ...`, or give "
            "--address the cluster's GCS address (host:6379)"
        )
    if address not in ("auto", "local") and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        host = host or "127.0.0.1"
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as err:
            raise LaunchError(
                f"no Ray cluster reachable at {address} ({err}): start one (launch/start_local_ray.sh) or "
                "check the address"
            ) from err
        # Ray would retry a dashboard's port as a GCS forever.
        if answers_http(host, int(port)):
            raise LaunchError(
                f"{address} answers HTTP: it is the dashboard (job server), not the cluster's GCS; use "
                f"`ray job submit --address http://{address} -- python -m metadistil_scale.launch.ray_job ...`, "
                f"or give --address the GCS address ({host}:6379 unless the head set --port)"
            )
    # ray.init retries an address that accepts connections but never completes the GCS handshake without end;
    # nothing has been created yet, so giving up is a plain exit.
    watchdog = threading.Timer(timeout, _give_up, [
        f"the Ray cluster at {address} did not answer within {timeout:g} s (--connect-timeout): check that it is "
        "the GCS address (host:6379) and, with token authentication, that RAY_AUTH_MODE=token and the token "
        "are set here"])
    watchdog.daemon = True
    watchdog.start()
    try:
        ray.init(address=address, logging_level="WARNING", configure_logging=True)
    except ConnectionError as err:
        raise LaunchError(f"no Ray cluster reachable at {address}: {err}") from err
    finally:
        watchdog.cancel()


def _give_up(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    os._exit(2)  # ray.init is blocked in Ray's core: no exception reaches it


def worker_resources(use_gpu: bool, cpus_per_worker: float) -> dict[str, float]:
    return {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}


def check_resources(num_workers: int, per_worker: dict[str, float]) -> None:
    """Refuse a run whose workers the cluster's live nodes cannot hold (Ray Train would wait for them forever)."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    fit = sum(min(int(res.get(key, 0.0) // need) for key, need in per_worker.items() if need > 0) for res in nodes)
    if fit < num_workers:
        totals = {key: sum(res.get(key, 0.0) for res in nodes) for key in per_worker}
        raise LaunchError(
            f"--num-workers {num_workers} asks for {num_workers} workers of {per_worker}, but the cluster's "
            f"{len(nodes)} node(s) hold {totals} in all: at most {fit} such workers fit. Lower --num-workers or "
            "--cpus-per-worker, add nodes, or pass --wait-for-resources on an autoscaling cluster"
        )
    free = ray.available_resources()
    if any(free.get(key, 0.0) < need * num_workers for key, need in per_worker.items()):
        print(f"[ray] note: other work holds part of the cluster now (free: {free}); the run starts when "
              "its workers fit")


# ---------------------------------------------------------------- the workers


def say(message: str) -> None:
    """A line in the job's log, once: Ray Train echoes a worker's print() to both of its output streams."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def train_worker(loop: dict[str, Any], reporter_class: type[Reporter] | None = None) -> None:
    """One Ray Train worker: restore the latest Ray checkpoint if there is one, then run the trainer.
    `reporter_class` replaces Reporter (a test's fault injection)."""
    if not loop["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import ray.train
    from transformers.utils import logging as hf_logging

    from metadistil_scale.backends import dist

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # it logs each engine's whole config at INFO

    if loop["use_gpu"]:
        import torch

        # The trainer and DeepSpeed put a rank on cuda:LOCAL_RANK: make that the GPU Ray gave this worker (Ray
        # has made it the current device).
        os.environ["LOCAL_RANK"] = str(torch.cuda.current_device())
    kind = job_kind(loop["task"])
    cfg = kind.config_from_dict(loop["config"])
    out = Path(cfg.output_dir)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    checkpoint = ray.train.get_checkpoint()
    resume = loop["resume"] or checkpoint is not None
    if rank == 0:  # the run folder is shared: one rank decides and writes
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                restore(Path(folder), out, checkpoint.path)
        # A restart of this run resumes the trainer's own checkpoints even when it died before Ray registered
        # one (a crash during the report).
        marker = out / RUN_MARKER
        if marker.is_file() and marker.read_text().strip() == loop["name"]:
            if not resume:
                say(f"[ray] restarting run {loop['name']} without a Ray Train checkpoint: resuming the run "
                    "folder's own")
            resume = True
        out.mkdir(parents=True, exist_ok=True)
        marker.write_text(loop["name"] + "\n")
    resume = dist.broadcast_object(resume)
    reporter = (reporter_class or Reporter)(out, rank, context.get_world_size())
    results = kind.run(cfg, resume=resume, on_checkpoint=reporter)
    reporter.final(results, cfg.methods)


class Reporter:
    """The trainer's checkpoint hook: report each stage checkpoint (and the final outputs) to Ray Train.

    Every rank calls it at the same points (ray.train.report is a barrier); rank 0 alone uploads, since the run
    folder it copies from holds every rank's shards."""

    def __init__(self, out: Path, rank: int, world: int) -> None:
        self.out, self.rank, self.world = out, rank, world

    def __call__(self, stage: str, path: Path, record: dict[str, Any]) -> None:
        metrics = {"stage": stage, **{k: v for k, v in record.items() if isinstance(v, int | float | str)}}
        manifest = {"stage": stage, "step": record["step"], "checkpoint": str(path.relative_to(self.out))}

        def fill(folder: Path) -> None:
            target = folder / manifest["checkpoint"]
            copy_checkpoint(path, target)
            if (path.parent / "metrics.jsonl").is_file():
                shutil.copy2(path.parent / "metrics.jsonl", target.parent / "metrics.jsonl")

        self._report(metrics, manifest, fill)

    def final(self, results: dict[str, Any], methods: list[str]) -> None:
        def fill(folder: Path) -> None:
            for name in ("results.json", "config.yaml"):
                shutil.copy2(self.out / name, folder / name)
            for method in methods:
                shutil.copytree(self.out / method / "student", folder / method / "student")

        self._report({"stage": "done", "results": results}, {"stage": "done"}, fill)

    def _report(self, metrics: dict[str, Any], manifest: dict[str, Any], fill) -> None:
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="metadistil-ckpt-") as tmp:
            fill(Path(tmp))
            (Path(tmp) / MANIFEST).write_text(json.dumps({**manifest, "output_dir": str(self.out)}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        what = "the final outputs" if manifest["stage"] == "done" else f"{manifest['stage']} step {manifest['step']}"
        say(f"[ray] reported {what} at {datetime.now().isoformat(timespec='milliseconds')}")


def restore(folder: Path, out: Path, source: str) -> None:
    """Put a reported checkpoint back into the run folder, unless the folder already holds it or a later one,
    or the reported copy does not pass the checks."""
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest["stage"] == "done":
        say(f"[ray] restarting after the run finished (Ray Train checkpoint {source}): re-reporting its results")
        return
    stage, step, rel = manifest["stage"], manifest["step"], manifest["checkpoint"]
    target, saved = out / rel, folder / rel
    say(f"[ray] restarting from Ray Train checkpoint {source} (stage {stage}, step {step})")
    try:
        have = checkpoint_step(target)
    except CheckpointError as err:
        say(f"[ray] the run folder's checkpoint is unusable, the reported one replaces it: {err}")
        have = None
    if have is not None and have >= step:
        say(f"[ray] the run folder already holds {target} at step {have}: resuming from it")
        return
    try:
        checkpoint_step(saved)
    except CheckpointError as err:
        say(f"[ray] not restoring Ray Train checkpoint {source}: {err}")
        return
    copy_checkpoint(saved, target)
    if (saved.parent / "metrics.jsonl").is_file():
        shutil.copy2(saved.parent / "metrics.jsonl", target.parent / "metrics.jsonl")
    say(f"[ray] copied the checkpoint into {target}")


# ---------------------------------------------------------------- the driver


def main(argv: list[str] | None = None, worker: Callable[[dict[str, Any]], None] | None = None) -> int:
    """The driver; `worker` replaces train_worker (a function importable by its module's name)."""
    sys.stdout.reconfigure(line_buffering=True)  # a job's log is a pipe: show progress as it happens
    args = build_parser().parse_args(argv)
    from metadistil_scale.config import ConfigError

    try:
        job = prepare_job(args)
    except (ConfigError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    trainer = make_trainer(job, args, worker)
    print(f"[ray] run {job.name}: {args.num_workers} workers of {job.per_worker}; checkpoints in "
          f"{job.storage}/{job.name}; run folder {job.cfg.output_dir}")
    started = time.perf_counter()
    import ray.train

    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        print(f"error: the run failed (max failures {args.max_failures}): {err}", file=sys.stderr)
        return 1
    return report_result(job, result, time.perf_counter() - started)


@dataclass(frozen=True)
class Job:
    """A checked run, ready for the workers."""

    task: str
    cfg: Any  # the task's config, its output_dir resolved
    name: str
    storage: str
    per_worker: dict[str, float]


def prepare_job(args: argparse.Namespace) -> Job:
    """Every check that can come before a worker starts, in an order that creates no folder until the others
    have passed: the arguments, the config, the storage path, the cluster and its resources."""
    from metadistil_scale.cli import config_overrides
    from metadistil_scale.config import read_raw_config

    check_args(args)
    raw = read_raw_config(args.config, config_overrides(args))
    task = resolve_task(args.task, raw, f"the recipe {args.config}" if args.config else "the --set overrides")
    kind = job_kind(task)
    cfg = kind.config_from_dict(raw)
    kind.check_ranks(cfg, args.num_workers)
    name = args.name or time.strftime("metadistil-%Y%m%d-%H%M%S")
    storage = resolve_storage(args.storage_path)
    cfg = replace(cfg, output_dir=resolve_output_dir(cfg.output_dir, storage, name))
    check_creatable(storage, "--storage-path")
    check_creatable(cfg.output_dir, "the run folder (output_dir)")
    connect(args.address, args.connect_timeout)
    per_worker = worker_resources(args.use_gpu, args.cpus_per_worker)
    if not args.wait_for_resources:
        check_resources(args.num_workers, per_worker)
    check_writable(storage, "--storage-path")
    check_writable(cfg.output_dir, "the run folder (output_dir)")
    return Job(task, cfg, name, storage, per_worker)


def make_trainer(job: Job, args: argparse.Namespace, worker: Callable[[dict[str, Any]], None] | None):
    """A Ray Train TorchTrainer whose workers run `worker` (default train_worker) on the job's config."""
    # The worker function by its module's name (not __main__'s), so that workers import it rather than
    # unpickle a copy.
    import ray.train
    from metadistil_scale.launch.ray_job import train_worker
    from ray.train.torch import TorchTrainer

    # Workers stay in the job's working directory (Ray Train would move them to a per-run folder), so relative
    # paths in the config (ds_configs/..., configs/...) mean on every node what they mean here.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    return TorchTrainer(
        worker or train_worker,
        train_loop_config={"task": job.task, "config": asdict(job.cfg), "resume": args.resume,
                           "use_gpu": args.use_gpu, "name": job.name},
        scaling_config=ray.train.ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                               resources_per_worker=job.per_worker),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=job.storage,
            failure_config=ray.train.FailureConfig(max_failures=args.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),  # each holds a full stage checkpoint
        ),
    )


def report_result(job: Job, result: Any, seconds: float) -> int:
    """Print the results table the workers reported and where the outputs are; 1 when none came back."""
    results = (result.metrics or {}).get("results")
    if results is None:
        print("error: the run ended without reporting its results", file=sys.stderr)
        return 1
    job_kind(job.task).print_results(results)
    print(f"[ray] finished in {seconds:.1f} s")
    print(f"results: {Path(job.cfg.output_dir) / 'results.json'}")
    for method in job.cfg.methods:
        print(f"final student ({method}): {Path(job.cfg.output_dir) / method / 'student'}")
    if result.checkpoint is not None:
        print(f"final Ray checkpoint (results.json, config.yaml, students): {result.checkpoint.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
