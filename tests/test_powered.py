"""The powered comparison keeps finished seeds in its results folder and puts them back on a fresh machine,
only when the teacher fine-tuned there is the same (by weights hash)."""

import importlib.util
import json
from pathlib import Path

SPEC = importlib.util.spec_from_file_location("powered", Path(__file__).parent.parent / "benchmarks/powered.py")
powered = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(powered)
METHODS = ["kd", "metadistil"]


def write(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _finished_seed(out: Path, seed: int, methods: list[str]) -> None:
    write(json.dumps({"commit": "abc", "dirty": False}), out / f"seed_{seed}" / "commit.json")
    for method in methods:
        for name in powered.KEPT_PER_RUN:
            write(f"{method} {name}\n", out / f"seed_{seed}" / method / name)
        write("weights", out / f"seed_{seed}" / method / "best" / "model.safetensors")


def test_finished_seeds_are_kept_and_restored_for_the_same_teacher(tmp_path: Path) -> None:
    out, kept = tmp_path / "run", tmp_path / "results" / "seeds"
    _finished_seed(out, 0, METHODS)
    _finished_seed(out, 1, METHODS[:1])  # half done: not kept
    powered.keep_finished_seeds(out, kept, METHODS)
    assert sorted(p.name for p in kept.iterdir()) == ["seed_0"]
    assert not (kept / "seed_0" / "kd" / "best").exists()  # the weights stay behind

    teacher = tmp_path / "teacher"
    write("teacher weights", teacher / "model.safetensors")
    sha = powered.weights_sha256(teacher)
    write(json.dumps({"weights_sha256": sha}), kept / "teacher.json")

    fresh = tmp_path / "fresh"
    write("other weights", tmp_path / "other" / "model.safetensors")
    powered.restore_kept_seeds(kept, fresh, powered.weights_sha256(tmp_path / "other"))
    assert not (fresh / "seed_0").exists()  # another teacher: nothing reused

    powered.restore_kept_seeds(kept, fresh, sha)
    for method in METHODS:
        assert (fresh / "seed_0" / method / "done.json").read_text() == f"{method} done.json\n"
    assert powered.seed_is_done(fresh / "seed_0", METHODS)


def test_a_teacher_found_finished_keeps_its_recorded_result(tmp_path: Path) -> None:
    record = tmp_path / "teacher.json"
    powered.record_teacher(record, "aa", {"steps": 858, "test": {"accuracy": 0.8267}})
    powered.record_teacher(record, "aa", None)  # a restart: the teacher's stage was found done
    assert json.loads(record.read_text())["result"] == {"steps": 858, "test": {"accuracy": 0.8267}}
    powered.record_teacher(record, "bb", None)  # another teacher: the old result does not describe it
    assert json.loads(record.read_text()) == {"weights_sha256": "bb", "result": None}


def test_the_pre_registered_config_is_never_overwritten(tmp_path: Path) -> None:
    out, results = tmp_path / "run", tmp_path / "results"
    write("# the design\nmethods: [kd, metadistil]\n", results / "config.yaml")
    write("methods:\n- kd\n- metadistil\nseed: 0\n", out / "config.yaml")
    write("| table |\n", out / "summary.md")
    powered.copy_small_outputs(out, results)
    assert (results / "config.yaml").read_text() == "# the design\nmethods: [kd, metadistil]\n"
    assert (results / powered.RESOLVED_CONFIG).read_text() == (out / "config.yaml").read_text()
    assert (results / "summary.md").read_text() == "| table |\n"


def test_a_seed_finished_beside_the_runner_is_adopted_once_done(tmp_path: Path) -> None:
    out = tmp_path / "run"
    side = powered.side_folder(out)
    assert side == tmp_path / "run_side"
    _finished_seed(side, 3, METHODS[:1])  # half done beside the runner: left where it is
    assert not powered.adopt_side_seed(side / "seed_3", out / "seed_3", METHODS)
    _finished_seed(side, 3, METHODS)
    write("{}", out / "seed_3" / "kd" / "last.pt")  # the runner had started the seed itself
    assert powered.adopt_side_seed(side / "seed_3", out / "seed_3", METHODS)
    assert powered.seed_is_done(out / "seed_3", METHODS) and not (side / "seed_3").exists()
    assert (out / "seed_3.superseded" / "kd" / "last.pt").is_file()
    _finished_seed(side, 4, METHODS)
    _finished_seed(out, 4, METHODS)  # the runner finished it first: its own runs stay
    assert not powered.adopt_side_seed(side / "seed_4", out / "seed_4", METHODS)


KEPT = Path(__file__).parent.parent / "benchmarks/results/text_powered/seeds"


def test_the_report_from_kept_seeds_covers_every_finished_seed_and_only_those(tmp_path: Path) -> None:
    """Real kept seeds of the powered comparison: the paired difference and the per-example bootstrap's point value
    are recomputed here from each run's done.json and test predictions."""
    import shutil

    kept, results = tmp_path / "seeds", tmp_path / "results"
    kept.mkdir()
    shutil.copy2(KEPT / "teacher.json", kept / "teacher.json")
    for seed in (0, 1, 4):
        shutil.copytree(KEPT / f"seed_{seed}", kept / f"seed_{seed}")
    (kept / "seed_4" / "metadistil" / "done.json").unlink()  # half done: left out
    summary = powered.report_kept_seeds(kept, results, METHODS, task="rotten_tomatoes", metric="accuracy")

    def test_accuracy(seed: int, method: str) -> float:
        return json.loads((KEPT / f"seed_{seed}" / method / "done.json").read_text())["result"]["test"]["accuracy"]

    def predicted_accuracy(seed: int, method: str) -> float:
        kept_predictions = json.loads((KEPT / f"seed_{seed}" / method / "test_predictions.json").read_text())
        labels = kept_predictions["labels"]
        return sum(a == b for a, b in zip(kept_predictions["student"], labels)) / len(labels)

    diffs = [test_accuracy(s, "metadistil") - test_accuracy(s, "kd") for s in (0, 1)]
    paired = summary["paired"]
    assert paired["seeds"] == [0, 1] and abs(paired["mean_diff"] - sum(diffs) / 2) < 1e-12
    from_predictions = [predicted_accuracy(s, "metadistil") - predicted_accuracy(s, "kd") for s in (0, 1)]
    assert abs(paired["per_example"]["mean_diff"] - sum(from_predictions) / 2) < 1e-12
    rows = (results / "pairs.csv").read_text().splitlines()
    assert rows[0].startswith("seed,commit,dirty,kd_test") and [r.split(",")[0] for r in rows[1:]] == ["0", "1"]
    table = (results / "pairs.md").read_text()
    assert f"| {100 * diffs[1]:+.2f}".replace("-", "−") + " |" in table
    assert (results / "dev_curves.png").stat().st_size > 0 and (results / "summary.md").is_file()
    assert powered.report_kept_seeds(tmp_path / "none", results, METHODS, task="t", metric="accuracy") is None
    first = powered.report_kept_seeds(kept, results, METHODS, task="rotten_tomatoes", metric="accuracy", below=1)
    assert first["paired"]["seeds"] == [0] and abs(first["paired"]["mean_diff"] - diffs[0]) < 1e-12
