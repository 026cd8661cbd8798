import csv
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from metadistil_scale.report import format_table, per_example_bootstrap, plot_curves, summarize, write_summary

T_975_2 = 4.302652729749464  # Student's t quantile, 0.975, 2 degrees of freedom


def _records() -> list[dict]:
    kd = [70.0, 71.0, 72.0]
    meta = [71.0, 73.0, 75.0, 99.0]  # seed 3 has no kd partner
    teacher = [80.0, 79.0, 78.0, None]
    records = [
        {
            "method": "kd",
            "seed": s,
            "metric": m,
            "teacher_metric": None,
            "curve": [[0, 50.0 + s], [100, 60.0 + s], [200, 65.0 + s]],
        }
        for s, m in enumerate(kd)
    ]
    records += [
        {
            "method": "metadistil",
            "seed": s,
            "metric": m,
            "teacher_metric": t,
            "curve": [[0, 50.0], [100, 62.0 + s], [200, 68.0 + 2 * s]],
        }
        for s, (m, t) in enumerate(zip(meta, teacher))
    ]
    records.append({"method": "finetune", "seed": 0, "metric": 60.5, "teacher_metric": None, "curve": []})
    return records


def test_summarize_known_numbers() -> None:
    summary = summarize(_records())
    assert list(summary["methods"]) == ["kd", "metadistil", "finetune"]

    kd = summary["methods"]["kd"]
    assert kd == {
        "n": 3,
        "mean": 71.0,
        "std": 1.0,
        "min": 70.0,
        "max": 72.0,
        "seeds": [0, 1, 2],
        "teacher": None,
    }

    meta = summary["methods"]["metadistil"]
    # mean (71+73+75+99)/4 = 79.5; squared deviations 72.25+42.25+20.25+380.25 = 515 over n-1 = 3.
    assert meta["n"] == 4 and meta["mean"] == 79.5 and meta["min"] == 71.0 and meta["max"] == 99.0
    assert meta["std"] == pytest.approx(math.sqrt(515 / 3), rel=1e-15)
    assert meta["teacher"] == {"n": 3, "mean": 79.0, "std": 1.0, "min": 78.0, "max": 80.0}

    assert summary["methods"]["finetune"]["std"] == 0.0  # one run: no spread

    paired = summary["paired"]
    # diffs over seeds 0-2: [1, 2, 3] -> mean 2, std 1, half-width t(0.975, 2) * 1 / sqrt(3) = 2.4841377...
    half = T_975_2 / math.sqrt(3)
    assert half == pytest.approx(2.484137711, abs=1e-9)
    assert paired["method"] == "metadistil" and paired["baseline"] == "kd"
    assert paired["n"] == 3 and paired["seeds"] == [0, 1, 2]
    assert paired["mean_diff"] == 2.0 and paired["std_diff"] == 1.0
    assert paired["ci95"] == pytest.approx([2.0 - half, 2.0 + half], rel=1e-12)


def test_summarize_other_pairings_and_edge_cases() -> None:
    records = _records()
    flipped = summarize(records, method="kd", baseline="metadistil")["paired"]
    assert flipped["mean_diff"] == -2.0 and flipped["std_diff"] == 1.0

    one_pair = summarize(records, method="finetune", baseline="kd")["paired"]
    assert one_pair["n"] == 1 and one_pair["mean_diff"] == -9.5 and one_pair["std_diff"] == 0.0
    assert one_pair["ci95"] is None

    assert summarize(records, baseline="absent")["paired"] is None
    disjoint = [
        {"method": "kd", "seed": 0, "metric": 1.0},
        {"method": "metadistil", "seed": 1, "metric": 2.0},
    ]
    assert summarize(disjoint)["paired"] is None

    with pytest.raises(ValueError, match=r"repeats method 'kd' seed 1"):
        summarize([*records, {"method": "kd", "seed": 1, "metric": 0.0}])
    with pytest.raises(ValueError, match=r"run record 0 lacks metric"):
        summarize([{"method": "kd", "seed": 0}])


def test_format_table() -> None:
    text = format_table(summarize(_records()))
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "method",
        "n",
        "mean ± std",
        "min",
        "max",
        "teacher mean ± std",
    ]
    kd_row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert kd_row == ["kd", "3", "71.0000 ± 1.0000", "70.0000", "72.0000", "–"]
    meta_row = [c.strip() for c in lines[3].strip("|").split("|")]
    assert meta_row[5] == "79.0000 ± 1.0000 (n=3)"
    assert lines[-2] == "metadistil − kd: +2.0000 ± 1.0000 over 3 paired seeds, 95% CI [-0.4841, 4.4841]"
    assert lines[-1] == "bootstrap over seeds: 95% [1.0000, 3.0000]; variance ratio metadistil/kd: 4.0000"


def test_bootstrap_over_seeds_and_variance_ratio() -> None:
    paired = summarize(_records())["paired"]
    # Paired differences 1, 2, 3: of the 27 equally likely resamples, 1 has mean 1 and 1 has mean 3 (3.7% each),
    # so the 2.5% and 97.5% percentiles of the resampled means are exactly 1 and 3.
    assert paired["bootstrap_ci95"] == [1.0, 3.0]
    # Variances over the paired seeds: metadistil 71, 73, 75 -> 4; kd 70, 71, 72 -> 1.
    assert paired["variance_ratio"] == pytest.approx(4.0)


def test_per_example_bootstrap_matches_the_normal_approximation() -> None:
    # Two seeds, 2,000 examples: the method is right where the baseline is wrong on half the examples and both
    # agree elsewhere, so the per-example difference is 1 or 0 with p = 0.5 and the mean's standard error is
    # sqrt(0.25 / 2000); the bootstrap interval must sit at 0.5 ± 1.96 of that.
    n = 2000
    baseline = np.zeros((2, n), bool)
    method = np.zeros((2, n), bool)
    method[:, : n // 2] = True
    result = per_example_bootstrap(method, baseline)
    se = math.sqrt(0.25 / n)
    assert result["mean_diff"] == 0.5 and result["n_seeds"] == 2 and result["n_examples"] == n
    assert result["ci95"] == pytest.approx([0.5 - 1.96 * se, 0.5 + 1.96 * se], abs=0.15 * se)
    # Identical predictions: no difference and no spread.
    assert per_example_bootstrap(method, method)["ci95"] == [0.0, 0.0]


def test_write_summary_files_parse(tmp_path: Path) -> None:
    summary = summarize(_records())
    paths = write_summary(summary, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"summary.json", "summary.csv", "summary.md"}

    assert json.loads(paths["json"].read_text()) == summary

    with paths["csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["kd", "metadistil", "finetune"]
    assert float(rows[0]["mean"]) == 71.0 and float(rows[0]["std"]) == 1.0 and rows[0]["teacher_mean"] == ""
    assert int(rows[1]["n"]) == 4 and float(rows[1]["teacher_mean"]) == 79.0

    md = paths["md"].read_text()
    assert md.startswith("# Results\n") and format_table(summary) in md


def test_write_summary_non_finite_become_null(tmp_path: Path) -> None:
    records = [
        {"method": "kd", "seed": 0, "metric": float("nan")},
        {"method": "kd", "seed": 1, "metric": 1.0},
    ]
    paths = write_summary(summarize(records), tmp_path)
    loaded = json.loads(paths["json"].read_text())
    assert loaded["methods"]["kd"]["mean"] is None and loaded["methods"]["kd"]["n"] == 2


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def test_plot_curves_writes_png(tmp_path: Path) -> None:
    path = plot_curves(_records(), tmp_path / "plots" / "curves.png")
    assert path.exists() and path.stat().st_size > 10_000
    assert _png_size(path) == (640, 400)

    empty = plot_curves([{"method": "kd", "seed": 0, "metric": 1.0, "curve": []}], tmp_path / "empty.png")
    assert _png_size(empty) == (640, 400)
