"""The stage loop: one method trained to the end of its budget, the same for every task kind and launcher.

The loop owns the steps, the evaluation cadence, the best and last checkpoints, resume, `stop_after`, stop
signals, the progress bar and metrics.jsonl. A task kind (trainer.py for classification, regression and
images; lm/recipe.py for causal LMs) supplies the rest through `StageRun`: the step context its method works
on, the batch stream, how to evaluate and how to keep the best model.

A stage is resumable: its last checkpoint holds the models, optimizers, schedules, the RNG and the loop's
state (step, best, wall time); the data position is a function of the step, so a resumed stage ends with the
weights and metrics of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from metadistil_scale.backends import dist
from metadistil_scale.backends.checkpointing import StageCheckpoint
from metadistil_scale.checkpoint import atomic_write_text, seed_everything
from metadistil_scale.trackers import Trackers

if TYPE_CHECKING:  # methods.py imports this module's batch helpers
    from metadistil_scale.methods import Method, StepContext

PLANNED_STOP_EXIT = 3  # the CLI's exit code after a --stop-after checkpoint


class StopRequested(Exception):
    """Raised after a checkpoint when `stop_after` steps are reached or a stop signal came (a pre-empted job).

    `exit_code` is 3 for a planned stop, 128 + the signal's number for SIGINT/SIGTERM (the shell's convention)."""

    def __init__(self, message: str, exit_code: int = PLANNED_STOP_EXIT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM ask the running stage to stop at the next step boundary, after a checkpoint,
    instead of dying mid-step; a second signal of the same kind interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signum:  # asked twice: stop now
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
        self.received = signum

    def should_stop(self) -> bool:
        """Whether any rank received a stop signal (a collective when several ranks run)."""
        asked = self.received is not None
        return dist.all_reduce_sum(float(asked)) > 0 if dist.world_size() > 1 else asked

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# Called on every rank right after a stage's `last` checkpoint is complete, with the stage's name, the
# checkpoint's path (a folder or last.pt) and the step's record (loss, dev metrics, step). A launcher uses it to
# hand the checkpoint to its own fault tolerance (Ray Train); it may be a collective.
CheckpointHook = Callable[[str, Path, dict[str, Any]], None]


# ---------------------------------------------------------------- batches


class BatchStream:
    """Deterministic batches: epoch e is a permutation drawn from (seed, e); step k is its (k mod E)-th batch.
    The position is a function of the step alone, which is what makes resume exact. With data parallelism every
    rank draws the same global batch and keeps its own contiguous slice, in micro-batches."""

    def __init__(self, dataset, batch_size: int, seed: int, collate, micro_batch_size: int | None,
                 rank: int = 0, world: int = 1) -> None:
        if len(dataset) < batch_size:
            raise ValueError(f"the split has {len(dataset)} examples, fewer than one batch of {batch_size}")
        if batch_size % world:
            raise ValueError(f"a batch of {batch_size} does not split over {world} data-parallel ranks")
        self.dataset, self.batch_size, self.seed, self.collate = dataset, batch_size, seed, collate
        self.local = batch_size // world
        self.start = rank * self.local
        self.micro = micro_batch_size or self.local
        self.per_epoch = len(dataset) // batch_size  # drop_last: every step sees a full batch

    def __call__(self, step: int) -> list[dict]:
        epoch, index = divmod(step, self.per_epoch)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        ids = order[index * self.batch_size : (index + 1) * self.batch_size].tolist()
        ids = ids[self.start : self.start + self.local]
        return [self.collate(self.dataset.select(ids[i : i + self.micro])) for i in range(0, len(ids), self.micro)]


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch


# ---------------------------------------------------------------- the loop


@dataclass
class Evaluation:
    """How a task kind judges the trained model during a stage."""

    run: Callable[[], dict[str, float]]  # the record's evaluation entries (a collective: every rank calls it)
    key: str  # the entry that picks the best step, e.g. "dev_accuracy"
    higher_is_better: bool = True
    save_best: Callable[[], None] | None = None  # keeps the best model (collective); None: the last one counts


@dataclass
class StageRun:
    """One stage as the loop sees it; `method.step(ctx, step, parts, logged)` is the training step."""

    name: str  # in messages and the progress bar
    method: Method
    ctx: StepContext  # what `method` works on
    stream: Callable[[int], list[Any]]  # step -> this rank's micro-batches (on the CPU)
    steps: int
    log_every: int
    eval_every: int
    evaluation: Evaluation
    checkpoint: StageCheckpoint
    metrics_path: Path
    # start step -> the trackers that get every metrics.jsonl record too (trackers.py); None: none
    open_trackers: Callable[[int], AbstractContextManager[Trackers]] | None = None


def run_stage_loop(run: StageRun, *, resume: bool, seed: int, stop_after: int | None = None,
                   on_checkpoint: CheckpointHook | None = None) -> dict[str, Any]:
    """Train from the last checkpoint (or a fresh, seeded start) to `run.steps`; returns the loop's state:
    step, best_dev, best_step, wall_time_s and `last_eval`, the latest evaluation's entries."""
    state = start_state(run, resume, seed)
    run.ctx.student.module.train()
    start_time = time.perf_counter() - state["wall_time_s"]
    main = dist.is_main()
    bar = tqdm(total=run.steps, initial=state["step"], desc=run.name, dynamic_ncols=True, leave=False,
               disable=not main)
    # The bar is closed (its line cleared) however the loop ends, so an error prints on a line of its own.
    trackers = run.open_trackers(state["step"]) if run.open_trackers else contextlib.nullcontext(Trackers([]))
    with open(run.metrics_path, "a") if main else contextlib.nullcontext(_NoLog()) as log, \
            StopSignals() as signals, bar, trackers as tracked, \
            run.ctx.teacher_cache or contextlib.nullcontext():  # the cache writes its new rows when the stage ends
        while state["step"] < run.steps:
            record = _train_step(run, state)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            evaluated = state["step"] % run.eval_every == 0 or state["step"] == run.steps
            if evaluated:
                _evaluate(run, state, record)
            if state["step"] % run.log_every == 0 or evaluated:
                log.write(json.dumps(record) + "\n")
                log.flush()
                tracked.log(record, state["step"])
            state["wall_time_s"] = time.perf_counter() - start_time
            if evaluated:
                run.checkpoint.save(state)
                if on_checkpoint is not None:
                    on_checkpoint(run.name, run.checkpoint.path,
                                  {**record, "best_dev": state["best_dev"], "steps": run.steps})
            _stop_if_asked(run, state, signals, stop_after)
    return state


def _train_step(run: StageRun, state: dict[str, Any]) -> dict[str, Any]:
    step = state["step"]
    parts = to_device(run.stream(step), run.ctx.device)
    logged = (step + 1) % run.log_every == 0 or (step + 1) % run.eval_every == 0 or step + 1 == run.steps
    record = run.method.step(run.ctx, step, parts, logged)
    state["step"] = step + 1
    record.update(step=state["step"], lr=run.ctx.student.lr)
    return record


def _evaluate(run: StageRun, state: dict[str, Any], record: dict[str, Any]) -> None:
    """Evaluate into `record`; a better score than the best so far becomes the best checkpoint."""
    evaluation = run.evaluation
    scores = evaluation.run()
    record.update(scores)
    state["last_eval"] = scores
    score = scores[evaluation.key]
    if score > state["best_dev"] if evaluation.higher_is_better else score < state["best_dev"]:
        state.update(best_dev=score, best_step=state["step"])
        if evaluation.save_best is not None:
            evaluation.save_best()


def _stop_if_asked(run: StageRun, state: dict[str, Any], signals: StopSignals, stop_after: int | None) -> None:
    """Checkpoint and raise StopRequested on a stop signal or at `stop_after` (never after the last step)."""
    if state["step"] >= run.steps:
        return
    if signals.should_stop():
        run.checkpoint.save(state)
        sig = signal.Signals(signals.received or signal.SIGTERM)
        raise StopRequested(f"[{run.name}] {sig.name} received: stopped at step {state['step']}/{run.steps} with a "
                            "checkpoint; rerun the same command with --resume to continue", 128 + sig.value)
    if stop_after is not None and state["step"] >= stop_after:
        run.checkpoint.save(state)
        raise StopRequested(f"[{run.name}] stopped at step {state['step']}/{run.steps}; rerun with --resume")


def start_state(run: StageRun, resume: bool, seed: int) -> dict[str, Any]:
    """The resumed checkpoint's state (the log cut back to its step), or a fresh, seeded start."""
    last = run.checkpoint
    if resume and last.exists():
        state = last.load()
        if dist.is_main():
            _truncate_jsonl(run.metrics_path, state["step"])
            tqdm.write(f"[{run.name}] resumed from {last.path} at step {state['step']}/{run.steps}")
        return state
    seed_everything(seed)
    if dist.is_main():
        run.metrics_path.unlink(missing_ok=True)
    worst = -math.inf if run.evaluation.higher_is_better else math.inf
    return {"step": 0, "best_dev": worst, "best_step": 0, "wall_time_s": 0.0}


class _NoLog:
    """The metrics log of ranks other than 0."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop records written after the checkpoint, so a resumed run's log equals an uninterrupted one's."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text("".join(line + "\n" for line in kept), path)
