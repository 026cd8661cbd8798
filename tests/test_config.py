"""Config: YAML + dotted overrides, every problem reported with its key before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metadistil_scale.cli import main
from metadistil_scale.config import Config, ConfigError, load_config, parse_override, save_config


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.methods == ["kd", "metadistil"]
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"seed": 3, "meta": {"u_mode": "finite-difference"}, "student_train": {"optim": {"lr": 1e-4}}}))
    cfg = load_config(path, ["student_train.batch_size=16", "meta.teacher_optim.lr=1e-6", "methods=[kd]"])
    assert cfg.seed == 3 and cfg.meta.u_mode == "finite-difference"
    assert cfg.student_train.batch_size == 16 and cfg.student_train.optim.lr == 1e-4
    assert cfg.meta.teacher_optim.lr == 1e-6 and cfg.methods == ["kd"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("student_train.bach_size=16", "unknown config key 'student_train.bach_size'"),
        ("student_train.batch_size=sixteen", "student_train.batch_size: expected int, got 'sixteen'"),
        ("distill.alpha=1.5", "distill.alpha: expected in [0, 1], got 1.5"),
        ("meta.u_mode=hessian", "meta.u_mode: expected one of"),
        ("cpu_allocator=jemalloc", "cpu_allocator: expected one of ('retain', 'system'), got 'jemalloc'"),
        ("methods=[kd, distil]", "methods[1]: expected one of"),
        ("student_train.micro_batch_size=5", "student_train.micro_batch_size: expected a divisor of batch_size=32"),
        ("data.data_files={train: /nonexistent/train.csv}", "data.data_files.train: file not found: /nonexistent/train.csv"),
        ("model.teacher=./no/such/model", "model.teacher: model folder not found"),
        ("deepspeed_teacher=/nope.json", "deepspeed_teacher: DeepSpeed config not found"),
        ("seed", "expected KEY=VALUE"),
        ("data.quiz_fraction=true", "data.quiz_fraction: expected float, got True"),
    ],
)
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_override_values_are_typed():
    assert parse_override("meta.pilot_lr=5e-5") == ("meta.pilot_lr", 5e-5)
    assert parse_override("data.max_train_examples=null") == ("data.max_train_examples", None)


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main(["train", "--set", "distill.temperature=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: distill.temperature") and "Traceback" not in err


@pytest.mark.parametrize(
    "override,changed,kept",
    [
        # The README's own example: the student's lr (2e-4 in the package default) must survive.
        ("student_train.max_steps=500", {"student_train.max_steps": 500},
         {"student_train.optim.lr": 2e-4, "student_train.batch_size": 32}),
        ("teacher_finetune.batch_size=16", {"teacher_finetune.batch_size": 16},
         {"teacher_finetune.max_steps": 150, "teacher_finetune.optim.lr": 1e-4}),
        ("meta.teacher_optim.lr=2e-5", {"meta.teacher_optim.lr": 2e-5},
         {"meta.teacher_optim.weight_decay": 0.0, "meta.pilot_lr": 5e-5}),
        # A mapping value merges into the section too, it does not replace it.
        ("student_train.optim={lr: 3e-4}", {"student_train.optim.lr": 3e-4},
         {"student_train.max_steps": 100, "student_train.optim.weight_decay": 0.01}),
    ],
)
def test_override_merges_into_the_recipe_below_it(override, changed, kept):
    def get(cfg, dotted):
        for part in dotted.split("."):
            cfg = getattr(cfg, part)
        return cfg

    cfg = load_config(None, [override])
    for key, value in {**changed, **kept}.items():
        assert get(cfg, key) == value, key


def test_recipe_sections_merge_into_the_package_defaults(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"student_train": {"batch_size": 16}, "meta": {"teacher_optim": {"lr": 2e-5}}}))
    cfg = load_config(path, ["student_train.optim.lr=1e-4"])
    assert cfg.student_train.batch_size == 16 and cfg.student_train.max_steps == 100
    assert cfg.student_train.optim.lr == 1e-4 and cfg.student_train.optim.warmup_ratio == 0.1
    assert cfg.meta.teacher_optim.lr == 2e-5 and cfg.meta.teacher_optim.weight_decay == 0.0


def test_lm_override_merges_into_its_own_defaults():
    from metadistil_scale.lm.recipe import load_lm_config

    cfg = load_lm_config(None, ["student_train.max_steps=7", "meta.teacher_optim.lr=2e-5"])
    assert cfg.student_train.batch_size == 4 and cfg.student_train.optim.warmup_ratio == 0.0
    assert cfg.meta.pilot_lr == 1e-4 and cfg.meta.teacher_optim.warmup_ratio == 0.0


def test_exponent_without_a_dot_is_a_float_in_recipes_and_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("meta:\n  pilot_lr: 1e-4\n")
    assert load_config(path).meta.pilot_lr == 1e-4
    assert load_config(None, ["meta.teacher_optim={lr: 3e-6}"]).meta.teacher_optim.lr == 3e-6


@pytest.mark.parametrize("command", ["train", "lm-train"])
@pytest.mark.parametrize("override", ["meta.interval=0", "meta.frozen_steps=-1", "meta.schedule=slow",
                                      "distill.temperature=0", "log_every=0"])
def test_shared_keys_are_checked_for_both_task_kinds(command, override, tmp_path, capsys):
    """One set of checks for the keys both configs have (meta, distill, logging): refused in one line
    naming the key, before any folder is made."""
    out = tmp_path / "run"
    # The LM recipe does not check its teacher's path: a missing one fails fast should a check be missed.
    teacher = ["--set", f"model.teacher={tmp_path / 'no_teacher'}"] if command == "lm-train" else []
    code = main([command, "--output-dir", str(out), "--set", override, *teacher])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.startswith(f"error: {override.split('=')[0]}: expected") and len(err.splitlines()) == 1


REPO = Path(__file__).resolve().parents[1]


def test_package_data_patterns_match_files() -> None:
    """Every package-data pattern in pyproject.toml ships files (a dead pattern installs nothing silently)."""
    tomllib = pytest.importorskip("tomllib")
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir = tool["package-dir"]
    assert tool["package-data"]
    for package, patterns in tool["package-data"].items():
        assert package in tool["packages"]
        folder = REPO / package_dir.get(package, package.replace(".", "/"))
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{package}: {pattern} matches no file under {folder}"


def test_a_bare_recipe_name_is_a_shipped_recipe(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here
    shipped = load_config(REPO / "configs" / "glue_sst2.yaml")
    assert load_config("glue_sst2") == shipped and load_config("glue_sst2.yaml") == shipped
    from metadistil_scale.lm.recipe import load_lm_config

    assert load_lm_config("lm_smollm2_kjv") == load_lm_config(REPO / "configs" / "lm_smollm2_kjv.yaml")
    with pytest.raises(ConfigError, match=r"not found: glue_sst3 \(nor a shipped recipe: .*glue_sst2"):
        load_config("glue_sst3")
    with pytest.raises(ConfigError, match=r"config file not found: sub/glue_sst2.yaml$"):
        load_config("sub/glue_sst2.yaml")  # a path is only ever a path


# ---------------------------------------------------------------- distill.terms against the task and the models


@pytest.mark.parametrize("kind", ["kl", "mse", "reverse_kl", "jsd"])
def test_softmax_terms_on_a_regression_are_refused_before_any_work(kind):
    from metadistil_scale.config import DistillConfig, DistillTermConfig
    from metadistil_scale.objectives import Objective

    terms = f"distill.terms=[{{kind: score_mse, weight: 0.5}}, {{kind: {kind}}}]"
    with pytest.raises(ConfigError, match=rf"^distill\.terms\[1\]\.kind: expected a term for a regression's single "
                                          rf"output \(score_mse, or a hidden-state or attention term\), got '{kind}'$"):
        load_config(None, ["data.task=stsb", terms])
    with pytest.raises(ConfigError, match=r"distill\.terms\[0\]\.kind"):  # whoever builds the objective directly
        Objective.from_config(DistillConfig(terms=[DistillTermConfig(kind=kind)]), regression=True)
    assert load_config(None, ["data.task=sst2", terms]).distill.terms[1].kind == kind  # a classification takes it
    ok = load_config(None, ["data.task=stsb", "distill.terms=[{kind: score_mse}, {kind: attention, layers: top}]"])
    assert [t.kind for t in ok.distill.terms] == ["score_mse", "attention"]


@pytest.mark.parametrize("overrides,message", [
    (["distill.terms=[{kind: pkd, layers: [[1, 7]]}]"],
     r"distill\.terms\[0\]\.layers: expected \[student, teacher\] pairs in 0\.\.3 and 0\.\.6 for a 3-layer student "
     r"and a 6-layer teacher \(from the models' config files\), got \[1, 7\]$"),
    (["model.student_layers=1", "distill.terms=[{kind: kl}, {kind: hidden_mse, layers: skip}]"],
     r"distill\.terms\[1\]\.layers: expected a layer map that matches layers of a 1-layer student and a 6-layer "
     r"teacher \(from the models' config files\), got 'skip'$"),
    (["distill.terms=[{kind: attention, layers: [[0, 0]]}]"],  # attention maps start at layer 1
     r"distill\.terms\[0\]\.layers: expected \[student, teacher\] pairs in 1\.\.3 and 1\.\.6 .*got \[0, 0\]$"),
    (["model.attn_implementation=sdpa", "distill.terms=[{kind: attention, layers: top}]"],
     r"model\.attn_implementation: expected 'eager' for distill\.terms\[0\] .*got 'sdpa'$"),
])
def test_layer_maps_that_do_not_fit_the_models_are_refused_at_config_time(overrides, message):
    """The embedded MiniLM teacher has 6 layers, the student keeps 3: read from the config files before the
    teacher's fine-tuning starts."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_fitting_layer_maps_and_attention_heads_from_the_config_files(tmp_path):
    from transformers import BertConfig

    for name, heads in (("teacher", 4), ("student", 2)):
        BertConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=heads,
                   intermediate_size=20).save_pretrained(tmp_path / name)
    models = [f"model.teacher={tmp_path / 'teacher'}", f"model.student={tmp_path / 'student'}", "model.student_layers=2"]
    with pytest.raises(ConfigError, match=r"distill\.terms\[0\]\.kind: expected a student with as many attention "
                                          r"heads as its teacher for 'attention' .*got \(2, 4\)$"):
        load_config(None, [*models, "distill.terms=[{kind: attention, layers: top}]"])
    cfg = load_config(None, [*models, "distill.terms=[{kind: hidden_mse, layers: top}, {kind: pkd, layers: uniform}]"])
    assert [t.layers for t in cfg.distill.terms] == ["top", "uniform"]
    assert load_config(None, ["distill.terms=[{kind: attention, layers: uniform}, {kind: pkd, layers: skip}]"])
