"""The pre-registered powered comparison: KD vs MetaDistil, paired over seeds, until the interval is narrow.

    python benchmarks/powered.py                          # benchmarks/results/text_powered/config.yaml
    python benchmarks/powered.py --max-pairs 1            # the first pair only (to check the budget)
    python benchmarks/powered.py --side-seed 3            # seed 3 in a second process, beside the runner
    python benchmarks/powered.py --report                 # the report from the kept seeds alone (no training)
    python benchmarks/powered.py --report --pairs 8       # ... of seeds 0-7 only: the design's reading at 8 pairs

Sequential design (fixed before the first run): at least --min-pairs pairs, then one more pair at a time until the
95% t-interval of the paired difference (MetaDistil - KD, test accuracy points) has half-width <= --half-width,
or --max-pairs pairs. The teacher is fine-tuned once (<output_dir>/teacher/) and given to every run.

Resumable at any point: finished runs are reused and a run in progress resumes from its last checkpoint. Every
seed records the commit it ran on (seed_<s>/commit.json); both arms of a seed run on one commit, so a seed left
half-done by an older commit is set aside (seed_<s>.stale-<commit>) and run again whole. After each pair the small
outputs (runs, summary, curves) are copied to --results.

Resumable on another machine too: --results keeps, for every finished seed, what the report needs (done.json,
metrics.jsonl, test_predictions.json, commit.json; not the weights) and the SHA-256 of the teacher's weights. On
a machine without the run folder the teacher is fine-tuned again (deterministic on the CPU: same seed, same
data order, one thread); if its weights hash the same, the kept seeds are put back and reused, otherwise they are
left out and the run says so.

Two seeds at once: with the runner's teacher finished, `--side-seed S` runs seed S alone in <output_dir>_side (same
config, same teacher checkpoint, its own commit record); when the runner reaches seed S it moves the finished seed
into its folder and reuses it. Each process uses one thread (OMP_NUM_THREADS=1) on a 2-core machine.

The report (runs, summary, curves, and pairs.md / pairs.csv: one row per seed with its commit) is written from the
kept seeds after each pair, so it covers every finished seed, those finished beside the runner included; `--report`
writes it alone, on any machine, without the run folder.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from metadistil_scale.checkpoint import atomic_write_text
from metadistil_scale.config import ConfigError, load_config
from metadistil_scale.experiment import TEACHER, run_experiment, run_record, write_report
from metadistil_scale.methods import get_method
from metadistil_scale.metrics import primary_metric
from metadistil_scale.trainer import (
    StageResult,
    StopRequested,
    configure_cpu_allocator,
    fine_tune_teacher,
    load_task,
    resolve_device,
)

REPO = Path(__file__).resolve().parent.parent
SMALL_OUTPUTS = ("config.yaml", "runs.json", "runs.csv", "summary.json", "summary.csv", "summary.md",
                 "dev_curves.png", "teacher_dev_curves.png")
RESOLVED_CONFIG = "config.resolved.yaml"


def current_commit() -> dict[str, object]:
    """The commit the code came from, and whether the tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def seed_is_done(seed_dir: Path, methods: list[str]) -> bool:
    return all((seed_dir / m / "done.json").is_file() for m in methods)


def pin_seed_to_commit(seed_dir: Path, methods: list[str], commit: dict[str, object]) -> None:
    """Record the commit a seed runs on; a half-done seed from another commit is set aside and rerun."""
    record = seed_dir / "commit.json"
    if record.is_file():
        recorded = json.loads(record.read_text())
        if recorded["commit"] == commit["commit"] or seed_is_done(seed_dir, methods):
            return
        stale = seed_dir.with_name(f"{seed_dir.name}.stale-{str(recorded['commit'])[:10]}")
        print(f"{seed_dir.name}: half-done on {recorded['commit'][:10]}, now {commit['commit'][:10]}: "
              f"set aside as {stale.name}, both arms rerun", file=sys.stderr)
        seed_dir.rename(stale)
    seed_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(commit) + "\n", record)


KEPT_PER_RUN = ("done.json", "metrics.jsonl", "test_predictions.json")


def weights_sha256(folder: Path) -> str:
    """One hash over every file of a saved model (sorted by name): equal hashes, equal teachers."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def keep_finished_seeds(out: Path, kept: Path, methods: list[str]) -> None:
    """Copy what the report needs of every finished seed to `kept` (small files only)."""
    for seed_dir in seed_dirs(out):
        if not seed_is_done(seed_dir, methods):
            continue
        for method in methods:
            (kept / seed_dir.name / method).mkdir(parents=True, exist_ok=True)
            for name in KEPT_PER_RUN:
                if (seed_dir / method / name).is_file():
                    shutil.copy2(seed_dir / method / name, kept / seed_dir.name / method / name)
        shutil.copy2(seed_dir / "commit.json", kept / seed_dir.name / "commit.json")


def restore_kept_seeds(kept: Path, out: Path, teacher_sha: str) -> None:
    """Put kept seeds back into a run folder that lacks them, when they were trained from this very teacher."""
    record = kept / "teacher.json"
    if not record.is_file():
        return
    recorded = json.loads(record.read_text())["weights_sha256"]
    if recorded != teacher_sha:
        print(f"the kept seeds in {kept} came from a teacher with weights {recorded[:12]}, this one is "
              f"{teacher_sha[:12]}: they are not reused", file=sys.stderr)
        return
    for seed_dir in sorted(p for p in kept.glob("seed_*") if p.is_dir()):
        if not (out / seed_dir.name).exists():
            shutil.copytree(seed_dir, out / seed_dir.name)
            print(f"{seed_dir.name}: restored from {kept}", file=sys.stderr)


def record_teacher(path: Path, teacher_sha: str, result: dict | None) -> None:
    """The shared teacher's weights hash and fine-tuning result. A teacher found finished (result None) keeps
    the result recorded when it was trained, if the weights are the same."""
    if result is None and path.is_file():
        recorded = json.loads(path.read_text())
        if recorded.get("weights_sha256") == teacher_sha:
            result = recorded.get("result")
    atomic_write_text(json.dumps({"weights_sha256": teacher_sha, "result": result}, indent=2) + "\n", path)


def copy_small_outputs(out: Path, results: Path) -> None:
    """The experiment's tables and plots into the results folder. The resolved config goes to
    config.resolved.yaml: config.yaml there is the pre-registered design, which the runner reads and never writes."""
    for name in SMALL_OUTPUTS:
        if (out / name).is_file():
            target = RESOLVED_CONFIG if name == "config.yaml" else name
            shutil.copy2(out / name, results / target)


def side_folder(out: Path) -> Path:
    """Where `--side-seed` runs a seed beside the runner: `<output_dir>_side`."""
    return out.with_name(out.name + "_side")


def adopt_side_seed(side_seed: Path, seed_dir: Path, methods: list[str]) -> bool:
    """Move a seed finished beside the runner into the runner's folder, so that run_experiment reuses it; a
    half-done copy of the seed in the runner's folder is set aside. Returns whether it moved."""
    if not seed_is_done(side_seed, methods) or seed_is_done(seed_dir, methods):
        return False
    if seed_dir.exists():
        seed_dir.rename(seed_dir.with_name(f"{seed_dir.name}.superseded"))
    shutil.move(str(side_seed), str(seed_dir))
    print(f"{seed_dir.name}: adopted from {side_seed.parent}", file=sys.stderr)
    return True


def run_side_seed(cfg, out: Path, seed: int, commit: dict[str, object]) -> None:
    """One seed in its own folder beside the runner (a second single-threaded process on a multi-core machine):
    the same config and teacher checkpoint, so its runs' fingerprints are the runner's and it adopts them."""
    side = side_folder(out)
    pin_seed_to_commit(side / f"seed_{seed}", cfg.methods, commit)
    run_experiment(dataclasses.replace(cfg, output_dir=str(side), seeds=[seed]), resume=True)


def seed_dirs(out: Path) -> list[Path]:
    return [s for s in sorted(out.glob("seed_*")) if s.name.removeprefix("seed_").isdigit()]


PAIR_COLUMNS = ("seed", "commit", "dirty", "kd_test", "kd_best_dev", "kd_best_step", "metadistil_test",
                "metadistil_best_dev", "metadistil_best_step", "diff_points", "teacher_after_metadistil",
                "kd_wall_s", "metadistil_wall_s")


def report_kept_seeds(kept: Path, results: Path, methods: list[str], *, task: str, metric: str,
                      below: int | None = None) -> dict | None:
    """Runs, summary, curves and the per-pair table in `results`, from the kept seeds alone (every seed finished
    in both arms, in seed order; only seeds < `below` when given: the design reads seeds 0..N-1). The teacher's row
    is its recorded fine-tuning result. None when no seed is done."""
    teacher = json.loads((kept / "teacher.json").read_text()).get("result") if (kept / "teacher.json").is_file() else None
    teacher_metric = None if teacher is None else teacher["test"][metric]
    done = sorted((int(s.name.removeprefix("seed_")), s) for s in seed_dirs(kept) if seed_is_done(s, methods))
    done = [(seed, folder) for seed, folder in done if below is None or seed < below]
    if not done:
        return None
    records, pairs = [], []
    for seed, seed_dir in done:
        if teacher_metric is not None:
            records.append({"method": TEACHER, "seed": seed, "metric": teacher_metric, "teacher_metric": None,
                            "wall_time_s": teacher["wall_time_s"]})
        runs = {}
        for method in methods:
            runs[method] = StageResult(**json.loads((seed_dir / method / "done.json").read_text())["result"])
            records.append(run_record(runs[method], seed, metric, seed_dir / method,
                                      teacher_metric if get_method(method).uses_teacher else None))
        if {"kd", "metadistil"} <= set(runs):
            pairs.append(pair_row(seed, json.loads((seed_dir / "commit.json").read_text()), runs, metric))
    results.mkdir(parents=True, exist_ok=True)
    summary = write_report(records, results, task=task, metric=metric, predictions_from=kept)
    write_pairs_table(pairs, results)
    return summary


def pair_row(seed: int, commit: dict, runs: dict[str, StageResult], metric: str) -> dict:
    kd, meta = runs["kd"], runs["metadistil"]
    return {"seed": seed, "commit": str(commit["commit"])[:7], "dirty": bool(commit["dirty"]),
            "kd_test": kd.test[metric], "kd_best_dev": kd.best_dev, "kd_best_step": kd.best_step,
            "metadistil_test": meta.test[metric], "metadistil_best_dev": meta.best_dev,
            "metadistil_best_step": meta.best_step, "diff_points": 100 * (meta.test[metric] - kd.test[metric]),
            "teacher_after_metadistil": (meta.teacher_test or {}).get(metric),
            "kd_wall_s": kd.wall_time_s, "metadistil_wall_s": meta.wall_time_s}


def write_pairs_table(pairs: list[dict], results: Path) -> None:
    """pairs.csv (every field) and pairs.md (the table RESULTS.md shows; * = the seed ran with modified files)."""
    with (results / "pairs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, PAIR_COLUMNS)
        writer.writeheader()
        writer.writerows(pairs)
    md = ["| seed | commit | KD test | KD best dev (step) | MetaDistil test | MetaDistil best dev (step) | "
          "MetaDistil − KD, points | teacher after MetaDistil | wall s KD / MetaDistil |", "|---" * 9 + "|"]
    for p in pairs:
        teacher = "–" if p["teacher_after_metadistil"] is None else f"{p['teacher_after_metadistil']:.4f}"
        diff = f"{p['diff_points']:+.2f}".replace("-", "−")
        md.append(f"| {p['seed']} | {p['commit']}{'*' if p['dirty'] else ''} | {p['kd_test']:.4f} | "
                  f"{p['kd_best_dev']:.4f} ({p['kd_best_step']}) | {p['metadistil_test']:.4f} | "
                  f"{p['metadistil_best_dev']:.4f} ({p['metadistil_best_step']}) | {diff} | {teacher} | "
                  f"{p['kd_wall_s']:,.0f} / {p['metadistil_wall_s']:,.0f} |")
    atomic_write_text("\n".join(md) + "\n", results / "pairs.md")


def half_width(summary: dict) -> float | None:
    paired = summary.get("paired") or {}
    ci = paired.get("ci95")
    return None if ci is None else 100 * (ci[1] - ci[0]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "benchmarks/results/text_powered/config.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--results", default=str(REPO / "benchmarks/results/text_powered"))
    parser.add_argument("--min-pairs", type=int, default=8)
    parser.add_argument("--max-pairs", type=int, default=16)
    parser.add_argument("--half-width", type=float, default=1.0, help="target half-width, accuracy points")
    parser.add_argument("--report", action="store_true", help="only write the report from the kept seeds in "
                        "--results (no training, no run folder needed)")
    parser.add_argument("--pairs", type=int, help="with --report: seeds 0..PAIRS-1 only (the design's reading "
                        "after PAIRS pairs; default: every finished seed)")
    parser.add_argument("--side-seed", type=int, help="run only this seed, beside a running runner (its teacher "
                        "finished), in <output_dir>_side; the runner adopts it when it reaches that seed")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    out, results = Path(cfg.output_dir), Path(args.results)
    commit = current_commit()
    task = load_task(cfg)
    report = dict(task=task.info.name, metric=primary_metric(task.info.metric))
    if args.report:
        summary = report_kept_seeds(results / "seeds", results, cfg.methods, **report,
                                    below=args.pairs)
        if summary is None:
            raise SystemExit(f"error: no seed finished in both arms in {results / 'seeds'}")
        print((results / "summary.md").read_text() + "\n" + (results / "pairs.md").read_text(), end="")
        return

    device = resolve_device(cfg)
    configure_cpu_allocator(cfg, device)
    if args.side_seed is not None and not (out / "teacher" / "done.json").is_file():
        raise SystemExit(f"error: --side-seed needs the shared teacher finished in {out / 'teacher'}: start the "
                         "runner first")
    teacher_dir, teacher = fine_tune_teacher(cfg, task, out, device, True, None)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, teacher_checkpoint=str(teacher_dir)))
    if args.side_seed is not None:
        run_side_seed(cfg, out, args.side_seed, commit)
        return
    kept, teacher_sha = results / "seeds", weights_sha256(teacher_dir)
    restore_kept_seeds(kept, out, teacher_sha)
    kept.mkdir(parents=True, exist_ok=True)
    record_teacher(kept / "teacher.json", teacher_sha, teacher.__dict__ if teacher else None)
    for pairs in range(1, args.max_pairs + 1):
        adopt_side_seed(side_folder(out) / f"seed_{pairs - 1}", out / f"seed_{pairs - 1}", cfg.methods)
        pin_seed_to_commit(out / f"seed_{pairs - 1}", cfg.methods, commit)
        summary = run_experiment(dataclasses.replace(cfg, seeds=list(range(pairs))), resume=True)
        results.mkdir(parents=True, exist_ok=True)
        copy_small_outputs(out, results)
        keep_finished_seeds(out, kept, cfg.methods)
        report_kept_seeds(kept, results, cfg.methods, **report)
        commits = {s.name: json.loads((s / "commit.json").read_text()) for s in seed_dirs(out)
                   if (s / "commit.json").is_file()}
        atomic_write_text(json.dumps(commits, indent=2) + "\n", results / "commits.json")
        width = half_width(summary)
        print(f"after {pairs} pairs: half-width {width if width is None else round(width, 2)} points",
              file=sys.stderr, flush=True)
        if pairs >= args.min_pairs and width is not None and width <= args.half_width:
            break


if __name__ == "__main__":
    try:
        main()
    except StopRequested as stop:  # Ctrl-C or SIGTERM: the run stopped after a checkpoint; rerunning continues it
        print(f"{stop}\nrerun `python benchmarks/powered.py` to continue", file=sys.stderr)
        sys.exit(stop.exit_code)
