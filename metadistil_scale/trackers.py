"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases and MLflow.

`trackers: [tensorboard, wandb, mlflow]` sends every record a stage writes to its metrics.jsonl to each named
tracker as well, from rank 0 only, with the resolved config as the run's parameters; an experiment's plots go
to a `summary` run (TensorBoard and W&B as images, MLflow as artifacts). One tracker run per stage, named by
its folder (`kd`, `seed_1/metadistil`, `teacher`). Local files go under `tracking_dir` (default
`<output_dir>/tracking`):

    tensorboard/<run>/   event files: `tensorboard --logdir <tracking_dir>/tensorboard`
    mlruns/              the MLflow file store, unless MLFLOW_TRACKING_URI names another store
    wandb/               W&B run files; with WANDB_MODE=offline nothing leaves the machine (`wandb sync` uploads)

The trackers' own environment variables choose where else the records go (WANDB_PROJECT, WANDB_ENTITY,
WANDB_MODE, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), as with the Hugging Face Trainer's `report_to`.
This module imports no tracker package until a run opens one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metadistil_scale.config import Config
    from metadistil_scale.lm.recipe import LMConfig

# tracker name -> (the module it imports, the package that provides it)
TRACKER_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
}
PROJECT = "metadistil-scale"  # the W&B project when WANDB_PROJECT is not set


def missing_package(tracker: str) -> str | None:
    """The package to install for `tracker`, or None when it is importable (found without importing it)."""
    module, package = TRACKER_PACKAGES[tracker]
    if sys.modules.get(module, ...) is None:  # an import that Python has been told fails
        return package
    return None if importlib.util.find_spec(module) is not None else package


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """Where and under which names one tracker run is written."""

    root: Path  # tracking_dir
    name: str  # the stage's folder relative to the run folder: "kd", "seed_1/metadistil", "summary"
    group: str  # the run folder's name: the W&B group and the default MLflow experiment
    config: dict[str, Any]  # the resolved config, as nested mappings
    start_step: int = 0  # a resumed stage's step (its checkpoint's); 0 for a fresh start

    @property
    def params(self) -> dict[str, Any]:
        """The config flattened to dotted keys (`student_train.optim.lr`), for trackers with flat parameters."""
        return flatten(self.config)


class Tracker:
    """One tracker run. Subclasses open it in __init__(run, resume_id) and implement the three calls; a
    tracker with runs of its own sets `run_id`, which a resumed stage hands back as `resume_id`."""

    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_image(self, path: Path) -> None:
        """A plot the run wrote (a PNG)."""
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    def __init__(self, run: RunInfo, resume_id: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed stage writes its records after the checkpoint's step again: TensorBoard drops the old ones.
        purge = run.start_step + 1 if run.start_step else None
        self.writer = SummaryWriter(str(run.root / "tensorboard" / run.name), purge_step=purge)
        table = "\n".join(f"| {k} | {v} |" for k, v in run.params.items())
        self.writer.add_text("config", "| key | value |\n| --- | --- |\n" + table, global_step=run.start_step)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def log_image(self, path: Path) -> None:
        from matplotlib.image import imread

        self.writer.add_image(path.stem, imread(path)[..., :3], dataformats="HWC")

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, run: RunInfo, resume_id: str | None = None) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run.name, group=run.group,
                              dir=str(run.root), config=run.config, reinit="create_new", id=resume_id,
                              resume="allow" if resume_id else None)
        self.run_id = self.run.id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_image(self, path: Path) -> None:
        self.run.log({path.stem: self.wandb.Image(str(path))})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker(Tracker):
    BATCH = 100  # MLflow takes at most 100 params (and 1000 metrics) per log_batch call

    def __init__(self, run: RunInfo, resume_id: str | None = None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run.root / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 refuses a file store unless this says it is wanted
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.logged_through = -1  # a resumed run's last step: steps up to it were logged before the stop
        if resume_id is not None and self._reopen(resume_id):
            return
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", run.group)
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        params = [Param(k, str(v)) for k, v in run.params.items()]
        for start in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + self.BATCH])

    def _reopen(self, run_id: str) -> bool:
        """Continue the stopped run `run_id` (its parameters are logged already); False when it is gone."""
        from mlflow.exceptions import MlflowException

        try:
            logged = self.client.get_run(run_id).data.metrics
        except MlflowException:
            return False
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        steps = [m.step for key in logged for m in self.client.get_metric_history(run_id, key)]
        self.logged_through = max(steps, default=-1)
        return True

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.logged_through:  # logged before a crash; a resumed run repeats it exactly
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_image(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="plots")

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


TRACKER_CLASSES: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker,
}


class Trackers:
    """The trackers a run writes to (none on ranks other than 0): one call logs a record to all of them."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """The record's numbers (metrics.jsonl's record: losses, lr, grad norms, dev metrics, phase seconds)."""
        metrics = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def log_images(self, paths: list[Path]) -> None:
        for tracker in self.trackers:
            for path in paths:
                tracker.log_image(path)


def tracking_root(cfg: Config | LMConfig) -> Path:
    return Path(cfg.tracking_dir) if cfg.tracking_dir else Path(cfg.output_dir) / "tracking"


@contextlib.contextmanager
def open_trackers(cfg: Config | LMConfig, folder: Path, *, enabled: bool = True, start_step: int = 0) -> Iterator[Trackers]:
    """The tracker runs of the stage (or summary) written in `folder`, closed when the block ends (marked
    failed when it raises). `enabled` is False on ranks other than 0."""
    if not enabled or not cfg.trackers:
        yield Trackers([])
        return
    from metadistil_scale.checkpoint import atomic_write_text  # imports torch, which config validation avoids

    base = run_folder(folder)
    name = str(folder.resolve().relative_to(base))
    run = RunInfo(tracking_root(cfg), name, base.name, dataclasses.asdict(cfg), start_step)
    ids_path = folder / "trackers.json"  # the stage's tracker run ids, so that a resumed stage continues them
    resume_ids = json.loads(ids_path.read_text()) if start_step > 0 and ids_path.is_file() else {}
    opened: list[Tracker] = []
    try:
        for tracker in cfg.trackers:
            opened.append(TRACKER_CLASSES[tracker](run, resume_ids.get(tracker)))
        ids = {kind: tracker.run_id for kind, tracker in zip(cfg.trackers, opened) if tracker.run_id}
        if folder.is_dir():  # a stage's folder (an experiment's summary run has none, and is never resumed)
            atomic_write_text(json.dumps(ids) + "\n", ids_path)
        yield Trackers(opened)
    except BaseException:
        for tracker in opened:
            tracker.close(failed=True)
        raise
    for tracker in opened:
        tracker.close()


def stage_trackers(cfg: Config | LMConfig, folder: Path) -> Callable[[int], AbstractContextManager[Trackers]]:
    """A stage's `StageRun.open_trackers`: its tracker runs, opened by rank 0 alone, from the stage's start step."""
    from metadistil_scale.backends import dist  # imports torch, which config validation avoids

    return lambda start: open_trackers(cfg, folder, enabled=dist.is_main(), start_step=start)


def run_folder(folder: Path) -> Path:
    """The folder of the job a stage belongs to: the nearest one above it holding the job's config.yaml
    (`train` writes it in output_dir, `experiment` in its top folder above the seed folders)."""
    folder = folder.resolve()
    for parent in folder.parents:
        if (parent / "config.yaml").is_file():
            return parent
    return folder.parent


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and None as JSON text, so every tracker takes them as values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)) or value is None:
            flat[f"{prefix}{key}"] = json.dumps(value)
        else:
            flat[f"{prefix}{key}"] = value
    return flat
