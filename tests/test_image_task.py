"""The image path of the trainer: image tasks (splits, batches, augmentation), cv: models and their checkpoints,
the CV recipe's options (step decays, a frozen teacher, a meta-update interval) and a CV MetaDistil stage."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from metadistil_scale.backends.torch_backend import lr_schedule
from metadistil_scale.config import ConfigError, OptimConfig, load_config
from metadistil_scale.data.image_task import AugmentedImages, TrainImages
from metadistil_scale.data.images import FASHION_MNIST_MEAN, FASHION_MNIST_STD, normalize_batch
from metadistil_scale.data.text import DataError
from metadistil_scale.models import load_model, load_saved_like, save_model, saved_model_exists
from metadistil_scale.trainer import BatchStream, build_models, load_task, run_stage

N_TRAIN, N_TEST = 200, 40


def write_fashion(root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """Small uncompressed IDX files; every image carries its own index in its first two pixels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        labels = (np.arange(n) % 10).astype(np.uint8)
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())
    return root


def image_config(tmp_path: Path, *extra: str):
    data = write_fashion(tmp_path / "fmnist")
    return load_config(None, [
        "data.task=fashion_mnist", f"data.data_files.train={data}", "model.teacher=cv:resnet8",
        "model.student=cv:resnet8", "model.student_layers=null", f"output_dir={tmp_path / 'run'}",
        "student_train.batch_size=8", "teacher_finetune.batch_size=8", "meta.quiz_batch_size=8",
        "eval_batch_size=64", *extra,
    ])


def image_ids(pixels: torch.Tensor) -> set[int]:
    return set((pixels[:, 0, 0, 0].long() + 256 * pixels[:, 0, 0, 1].long()).tolist())


# ---------------------------------------------------------------- the task


def test_splits_are_disjoint_cover_train_and_follow_split_seed(tmp_path: Path) -> None:
    task = load_task(image_config(tmp_path))
    train = image_ids(task.splits["train"].images.pixel_values)
    quiz, dev = image_ids(task.splits["quiz"].pixel_values), image_ids(task.splits["dev"].pixel_values)
    assert (len(dev), len(quiz), len(train)) == (20, 18, 162)
    assert not (train & quiz) and not (train & dev) and not (quiz & dev)
    assert train | quiz | dev == set(range(N_TRAIN))
    assert image_ids(task.splits["test"].pixel_values) == set(range(N_TEST))
    assert task.info.num_labels == 10 and task.info.in_channels == 1 and task.info.metric == "accuracy"

    again = load_task(image_config(tmp_path))
    assert torch.equal(again.splits["dev"].pixel_values, task.splits["dev"].pixel_values)
    other = load_task(image_config(tmp_path, "data.split_seed=1"))
    assert image_ids(other.splits["dev"].pixel_values) != dev

    small = load_task(image_config(tmp_path, "data.max_train_examples=50", "data.max_eval_examples=10"))
    assert (len(small.splits["train"]), len(small.splits["dev"]), len(small.splits["test"])) == (50, 10, 10)
    assert len(small.splits["quiz"]) == 18  # carved before truncation


def test_batches_have_the_trainer_format_and_only_train_is_augmented(tmp_path: Path) -> None:
    task = load_task(image_config(tmp_path, "dtype=float64"))
    batch = task.collate(task.splits["dev"].select(range(5)))
    assert set(batch) == {"teacher", "student", "labels"}
    x = batch["student"]["pixel_values"]
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float64 and batch["teacher"]["pixel_values"] is x
    assert batch["labels"].dtype == torch.int64
    plain = normalize_batch(task.splits["dev"].pixel_values[:5], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    torch.testing.assert_close(x, plain.double())

    train = task.splits["train"]
    assert isinstance(train, TrainImages) and isinstance(train.select([0, 1]), AugmentedImages)
    augmented = task.collate(train.select(range(16)))["student"]["pixel_values"]
    unaugmented = normalize_batch(train.images.pixel_values[:16], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    assert not torch.allclose(augmented, unaugmented.double())


def test_train_batches_are_a_function_of_the_step(tmp_path: Path) -> None:
    task = load_task(image_config(tmp_path))
    stream = BatchStream(task.rows("train"), 8, seed=3, collate=task.collate, micro_batch_size=None)
    torch.manual_seed(0)
    first = stream(5)[0]["student"]["pixel_values"]
    torch.manual_seed(123)  # the global RNG plays no part
    again = stream(5)[0]["student"]["pixel_values"]
    assert torch.equal(first, again)
    assert not torch.equal(first, stream(6)[0]["student"]["pixel_values"])


def test_image_task_errors_name_the_key(tmp_path: Path) -> None:
    cfg = image_config(tmp_path)
    cfg.data.data_files = {"train": str(tmp_path / "empty")}
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data.data_files.train: .*train-images-idx3-ubyte"):
        load_task(cfg)
    cfg.data.task, cfg.data.data_files = "cifar100", None
    with pytest.raises(DataError, match="data.data_files.train: cifar100 needs"):
        load_task(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.task=fashion_mnist"], "model.teacher: expected a 'cv:<name>' source"),
        (["model.teacher=cv:resnet8"], "model.teacher: expected a text model"),
        (["data.task=fashion_mnist", "model.teacher=cv:resnet8", "model.student=cv:resnet9"],
         "model.student: expected cv:<name> with a name in"),
        (["data.task=fashion_mnist", "model.teacher=cv:resnet8", "model.student=cv:resnet8"],
         "model.student_layers: expected null"),
        (["student_train.optim.schedule=cosine"], "student_train.optim.schedule"),
        (["meta.teacher_optim.milestones=[0.75, 0.5]"], "meta.teacher_optim.milestones"),
        (["seeds=[1, 1]"], "seeds"),
    ],
)
def test_image_config_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# ---------------------------------------------------------------- models and the CV recipe


def test_cv_model_checkpoint_round_trip(tmp_path: Path) -> None:
    model = load_model("cv:resnet8", 10, in_channels=1)
    model.train()(torch.randn(4, 1, 28, 28))  # move the BatchNorm statistics away from their initial values
    save_model(model, tmp_path / "m")
    assert saved_model_exists(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "cv_model.json").read_text()) == {
        "arch": "resnet8", "num_classes": 10, "in_channels": 1}
    x = torch.randn(3, 1, 28, 28)
    for loaded in (load_model(str(tmp_path / "m"), 10), load_saved_like(tmp_path / "m", model)):
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="10 classes, the task 7"):
        load_model(str(tmp_path / "m"), 7)


def test_step_and_constant_schedules() -> None:
    param = torch.nn.Parameter(torch.zeros(1))

    def lrs(cfg: OptimConfig, total: int) -> list[float]:
        opt = torch.optim.SGD([param], lr=cfg.lr)
        schedule, out = lr_schedule(opt, total, cfg), []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.step()
        return out

    step = OptimConfig(name="sgd", lr=1.0, warmup_ratio=0.0, schedule="step", milestones=[0.5, 0.75], gamma=0.1)
    assert lrs(step, 8) == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    constant = OptimConfig(name="sgd", lr=0.5, warmup_ratio=0.25, schedule="constant")
    assert lrs(constant, 4) == pytest.approx([0.25, 0.5, 0.5, 0.5])
    linear = OptimConfig(name="sgd", lr=1.0, warmup_ratio=0.0)  # the default, unchanged
    assert lrs(linear, 4) == pytest.approx([1, 0.75, 0.5, 0.25])


def test_cv_metadistil_stage_freezes_then_meta_updates_the_teacher(tmp_path: Path) -> None:
    """SGD with step decays, the teacher frozen for 2 steps then meta-updated every 2nd step; the teacher's dev
    metric is logged at every evaluation and both models are saved as CV checkpoints."""
    sgd = "{name: sgd, lr: 0.05, momentum: 0.9, warmup_ratio: 0.0, schedule: step, milestones: [0.5]}"
    cfg = image_config(tmp_path, "student_train.max_steps=6", "eval_every=3", "log_every=1",
                       f"student_train.optim={sgd}", "meta.teacher_optim={name: sgd, lr: 0.1, warmup_ratio: 0.0}",
                       "meta.frozen_steps=2", "meta.interval=2", "meta.teacher_ce_weight=0.5", "meta.pilot_lr=0.05")
    task = load_task(cfg)
    torch.manual_seed(0)
    teacher, student = build_models(cfg, task.info, cfg.model.teacher, "cpu")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = run_stage("metadistil", "metadistil", cfg, task, tmp_path / "md", student, teacher, resume=False)

    log = [json.loads(line) for line in (tmp_path / "md" / "metrics.jsonl").read_text().splitlines()]
    assert [r["teacher_updated"] for r in log] == [0, 0, 1, 0, 1, 0]  # steps 2 and 4 (0-based) update it
    # lr is logged after the step, i.e. the next step's: x0.1 from step 3 on (milestone 0.5 of 6 steps)
    assert [r["lr"] for r in log] == pytest.approx([0.05] * 2 + [0.005] * 4)
    evals = [r for r in log if "dev_accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6] and all("teacher_dev_accuracy" in r for r in evals)
    assert any(not torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert result.teacher_test is not None and 0 <= result.teacher_test["accuracy"] <= 1
    assert saved_model_exists(tmp_path / "md" / "best") and saved_model_exists(tmp_path / "md" / "best" / "teacher")
