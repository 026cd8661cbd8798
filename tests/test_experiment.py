"""The experiment runner: aggregation of known records into files, a tiny image experiment end to end through the
CLI, and every shipped config loading and validating."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from test_image_task import write_fashion

from metadistil_scale.cli import main
from metadistil_scale.config import load_config
from metadistil_scale.experiment import read_curves, write_report

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(method: str, seed: int, metric: float, teacher: float | None, teacher_curve=None) -> dict:
    return {"method": method, "seed": seed, "metric": metric, "teacher_metric": teacher, "best_dev": metric,
            "best_step": 10, "steps": 20, "wall_time_s": 1.5, "curve": [[10, metric - 0.1], [20, metric]],
            "teacher_curve": teacher_curve or []}


def test_write_report_on_known_records(tmp_path: Path) -> None:
    kd, md = [0.80, 0.82, 0.84], [0.81, 0.85, 0.84]  # paired differences 0.01, 0.03, 0.00
    records = [record("teacher", s, 0.9, None) for s in range(3)]
    records += [record("kd", s, v, 0.9) for s, v in enumerate(kd)]
    records += [record("metadistil", s, v, 0.88, [[10, 0.89], [20, 0.88]]) for s, v in enumerate(md)]
    summary = write_report(records, tmp_path, task="toy", metric="accuracy")

    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["task"] == "toy" and list(saved["methods"]) == ["teacher", "kd", "metadistil"]
    assert saved["methods"]["kd"]["mean"] == pytest.approx(0.82)
    assert saved["methods"]["kd"]["std"] == pytest.approx(0.02)
    assert saved["methods"]["metadistil"]["teacher"]["mean"] == pytest.approx(0.88)
    paired = saved["paired"]
    assert paired["mean_diff"] == pytest.approx(0.04 / 3)
    std = math.sqrt(((0.01 - 0.04 / 3) ** 2 + (0.03 - 0.04 / 3) ** 2 + (0.04 / 3) ** 2) / 2)
    half = 4.302652729911275 * std / math.sqrt(3)  # t(0.975, 2 d.o.f.)
    assert paired["ci95"] == pytest.approx([0.04 / 3 - half, 0.04 / 3 + half])
    assert summary["paired"]["n"] == 3

    with (tmp_path / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["seed"]) for r in rows][:4] == [("teacher", "0"), ("teacher", "1"), ("teacher", "2"),
                                                           ("kd", "0")]
    assert rows[0]["teacher_metric"] == "" and float(rows[3]["metric"]) == 0.80
    assert len(json.loads((tmp_path / "runs.json").read_text())) == 9
    table = (tmp_path / "summary.md").read_text()
    assert "| kd " in table and "metadistil − kd: +0.0133" in table
    for png in ("dev_curves.png", "teacher_dev_curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC


def test_read_curves(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 10, "loss": 1.0}, {"step": 20, "dev_accuracy": 0.5, "teacher_dev_accuracy": 0.7},
             {"step": 40, "dev_accuracy": 0.6}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert read_curves(path, "accuracy") == ([[20, 0.5], [40, 0.6]], [[20, 0.7]])


def test_tiny_image_experiment_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_fashion(tmp_path / "fmnist")
    out = tmp_path / "exp"
    args = ["experiment", "--output-dir", str(out)] + [f"--set={s}" for s in (
        "data.task=fashion_mnist", f"data.data_files.train={data}", "model.teacher=cv:resnet8",
        "model.student=cv:resnet8", "model.student_layers=null", "methods=[kd, metadistil]", "seeds=[0, 1]",
        "teacher_finetune.max_steps=3", "student_train.max_steps=3", "eval_every=2", "teacher_finetune.batch_size=8",
        "student_train.batch_size=8", "meta.quiz_batch_size=8", "meta.teacher_optim.lr=0.01",
    )]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "metadistil − kd" in printed

    for seed in (0, 1):
        for stage in ("teacher", "kd", "metadistil"):
            assert (out / f"seed_{seed}" / stage / "done.json").is_file()
    runs = json.loads((out / "runs.json").read_text())
    assert [(r["method"], r["seed"]) for r in runs] == [
        ("teacher", 0), ("kd", 0), ("metadistil", 0), ("teacher", 1), ("kd", 1), ("metadistil", 1)]
    kd, md = runs[1], runs[2]
    assert kd["curve"] == [[2, pytest.approx(kd["curve"][0][1])], [3, pytest.approx(kd["curve"][1][1])]]
    assert kd["teacher_metric"] == runs[0]["metric"]  # KD leaves the fine-tuned teacher as it was
    assert [step for step, _ in md["teacher_curve"]] == [2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["paired"]["seeds"] == [0, 1] and summary["methods"]["metadistil"]["n"] == 2
    assert (out / "dev_curves.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "teacher_dev_curves.png").read_bytes()[:8] == PNG_MAGIC
    # Per-example test predictions agree with the reported metrics (students; the teacher a run trained).
    for run in runs[1:3]:
        kept = json.loads((out / "seed_0" / run["method"] / "test_predictions.json").read_text())
        hits = [p == y for p, y in zip(kept["student"], kept["labels"], strict=True)]
        assert sum(hits) / len(hits) == pytest.approx(run["metric"])
        assert ("teacher" in kept) == (run["method"] == "metadistil")
    kept = json.loads((out / "seed_0" / "metadistil" / "test_predictions.json").read_text())
    hits = [p == y for p, y in zip(kept["teacher"], kept["labels"], strict=True)]
    assert sum(hits) / len(hits) == pytest.approx(runs[2]["teacher_metric"])
    # The bootstrap over test examples is centred on the paired difference of the test accuracies.
    examples = summary["paired"]["per_example"]
    assert examples["n_seeds"] == 2 and examples["n_examples"] == len(kept["labels"])
    assert examples["mean_diff"] == pytest.approx(summary["paired"]["mean_diff"])

    # A second invocation reuses every finished run.
    before = (out / "seed_1" / "metadistil" / "done.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "seed_1" / "metadistil" / "done.json").stat().st_mtime_ns == before
    assert json.loads((out / "runs.json").read_text()) == runs


def test_a_given_teacher_checkpoint_is_measured_once_for_all_seeds(tmp_path: Path, monkeypatch) -> None:
    """With model.teacher_checkpoint every seed shares one teacher: its test metric is measured once, and it is
    the metric the fine-tuning recorded for those weights."""
    from metadistil_scale import experiment

    data = write_fashion(tmp_path / "fmnist")
    common = [f"--set={s}" for s in (
        "data.task=fashion_mnist", f"data.data_files.train={data}", "model.teacher=cv:resnet8",
        "model.student=cv:resnet8", "model.student_layers=null", "methods=[kd]", "teacher_finetune.max_steps=2",
        "student_train.max_steps=1", "eval_every=1", "teacher_finetune.batch_size=8", "student_train.batch_size=8",
    )]
    assert main(["experiment", "--output-dir", str(tmp_path / "first"), *common, "--set=seeds=[0]"]) == 0
    checkpoint = tmp_path / "first" / "seed_0" / "teacher" / "best"
    recorded = json.loads((tmp_path / "first" / "seed_0" / "teacher" / "done.json").read_text())["result"]["test"]

    roles = []
    real_evaluate = experiment.evaluate
    monkeypatch.setattr(experiment, "evaluate", lambda model, role, *a: roles.append(role) or real_evaluate(model, role, *a))
    out = tmp_path / "given"
    assert main(["experiment", "--output-dir", str(out), *common, "--set=seeds=[0, 1, 2]",
                 f"--set=model.teacher_checkpoint={checkpoint}"]) == 0
    assert roles == ["teacher"]
    teacher_rows = [r["metric"] for r in json.loads((out / "runs.json").read_text()) if r["method"] == "teacher"]
    assert teacher_rows == [pytest.approx(recorded["accuracy"])] * 3


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_validate(path: Path) -> None:
    if path.name.startswith("lm_"):  # the causal-LM recipe has its own config
        recipe = pytest.importorskip("metadistil_scale.lm.recipe")
        recipe.load_lm_config(path)
        return
    cfg = load_config(path)
    assert len(cfg.seeds) >= 3 and "kd" in cfg.methods and "metadistil" in cfg.methods


def test_the_configs_cover_the_paper() -> None:
    names = {p.stem for p in CONFIGS}
    glue = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
    assert {"text", "fashion_mnist"} | {f"glue_{t}" for t in glue} <= names
    assert {"cifar100_resnet56_resnet20", "cifar100_wrn_40_2_wrn_16_2", "cifar100_resnet32x4_resnet8x4"} <= names
    for task in glue:
        cfg = load_config(Path(CONFIGS[0].parent / f"glue_{task}.yaml"))
        assert (cfg.distill.alpha, cfg.distill.temperature, cfg.meta.pilot_lr) == (0.5, 5.0, 5e-5)
        assert (cfg.student_train.batch_size, cfg.data.max_length, cfg.model.student_layers) == (8, 128, 6)
        assert (cfg.student_train.optim.lr, cfg.meta.teacher_optim.lr) == (5e-5, 1e-5)
