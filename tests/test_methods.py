"""The method registry: what each method trains and needs, unknown names refused, a new method is one class."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_trainer import save_tiny_bert, tiny_config

from metadistil_scale import methods
from metadistil_scale.config import METHODS, ConfigError, load_config
from metadistil_scale.methods import KD, METHOD_REGISTRY, StepContext, UnknownMethodError, get_method
from metadistil_scale.steps import kd_step
from metadistil_scale.trainer import build_models, load_task, run_stage


def test_registry_lists_the_four_methods_with_what_they_need() -> None:
    assert tuple(METHOD_REGISTRY) == METHODS  # config.py keeps the names without importing torch
    flags = {name: (m.uses_teacher, m.trains_teacher, m.needs_quiz, m.needs_pilot_stream)
             for name, m in ((name, get_method(name)) for name in METHODS)}
    assert flags == {
        "finetune": (False, False, False, False),
        "kd": (True, False, False, False),
        "metadistil": (True, True, True, False),
        "metadistil-no-pilot": (True, True, True, True),
    }


def test_teacher_schedule_and_optimizer_follow_the_method() -> None:
    meta = load_config(None, ["meta.frozen_steps=1", "meta.interval=4"]).meta
    assert get_method("metadistil").teacher_optim(meta) is meta.teacher_optim
    assert get_method("kd").teacher_optim(meta) is None
    assert get_method("metadistil").teacher_schedule_steps(meta, 10) == 3  # updates at steps 1, 5 and 9
    assert get_method("metadistil").teacher_schedule_steps(meta, 1) == 1  # never empty


def test_an_unknown_method_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["methods=[kd, metadistill]"])
    assert "\n" not in str(err.value) and str(err.value).startswith("methods[1]: ")
    assert "'metadistill'" in str(err.value)
    with pytest.raises(UnknownMethodError, match="unknown method 'metadistill'"):
        get_method("metadistill")


class LabelsOnlyKD(KD):
    """KD with α = 1: the teacher runs but only the labels teach, so it trains like `finetune`."""

    name = "kd-labels-only"

    def step(self, ctx: StepContext, step: int, parts: list, logged: bool) -> dict[str, float]:
        return kd_step(ctx.teacher, ctx.student, parts, dataclasses.replace(ctx.distill, alpha=1.0), ctx.regression)


@pytest.mark.slow
def test_a_new_method_is_one_registered_class(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(methods.METHOD_REGISTRY, LabelsOnlyKD.name, LabelsOnlyKD)
    teacher_dir = save_tiny_bert(tmp_path / "teacher", 2, 2, seed=0)
    student_dir = save_tiny_bert(tmp_path / "student", 2, 2, seed=1)
    cfg = tiny_config(tmp_path / "run", teacher_dir, student_dir, "student_train.max_steps=4")
    task = load_task(cfg)
    losses = {}
    for method in (LabelsOnlyKD.name, "finetune"):
        teacher, student = build_models(cfg, task.info, str(teacher_dir), "cpu")
        result = run_stage(method, method, cfg, task, tmp_path / method, student, teacher, resume=False)
        assert result.method == method and result.steps == 4
        log = (tmp_path / method / "metrics.jsonl").read_text().splitlines()
        losses[method] = [json.loads(line)["loss"] for line in log]
    assert losses[LabelsOnlyKD.name] == pytest.approx(losses["finetune"], rel=1e-5)
