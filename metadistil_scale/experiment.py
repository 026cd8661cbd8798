"""The comparison the paper makes, with seeds: every method in `cfg.methods` once per seed in `cfg.seeds`.

Layout under `output_dir`:

    seed_<s>/teacher/          the teacher fine-tuned for seed s, shared by that seed's methods
    seed_<s>/<method>/         one run (metrics.jsonl, best/, done.json), as `train` writes it
    runs.json, runs.csv        one record per run: test metric, teacher's metric, dev curves, wall time
    summary.{json,csv,md}      mean ± std per method and metadistil − kd paired over seeds (95% t-interval, a
                               bootstrap over seeds, the variance ratio and, for accuracy, a bootstrap over the
                               test examples from each run's test_predictions.json)
    dev_curves.png             the student's dev metric against steps (mean and min–max over seeds)
    teacher_dev_curves.png     the teacher's own dev metric during the runs that train it

A finished run (done.json written under the same configuration) is reused, so an interrupted experiment
continues where it stopped; `resume` also continues the unfinished run from its last checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from metadistil_scale.backends import check_distributed, dist
from metadistil_scale.checkpoint import atomic_write_text, seed_everything
from metadistil_scale.config import Config, save_config
from metadistil_scale.methods import get_method
from metadistil_scale.metrics import primary_metric
from metadistil_scale.report import per_example_bootstrap, plot_curves, summarize, write_summary
from metadistil_scale.teacher_cache import cache_root
from metadistil_scale.trackers import open_trackers, tracking_root
from metadistil_scale.trainer import (
    StageResult,
    build_models,
    configure_cpu_allocator,
    evaluate,
    fine_tune_teacher,
    load_done,
    preflight,
    resolve_device,
    run_stage,
    stage_fingerprint,
)

TEACHER = "teacher"  # the fine-tuned teacher's row in the table (its test metric before any distillation)
RUN_COLUMNS = ("method", "seed", "metric", "teacher_metric", "best_dev", "best_step", "steps", "wall_time_s")


def read_curves(metrics_path: Path, metric: str, split: str = "dev") -> tuple[list[list[float]], list[list[float]]]:
    """[[step, metric], ...] on `split` of the student and of the teacher (MetaDistil runs) from a metrics.jsonl
    (records with `<split>_<metric>` and `teacher_<split>_<metric>`)."""
    student, teacher = [], []
    for line in metrics_path.read_text().splitlines():
        if not line:
            continue
        record = json.loads(line)
        if f"{split}_{metric}" in record:
            student.append([record["step"], record[f"{split}_{metric}"]])
        if f"teacher_{split}_{metric}" in record:
            teacher.append([record["step"], record[f"teacher_{split}_{metric}"]])
    return student, teacher


def run_record(result: StageResult, seed: int, metric: str, folder: Path, teacher_metric: float | None) -> dict:
    curve, teacher_curve = read_curves(folder / "metrics.jsonl", metric)
    if result.teacher_test is not None:  # the teacher was trained: report it as it ended
        teacher_metric = result.teacher_test[metric]
    return {"method": result.method, "seed": seed, "metric": result.test[metric], "teacher_metric": teacher_metric,
            "best_dev": result.best_dev, "best_step": result.best_step, "steps": result.steps,
            "wall_time_s": result.wall_time_s, "curve": curve, "teacher_curve": teacher_curve}


def run_experiment(cfg: Config, *, resume: bool = False) -> dict[str, Any]:
    """Run methods × seeds, then write the records, the summary tables and the plots. Returns the summary."""
    # Under the deepspeed launcher or torchrun every rank runs every stage; rank 0 alone writes and reports.
    check_distributed(cfg, dist.world_size())
    main = dist.is_main()
    task = preflight(cfg)  # the splits depend on data.split_seed only: one task serves every seed
    out = Path(cfg.output_dir)
    if main:
        save_config(cfg, out / "config.yaml")
    device = resolve_device(cfg)
    configure_cpu_allocator(cfg, device)
    metric = primary_metric(task.info.metric)

    records = []
    given_teacher_metric: dict[str, float] = {}  # a given checkpoint is the same for every seed: measure it once
    for seed in cfg.seeds:
        # One tracking folder and one teacher cache for the whole experiment (runs named seed_<s>/<method>).
        run_cfg = dataclasses.replace(cfg, seed=seed, output_dir=str(out / f"seed_{seed}"),
                                      tracking_dir=str(tracking_root(cfg)),
                                      teacher_cache=dataclasses.replace(cfg.teacher_cache, dir=str(cache_root(cfg))))
        seed_dir = Path(run_cfg.output_dir)
        teacher_dir, teacher_result = fine_tune_teacher(run_cfg, task, seed_dir, device, resume, None)
        if teacher_result is None:  # a given teacher checkpoint: measure it
            if str(teacher_dir) not in given_teacher_metric:
                teacher, _ = build_models(run_cfg, task.info, str(teacher_dir), device)
                given_teacher_metric[str(teacher_dir)] = evaluate(teacher, "teacher", task, "test",
                                                                  cfg.eval_batch_size, device)[metric]
            teacher_metric = given_teacher_metric[str(teacher_dir)]
        else:
            teacher_metric = teacher_result.test[metric]
        records.append({"method": TEACHER, "seed": seed, "metric": teacher_metric, "teacher_metric": None,
                        "wall_time_s": teacher_result.wall_time_s if teacher_result else 0.0})

        for method in cfg.methods:
            uses_teacher = get_method(method).uses_teacher
            folder = seed_dir / method
            expected = json.loads(json.dumps(stage_fingerprint(run_cfg, method, method)))
            result = load_done(folder, expected, stage_fingerprint(Config(), method, method))
            if result is None:
                seed_everything(seed)
                teacher, student = build_models(run_cfg, task.info, str(teacher_dir), device)
                result = run_stage(method, method, run_cfg, task, folder, student,
                                   teacher if uses_teacher else None, resume=resume)
            elif main:
                tqdm.write(f"[seed {seed}] reusing the finished {method} run in {folder}")
            if not main:
                continue
            records.append(run_record(result, seed, metric, folder,
                                      teacher_metric if uses_teacher else None))
            tqdm.write(f"[seed {seed}] {method}: test {metric} {records[-1]['metric']:.4f} "
                       f"({result.wall_time_s:.0f} s)")

    summary = write_report(records, out, task=task.info.name, metric=metric) if main else None
    with open_trackers(cfg, out / "summary", enabled=main) as trackers:
        trackers.log_images(sorted(out.glob("*.png")))
    return dist.broadcast_object(summary)


def _correct_by_seed(out: Path, method: str, seeds: list[int]) -> np.ndarray | None:
    """[seeds, test examples] booleans from each run's test_predictions.json; None if any run lacks them."""
    rows = []
    for seed in seeds:
        path = out / f"seed_{seed}" / method / "test_predictions.json"
        if not path.is_file():
            return None
        kept = json.loads(path.read_text())
        rows.append(np.equal(kept["student"], kept["labels"]))
    return np.stack(rows)


def write_report(records: list[dict], out: Path, *, task: str, metric: str,
                 predictions_from: Path | None = None) -> dict[str, Any]:
    """runs.json/csv, summary.{json,csv,md} and the two curve plots from the run records; the test predictions are
    read from seed_<s>/<method>/ under `predictions_from` (default: `out`)."""
    summary = summarize(records)
    summary.update(task=task, metric=metric)
    paired = summary["paired"]
    if paired is not None and metric == "accuracy":
        correct = [_correct_by_seed(predictions_from or out, paired[arm], paired["seeds"])
                   for arm in ("method", "baseline")]
        if correct[0] is not None and correct[1] is not None:
            paired["per_example"] = per_example_bootstrap(*correct)
    atomic_write_text(json.dumps(records, indent=2) + "\n", out / "runs.json")
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(RUN_COLUMNS)
        for r in records:
            writer.writerow([r.get(k, "") if r.get(k) is not None else "" for k in RUN_COLUMNS])
    write_summary(summary, out)
    runs = [r for r in records if r["method"] != TEACHER]
    plot_curves(runs, out / "dev_curves.png")
    teacher_runs = [{"method": r["method"], "seed": r["seed"], "metric": r["teacher_metric"],
                     "curve": r["teacher_curve"]} for r in runs if r.get("teacher_curve")]
    if teacher_runs:
        plot_curves(teacher_runs, out / "teacher_dev_curves.png")
    return summary
