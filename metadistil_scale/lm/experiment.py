"""Causal-LM distillation over seeds: every method in `methods` once per seed in `seeds`, reported by held-out
perplexity (lower is better) with the classification experiment's tables and plots.

Layout under `output_dir`:

    seed_<s>/<method>/       one run as `lm-train` writes it (last.pt, metrics.jsonl, student/)
    runs.json, runs.csv      one record per run: held-out perplexity, the teacher's after the run, curves, time
    summary.{json,csv,md}    mean ± std per method and metadistil − kd paired over seeds (negative favours
                             metadistil)
    dev_curves.png           the student's held-out perplexity against steps (teacher_dev_curves.png: the
                             teacher's, in the runs that train it)

The teacher is the same for every seed: the pretrained model, or with `model.finetune_teacher` the one
fine-tuned in `teacher/` (seed `seed`); a seed changes the batch order, the quiz order and the RNG. `resume` continues each run from its last checkpoint (a finished run
is then not trained again).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from metadistil_scale.backends import dist
from metadistil_scale.experiment import TEACHER, read_curves, write_report
from metadistil_scale.lm.recipe import (
    LMConfig,
    evaluate_lm,
    fine_tune_lm_teacher,
    prepare_lm,
    train_method,
    wrap,
)
from metadistil_scale.methods import get_method

METRIC = "perplexity"


def run_lm_experiment(cfg: LMConfig, *, resume: bool = False) -> dict[str, Any] | None:
    """Run methods × seeds, then write the records, the summary tables and the plots. Returns the summary."""
    job = prepare_lm(cfg)
    out = Path(cfg.output_dir)
    if cfg.model.finetune_teacher:  # one fine-tuned teacher for every seed
        fine_tune_lm_teacher(cfg, job, out / "teacher", resume=resume)
    teacher_metric = evaluate_lm(wrap(job.teacher, cfg), job.splits["heldout"], cfg.eval_batch_size,
                                 job.device)[METRIC]
    records = []
    for seed in cfg.seeds:
        records.append({"method": TEACHER, "seed": seed, "metric": teacher_metric, "teacher_metric": None,
                        "wall_time_s": 0.0})
        for method in cfg.methods:
            folder = out / f"seed_{seed}" / method
            result = train_method(method, dataclasses.replace(cfg, seed=seed), job.teacher, job.student,
                                  job.splits, job.device, folder, resume=resume, tokenizer=job.tokenizer)
            if dist.is_main():  # rank 0 writes metrics.jsonl and the report
                records.append(_record(method, seed, result, folder, teacher_metric))
    summary = write_report(records, out, task=f"{cfg.data.source} (held-out)", metric=METRIC) if dist.is_main() \
        else None
    return dist.broadcast_object(summary)


def _record(method: str, seed: int, result: dict[str, Any], folder: Path, teacher_metric: float) -> dict[str, Any]:
    """A run record as report.summarize reads it; the teacher's metric is the trained teacher's after the run."""
    teacher_after = result.get("teacher_heldout_after", {}).get(METRIC, teacher_metric)
    curve, teacher_curve = read_curves(folder / "metrics.jsonl", METRIC, split="heldout")
    return {"method": method, "seed": seed, "metric": result["heldout"][METRIC],
            "teacher_metric": teacher_after if get_method(method).uses_teacher else None, "steps": result["steps"],
            "wall_time_s": result["train_time_s"], "curve": curve, "teacher_curve": teacher_curve}
