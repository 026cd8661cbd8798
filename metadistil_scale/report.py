"""Aggregate experiment runs (methods x seeds) into summary statistics, tables and a learning-curve plot.

A run record is a dict::

    {"method": "kd", "seed": 0, "metric": 71.2, "teacher_metric": 75.0 or None,
     "curve": [[step, dev_metric], ...]}

`metric` is the student's test metric; `teacher_metric` the teacher's own test metric after the run (MetaDistil
updates the teacher, which can drift off the task, so it is reported next to the student's).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

REQUIRED_KEYS = ("method", "seed", "metric")
CSV_COLUMNS = (
    "method",
    "n",
    "mean",
    "std",
    "min",
    "max",
    "teacher_n",
    "teacher_mean",
    "teacher_std",
    "teacher_min",
    "teacher_max",
)


def _describe(values: Sequence[float]) -> dict[str, Any]:
    x = np.asarray(values, dtype=np.float64)
    return {
        "n": int(x.size),
        "mean": float(x.mean()),
        # Sample standard deviation; a single run has no spread to estimate, reported as 0.
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
    }


def _validate(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    records = list(records)
    seen: set[tuple[str, int]] = set()
    for i, record in enumerate(records):
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"run record {i} lacks {', '.join(missing)}: {dict(record)!r}")
        key = (record["method"], record["seed"])
        if key in seen:
            # Two runs under one (method, seed) would make the paired difference ambiguous.
            raise ValueError(f"run record {i} repeats method {key[0]!r} seed {key[1]!r}")
        seen.add(key)
    return records


def summarize(
    records: Iterable[Mapping[str, Any]], method: str = "metadistil", baseline: str = "kd"
) -> dict[str, Any]:
    """Per-method statistics, and `method` - `baseline` paired over the seeds both have.

    Returns ``{"methods": {name: {n, mean, std, min, max, seeds, teacher}}, "paired": {...} or None}`` where
    ``teacher`` describes the teacher metrics that are not None (or is None), and ``paired`` holds method,
    baseline, n, seeds, mean_diff, std_diff and ci95 ([low, high], a t-interval; None for a single pair).
    Methods keep the order in which they first appear.
    """
    records = _validate(records)
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_method.setdefault(record["method"], []).append(record)

    methods = {}
    for name, runs in by_method.items():
        teacher = [r["teacher_metric"] for r in runs if r.get("teacher_metric") is not None]
        methods[name] = {
            **_describe([r["metric"] for r in runs]),
            "seeds": sorted(r["seed"] for r in runs),
            "teacher": _describe(teacher) if teacher else None,
        }

    paired = None
    if method in by_method and baseline in by_method:
        ours = {r["seed"]: r["metric"] for r in by_method[method]}
        theirs = {r["seed"]: r["metric"] for r in by_method[baseline]}
        seeds = sorted(set(ours) & set(theirs))
        if seeds:
            diffs = [ours[s] - theirs[s] for s in seeds]
            d = _describe(diffs)
            ci95 = None
            if d["n"] > 1:
                half = stats.t.ppf(0.975, d["n"] - 1) * d["std"] / math.sqrt(d["n"])
                ci95 = [d["mean"] - half, d["mean"] + half]
            paired = {
                "method": method,
                "baseline": baseline,
                "n": d["n"],
                "seeds": seeds,
                "mean_diff": d["mean"],
                "std_diff": d["std"],
                "ci95": ci95,
                "bootstrap_ci95": bootstrap_mean_ci(diffs) if d["n"] > 1 else None,
                "variance_ratio": _variance_ratio([ours[s] for s in seeds], [theirs[s] for s in seeds]),
            }
    return {"methods": methods, "paired": paired}


BOOTSTRAP_RESAMPLES = 10_000


def bootstrap_mean_ci(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                      ) -> list[float]:
    """The 95% percentile-bootstrap interval of the mean (a fixed generator: the same data give the same
    interval). Unlike the t-interval it does not assume normal differences; with few values it is narrower."""
    x = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    low, high = np.percentile(x[draws].mean(axis=1), [2.5, 97.5])
    return [float(low), float(high)]


def _variance_ratio(ours: Sequence[float], theirs: Sequence[float]) -> float | None:
    """var(method) / var(baseline) over the paired seeds: > 1 means the method's result depends more on the seed."""
    if len(ours) < 2:
        return None
    baseline_var = float(np.var(theirs, ddof=1))
    return float(np.var(ours, ddof=1)) / baseline_var if baseline_var > 0 else None


def per_example_bootstrap(correct_method: np.ndarray, correct_baseline: np.ndarray,
                          resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """The paired accuracy difference over seeds, with the test set's own sampling uncertainty.

    Inputs are [seeds, examples] booleans (was example i right in seed s). The examples are resampled with
    replacement, the same draw for every seed and both methods (the comparison stays paired); the statistic is
    the mean over seeds of accuracy(method) - accuracy(baseline). Returns the point value and its 95% interval.
    """
    per_example = (np.asarray(correct_method, np.float64) - np.asarray(correct_baseline, np.float64)).mean(axis=0)
    n = per_example.size
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # in blocks: [1000, n] draws at a time keeps memory small
        stop = min(start + 1000, resamples)
        means[start:stop] = per_example[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"n_seeds": int(np.shape(correct_method)[0]), "n_examples": int(n),
            "mean_diff": float(per_example.mean()), "ci95": [float(low), float(high)]}


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def format_table(summary: Mapping[str, Any]) -> str:
    """A Markdown table (one row per method) and a line with the paired difference; readable as plain text."""
    header = ["method", "n", "mean ± std", "min", "max", "teacher mean ± std"]
    rows = []
    for name, s in summary["methods"].items():
        t = s["teacher"]
        rows.append(
            [
                name,
                str(s["n"]),
                f"{_fmt(s['mean'])} ± {_fmt(s['std'])}",
                _fmt(s["min"]),
                _fmt(s["max"]),
                "–" if t is None else f"{_fmt(t['mean'])} ± {_fmt(t['std'])} (n={t['n']})",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    lines = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    p = summary.get("paired")
    if p is not None:
        ci = "" if p["ci95"] is None else f", 95% CI [{_fmt(p['ci95'][0])}, {_fmt(p['ci95'][1])}]"
        lines += [
            "",
            f"{p['method']} − {p['baseline']}: {p['mean_diff']:+.4f} ± {_fmt(p['std_diff'])} "
            f"over {p['n']} paired seed{'s' if p['n'] != 1 else ''}{ci}",
        ]
        boot, examples = p.get("bootstrap_ci95"), p.get("per_example")
        if boot is not None:
            lines.append(f"bootstrap over seeds: 95% [{_fmt(boot[0])}, {_fmt(boot[1])}]; variance ratio "
                         f"{p['method']}/{p['baseline']}: {_fmt(p['variance_ratio'])}")
        if examples is not None:
            lines.append(f"bootstrap over the {examples['n_examples']} test examples (pooled over "
                         f"{examples['n_seeds']} seeds): {examples['mean_diff']:+.4f}, 95% "
                         f"[{_fmt(examples['ci95'][0])}, {_fmt(examples['ci95'][1])}]")
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    # JSON has no NaN or infinity (a diverged run can produce them): write null instead.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def write_summary(summary: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write summary.json (everything), summary.csv (one row per method) and summary.md; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "summary.json", "csv": out / "summary.csv", "md": out / "summary.md"}
    paths["json"].write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for name, s in summary["methods"].items():
            t = s["teacher"] or {}
            writer.writerow(
                [
                    name,
                    s["n"],
                    s["mean"],
                    s["std"],
                    s["min"],
                    s["max"],
                    t.get("n", 0),
                    t.get("mean", ""),
                    t.get("std", ""),
                    t.get("min", ""),
                    t.get("max", ""),
                ]
            )
    paths["md"].write_text("# Results\n\n" + format_table(summary) + "\n")
    return paths


def plot_curves(records: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Plot dev metric against step, one line per method: the mean over seeds with their min-max as a band.

    At each step the statistics use the seeds that logged that step. Records without a curve are skipped.
    """
    # The Agg canvas directly, not pyplot: no global backend switch and no figure registry to leak into.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_method: dict[str, dict[float, list[float]]] = {}
    for record in _validate(records):
        for step, value in record.get("curve") or []:
            by_method.setdefault(record["method"], {}).setdefault(float(step), []).append(float(value))

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in by_method.items():
        steps = sorted(points)
        values = [np.asarray(points[s]) for s in steps]
        (line,) = ax.plot(steps, [v.mean() for v in values], label=f"{name}", marker="o", markersize=3)
        ax.fill_between(
            steps,
            [v.min() for v in values],
            [v.max() for v in values],
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("dev metric")
    ax.set_title("dev metric (mean over seeds, band: min–max)")
    ax.grid(alpha=0.3)
    if by_method:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no curves recorded", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
