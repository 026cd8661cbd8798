"""The classification task kind (text classification, regression, images): config -> data + models -> teacher
fine-tuning -> one stage per method -> results.

Methods (methods.py): `finetune` (the student alone, no teacher), `kd`, `metadistil`, `metadistil-no-pilot`.
Each stage runs in the shared stage loop (loop.py: steps, evaluation cadence, best/last checkpoints, resume,
stop-after, signals, metrics); this module supplies its data, models, dev evaluation and the best model's test.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from metadistil_scale.backends import check_distributed, dist, make_model
from metadistil_scale.backends.checkpointing import StageCheckpoint
from metadistil_scale.backends.torch_backend import retain_freed_host_memory
from metadistil_scale.checkpoint import (
    CheckpointError,
    atomic_dir,
    atomic_write_text,
    fingerprint_differences,
    seed_everything,
)
from metadistil_scale.config import IMAGE_TASKS, Config, ConfigError, StageConfig, config_to_dict, save_config
from metadistil_scale.data.image_task import load_image_task
from metadistil_scale.data.text import TaskInfo, TextCollator, load_text_task
from metadistil_scale.loop import PLANNED_STOP_EXIT as PLANNED_STOP_EXIT  # re-exported: the launchers' import
from metadistil_scale.loop import BatchStream, CheckpointHook, Evaluation, StageRun, run_stage_loop, to_device
from metadistil_scale.loop import StopRequested as StopRequested
from metadistil_scale.loop import StopSignals as StopSignals
from metadistil_scale.meta import MetaDistil
from metadistil_scale.methods import Method, StepContext, get_method
from metadistil_scale.metrics import compute_metrics, primary_metric
from metadistil_scale.models import (
    apply_lora,
    check_model,
    load_model,
    load_saved_like,
    save_model,
    saved_model_exists,
)
from metadistil_scale.models.checkpointing import enable_activation_checkpointing
from metadistil_scale.models.text import load_tokenizer
from metadistil_scale.objectives import Objective, prepare_models
from metadistil_scale.teacher_cache import open_teacher_cache
from metadistil_scale.trackers import stage_trackers

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class Task:
    """Everything a stage needs to know about the data (image tasks have no tokenizers)."""

    splits: Any
    info: TaskInfo
    collate: TextCollator | Callable[[Any], dict]
    teacher_tokenizer: Any = None
    student_tokenizer: Any = None

    def rows(self, split: str) -> list[dict]:
        return self.splits[split]


def load_task(cfg: Config) -> Task:
    d = cfg.data
    if d.task in IMAGE_TASKS:
        return Task(*load_image_task(d, DTYPES[cfg.dtype]))
    splits, info = load_text_task(
        d.task, d.data_files, split_seed=d.split_seed, dev_fraction=d.dev_fraction, test_fraction=d.test_fraction,
        quiz_fraction=d.quiz_fraction, max_train_examples=d.max_train_examples,
        max_eval_examples=d.max_eval_examples,
    )
    teacher_tok = load_tokenizer(cfg.model.teacher_checkpoint or cfg.model.teacher)
    student_tok = load_tokenizer(cfg.model.student)
    collate = TextCollator(teacher_tok, student_tok, d.max_length)
    return Task(splits, info, collate, teacher_tok, student_tok)


def check_output_dir(path: Path) -> None:
    """The run folder can be created and written (not a file, not under one, not read-only)."""
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"output_dir: {folder} is a file, not a folder")
            break
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir: cannot write to {path} ({err.strerror or err})") from err


def preflight(cfg: Config) -> Task:
    """Every check that can be made before work starts, then the task: the output folder is writable, the data
    has rows enough for each stage, and the models' configs fit the task (label and layer counts, read from
    their config files without loading weights)."""
    check_output_dir(Path(cfg.output_dir))
    task = load_task(cfg)
    for split in ("dev", "test"):
        if len(task.rows(split)) == 0:
            raise ConfigError(f"data: the {split} split of {task.info.name!r} has no rows")
    n_train = len(task.rows("train"))
    stages = [("student_train", cfg.student_train)]
    if cfg.model.teacher_checkpoint is None:
        stages.append(("teacher_finetune", cfg.teacher_finetune))
    for key, stage in stages:
        if stage.batch_size > n_train:
            raise ConfigError(f"{key}.batch_size: {stage.batch_size} is more than the {n_train} examples of the "
                              f"train split (a step needs one full batch)")
    if any(get_method(m).needs_quiz for m in cfg.methods) and len(task.rows("quiz")) < dist.world_size():
        raise ConfigError(f"data.quiz_fraction: the quiz split has {len(task.rows('quiz'))} examples, fewer than "
                          f"the {dist.world_size()} ranks")
    labels = task.info.num_labels
    check_model(cfg.model.teacher_checkpoint or cfg.model.teacher, labels)
    check_model(cfg.model.student, labels, num_layers=cfg.model.student_layers)
    return task


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: nn.Module, role: str, task: Task, split: str, batch_size: int, device
            ) -> tuple[np.ndarray, np.ndarray]:
    """The model's outputs (logits or scores) on a split, in the split's order, and the labels."""
    was_training = model.training
    model.eval()
    dataset = task.splits[split]
    predictions, labels = [], []
    for start in range(0, len(dataset), batch_size):
        batch = to_device(task.collate(dataset.select(range(start, min(start + batch_size, len(dataset))))), device)
        out = model(**batch[role])
        predictions.append((out.logits if hasattr(out, "logits") else out).float().cpu().numpy())
        labels.append(batch["labels"].cpu().numpy())
    model.train(was_training)
    return np.concatenate(predictions), np.concatenate(labels)


def evaluate(model: nn.Module, role: str, task: Task, split: str, batch_size: int, device) -> dict[str, float]:
    return compute_metrics(task.info.metric, *predict(model, role, task, split, batch_size, device))


def _per_example(outputs: np.ndarray, regression: bool) -> list:
    """What a per-example analysis needs: the predicted class ids, or the scores of a regression."""
    return outputs.reshape(len(outputs), -1)[:, 0].tolist() if regression else outputs.argmax(axis=1).tolist()


# ---------------------------------------------------------------- one stage


@dataclass
class StageResult:
    name: str
    method: str
    steps: int
    best_dev: float
    best_step: int
    test: dict[str, float]
    wall_time_s: float
    teacher_test: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def stage_fingerprint(cfg: Config, name: str, method: str) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed or reused: data, models, method, optimisation."""
    # Keys are the config's own, so a refusal names the dotted key that differs; eval_every decides which step
    # becomes the best checkpoint, so it is part of what a resumed run must keep.
    full = config_to_dict(cfg)
    common = {"method": method, "seed": cfg.seed, "eval_every": cfg.eval_every, "data": full["data"],
              "dtype": cfg.dtype}
    if name == "teacher":  # the teacher's fine-tuning depends on nothing of the student's
        model = {k: full["model"][k] for k in ("teacher", "attn_implementation")}
        return {**common, "teacher_finetune": full["teacher_finetune"], "model": model}
    return {**common, "student_train": full["student_train"], "model": full["model"], "distill": full["distill"],
            "meta": full["meta"] if get_method(method).trains_teacher else None}


def total_steps(stage: StageConfig, n_train: int) -> int:
    per_epoch = n_train // stage.batch_size
    return stage.max_steps or max(1, math.ceil(stage.epochs * per_epoch))


def run_stage(
    name: str,
    method: str,
    cfg: Config,
    task: Task,
    out_dir: Path,
    student: nn.Module,
    teacher: nn.Module | None,
    *,
    resume: bool,
    stop_after: int | None = None,
    on_checkpoint: CheckpointHook | None = None,
) -> StageResult:
    """Train one method to the end of its budget through the stage loop (loop.py), then test its best
    checkpoint. For `finetune` the trained model is `student` (used for the teacher's own fine-tuning too)."""
    algorithm = get_method(method)
    stage_key, role = ("teacher_finetune", "teacher") if name == "teacher" else ("student_train", "student")
    stage = getattr(cfg, stage_key)
    device = next(student.parameters()).device
    steps = total_steps(stage, len(task.rows("train")))
    check_distributed(cfg, dist.world_size())  # also for callers other than train() (experiments, Ray workers)
    stream = _stage_stream(task, "train", stage.batch_size, cfg.seed, stage.micro_batch_size)
    ctx = _step_context(algorithm, cfg, task, stage_key, role, steps, student, teacher, device)
    trained_teacher = teacher if algorithm.trains_teacher else None  # saved, evaluated and tested with the student

    fingerprint = stage_fingerprint(cfg, name, method)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Both engines when the teacher trains; their optimizers, schedules, the RNG and the step.
    models = {"student": ctx.student, **({"teacher": ctx.teacher} if algorithm.trains_teacher else {})}
    evaluation = Evaluation(
        run=lambda: _evaluate_dev(student, role, trained_teacher, task, cfg, device),
        key=f"dev_{primary_metric(task.info.metric)}",
        save_best=lambda: _save_best(ctx, out_dir, student, trained_teacher, task, role))
    run = StageRun(name, algorithm, ctx, stream, steps, cfg.log_every, cfg.eval_every, evaluation,
                   StageCheckpoint(out_dir, fingerprint, models, stage_fingerprint(Config(), name, method)),
                   out_dir / "metrics.jsonl",
                   open_trackers=stage_trackers(cfg, out_dir))
    state = run_stage_loop(run, resume=resume, seed=cfg.seed, stop_after=stop_after, on_checkpoint=on_checkpoint)
    return _test_best(name, method, steps, state, fingerprint, cfg, task, out_dir, role, student, trained_teacher)


def _save_best(ctx: StepContext, out_dir: Path, student: nn.Module, trained_teacher: nn.Module | None, task: Task,
               role: str) -> None:
    """The best weights as `save_pretrained` folders. Under ZeRO-3 the weights are shards: gather them (on
    every rank), rank 0 writes."""
    teacher_gathered = ctx.teacher.gathered() if trained_teacher is not None else contextlib.nullcontext()
    with ctx.student.gathered(), teacher_gathered:
        if dist.is_main():
            atomic_dir(out_dir / "best", lambda tmp: _save_models(tmp, student, trained_teacher, task, role))
    dist.barrier()


def _test_best(name: str, method: str, steps: int, state: dict[str, Any], fingerprint: dict[str, Any],
               cfg: Config, task: Task, out_dir: Path, role: str, student: nn.Module,
               trained_teacher: nn.Module | None) -> StageResult:
    """Test the best-on-dev weights (plain copies: rank 0 alone, then it tells the others); write done.json."""
    device = next(student.parameters()).device
    test = teacher_test = None
    if dist.is_main():
        # Test predictions are kept beside done.json for per-example analyses (paired bootstraps over examples).
        regression = task.info.is_regression
        outputs, labels = predict(_load_best(out_dir / "best", student), role, task, "test", cfg.eval_batch_size,
                                  device)
        test = compute_metrics(task.info.metric, outputs, labels)
        kept = {"labels": labels.tolist(), "student": _per_example(outputs, regression)}
        if trained_teacher is not None:
            outputs, _ = predict(_load_best(out_dir / "best" / "teacher", trained_teacher), "teacher", task, "test",
                                 cfg.eval_batch_size, device)
            teacher_test = compute_metrics(task.info.metric, outputs, labels)
            kept["teacher"] = _per_example(outputs, regression)
        atomic_write_text(json.dumps(kept) + "\n", out_dir / "test_predictions.json")
    test, teacher_test, state = dist.broadcast_object((test, teacher_test, state))
    result = StageResult(name, method, steps, state["best_dev"], state["best_step"], test,
                         state["wall_time_s"], teacher_test)
    if dist.is_main():
        atomic_write_text(json.dumps({"config": fingerprint, "result": result.__dict__}, indent=2),
                          out_dir / "done.json")
    dist.barrier()
    return result


def _evaluate_dev(student: nn.Module, role: str, trained_teacher: nn.Module | None, task: Task, cfg: Config,
                  device: torch.device) -> dict[str, float]:
    """dev_* metrics of the student and teacher_dev_* of a teacher that trains. Every rank evaluates (ZeRO-3
    forwards are collective); rank 0's figures decide for all."""
    dev = dist.broadcast_object(evaluate(student, role, task, "dev", cfg.eval_batch_size, device))
    record = {f"dev_{k}": v for k, v in dev.items()}
    if trained_teacher is not None:
        teacher_dev = dist.broadcast_object(evaluate(trained_teacher, "teacher", task, "dev", cfg.eval_batch_size,
                                                     device))
        record.update({f"teacher_dev_{k}": v for k, v in teacher_dev.items()})
    return record


def _stage_stream(task: Task, split: str, batch_size: int, seed: int, micro: int | None) -> BatchStream:
    """A stream over `split` that gives this rank its slice of every global batch."""
    return BatchStream(task.rows(split), batch_size, seed, task.collate, micro, dist.rank(), dist.world_size())


def _step_context(method: Method, cfg: Config, task: Task, stage_key: str, role: str, steps: int,
                  student: nn.Module, teacher: nn.Module | None, device: torch.device) -> StepContext:
    """The backend models and the streams `method` asks for (built in this order: student, teacher, streams)."""
    stage = getattr(cfg, stage_key)
    batching = dict(batch_size=stage.batch_size, micro_batch_size=stage.micro_batch_size, stage_key=stage_key)
    ds_key = "deepspeed_teacher" if role == "teacher" else "deepspeed_student"
    if teacher is not None:  # both return what the objective reads; a narrower student gets its projection
        prepare_models(Objective.from_config(cfg.distill, task.info.is_regression), teacher, student)
    student_model = make_model(student, stage.optim, steps, ds_config=getattr(cfg, ds_key), ds_key=ds_key,
                               optim_key=f"{stage_key}.optim", functional=method.trains_teacher, **batching)
    teacher_model = None
    if teacher is not None:
        teacher.eval()  # the teacher's logits come without dropout; MetaDistil trains it in this mode too
        # Its schedule (warmup, decays) spans its own updates, not the stage's steps.
        teacher_model = make_model(teacher, method.teacher_optim(cfg.meta),
                                   method.teacher_schedule_steps(cfg.meta, steps), ds_config=cfg.deepspeed_teacher,
                                   ds_key="deepspeed_teacher", optim_key="meta.teacher_optim", **batching)
    ctx = StepContext(student_model, teacher_model, cfg.distill, cfg.meta, device, role, task.info.is_regression)
    ctx.teacher_cache = open_teacher_cache(cfg, method, teacher)
    if method.trains_teacher:
        ctx.metadistil = MetaDistil(teacher_model, student_model, cfg.distill, cfg.meta, task.info.is_regression)
    if method.needs_quiz:
        # Every rank takes an equal slice of the quiz batch (a small quiz set rounds it down to fit).
        world = dist.world_size()
        quiz_rows = len(task.rows("quiz"))
        quiz_size = (quiz_rows if cfg.meta.quiz_whole_set else min(cfg.meta.quiz_batch_size, quiz_rows)) // world * world
        micro = stage.micro_batch_size and min(stage.micro_batch_size, quiz_size // world)
        if cfg.meta.quiz_whole_set:  # memory bounded by a quiz batch per pass
            micro = min(micro or quiz_size, max(1, cfg.meta.quiz_batch_size // world))
        ctx.quiz_stream = _stage_stream(task, "quiz", quiz_size, cfg.meta.quiz_seed, micro)
    if method.needs_pilot_stream:
        ctx.pilot_stream = _stage_stream(task, "train", stage.batch_size, cfg.seed + 7919, stage.micro_batch_size)
    return ctx


def _save_models(folder: Path, model: nn.Module, teacher: nn.Module | None, task: Task, role: str) -> None:
    save_model(model, folder, task.teacher_tokenizer if role == "teacher" else task.student_tokenizer)
    if teacher is not None:
        save_model(teacher, folder / "teacher", task.teacher_tokenizer)


def _load_best(folder: Path, like: nn.Module) -> nn.Module:
    """The saved best weights, in a model of the live one's class, dtype and device."""
    return load_saved_like(folder, like)


def load_done(out_dir: Path, expected_config: dict | None = None, defaults: dict | None = None) -> StageResult | None:
    """A finished stage's result, if its done.json was written under `expected_config` (see
    fingerprint_differences for `defaults`)."""
    path = out_dir / "done.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if expected_config is not None and fingerprint_differences(saved["config"], expected_config, defaults):
        return None
    return StageResult(**saved["result"])


# ---------------------------------------------------------------- the whole job


def build_models(cfg: Config, info: TaskInfo, teacher_source: str, device) -> tuple[nn.Module, nn.Module]:
    common = dict(in_channels=getattr(info, "in_channels", None), attn_implementation=cfg.model.attn_implementation,
                  dtype=DTYPES[cfg.dtype])
    teacher = load_model(teacher_source, info.num_labels, **common)
    student = load_model(cfg.model.student, info.num_labels, num_layers=cfg.model.student_layers, **common)
    for model, role in ((teacher, "teacher"), (student, "student")):
        if getattr(cfg.model, f"{role}_activation_checkpointing"):
            enable_activation_checkpointing(model, role)
    if cfg.model.teacher_lora is not None:
        teacher = apply_lora(teacher, cfg.model.teacher_lora, "teacher")
    if cfg.model.student_lora is not None:
        student = apply_lora(student, cfg.model.student_lora, "student")
    return teacher.to(device), student.to(device)


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device: cuda was asked for but no CUDA device is available")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", dist.local_rank())  # one GPU per rank


def configure_cpu_allocator(cfg: Config, device: torch.device) -> None:
    """The `cpu_allocator` key, process-wide: `retain` (the default) on a CPU run keeps freed memory in glibc's
    heap (retain_freed_host_memory; a MetaDistil step on CPU ran ~8% faster), `system` leaves glibc's
    defaults. Called by the entry points (train, experiment, lm-train) once they know the device."""
    if device.type == "cpu" and cfg.cpu_allocator == "retain":
        retain_freed_host_memory()


def fine_tune_teacher(cfg: Config, task: Task, out: Path, device, resume: bool, stop_after: int | None,
                      on_checkpoint: CheckpointHook | None = None):
    """The teacher's own fine-tuning stage, reused when a finished teacher exists for this config."""
    if cfg.model.teacher_checkpoint is not None:
        return Path(cfg.model.teacher_checkpoint), None
    folder = out / "teacher"
    done = load_done(folder)
    if done is not None and saved_model_exists(folder / "best"):
        ckpt_config = json.loads((folder / "done.json").read_text())["config"]
        if not fingerprint_differences(ckpt_config, stage_fingerprint(cfg, "teacher", "finetune"),
                                       stage_fingerprint(Config(), "teacher", "finetune")):
            if dist.is_main():
                tqdm.write(f"[teacher] reusing the fine-tuned teacher in {folder / 'best'}")
            return folder / "best", done
    seed_everything(cfg.seed)
    teacher = load_model(cfg.model.teacher, task.info.num_labels, in_channels=getattr(task.info, "in_channels", None),
                         attn_implementation=cfg.model.attn_implementation, dtype=DTYPES[cfg.dtype]).to(device)
    result = run_stage("teacher", "finetune", cfg, task, folder, teacher, None, resume=resume, stop_after=stop_after,
                       on_checkpoint=on_checkpoint)
    return folder / "best", result


def train(cfg: Config, *, resume: bool = False, stop_after: int | None = None,
          on_checkpoint: CheckpointHook | None = None) -> dict[str, Any]:
    """The main job: fine-tune (or reuse) the teacher, train the student with each method, test, report."""
    started = time.perf_counter()
    # Under torchrun or the deepspeed launcher every rank runs this same job on its slice of each batch.
    dist.init_distributed(use_deepspeed=bool(cfg.deepspeed_teacher or cfg.deepspeed_student))
    check_distributed(cfg, dist.world_size())
    main = dist.is_main()
    task = preflight(cfg)
    out = Path(cfg.output_dir)
    if main:
        save_config(cfg, out / "config.yaml")
    device = resolve_device(cfg)
    configure_cpu_allocator(cfg, device)

    teacher_dir, teacher_result = fine_tune_teacher(cfg, task, out, device, resume, stop_after, on_checkpoint)
    rows = []
    if teacher_result is not None:
        rows.append(_row("teacher", teacher_result))
    else:
        teacher, _ = build_models(cfg, task.info, str(teacher_dir), device)
        rows.append({"model": "teacher", "method": "finetune",
                     "test": evaluate(teacher, "teacher", task, "test", cfg.eval_batch_size, device)})

    for method in cfg.methods:
        seed_everything(cfg.seed)
        teacher, student = build_models(cfg, task.info, str(teacher_dir), device)
        result = run_stage(method, method, cfg, task, out / method, student,
                           teacher if get_method(method).uses_teacher else None, resume=resume, stop_after=stop_after,
                           on_checkpoint=on_checkpoint)
        if main:
            atomic_dir(out / method / "student", lambda tmp, m=method: _copy_best(out / m / "best", tmp))
        rows.append(_row("student", result))

    results = {"task": task.info.name, "metric": primary_metric(task.info.metric), "seed": cfg.seed,
               "rows": rows, "wall_time_s": time.perf_counter() - started}
    if main:
        atomic_write_text(json.dumps(results, indent=2), out / "results.json")
    dist.barrier()
    return results


def _copy_best(best: Path, tmp: Path) -> None:
    import shutil

    for item in best.iterdir():
        if item.is_file():
            shutil.copy2(item, tmp / item.name)


def _row(model: str, r: StageResult) -> dict[str, Any]:
    row = {"model": model, "method": r.method, "steps": r.steps, "best_dev": r.best_dev, "best_step": r.best_step,
           "test": r.test, "wall_time_s": r.wall_time_s}
    if r.teacher_test is not None:
        row["teacher_test"] = r.teacher_test
    return row
