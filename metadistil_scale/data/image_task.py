"""Image tasks for the trainer: the splits and batches a text task has, built from `data.images`.

- fashion_mnist: the embedded image task, Debian's dataset-fashion-mnist (IDX files in
  /usr/share/datasets/fashion-mnist; `data.data_files.train` may name another folder).
- cifar100: the paper's CV benchmark, from a local copy of the python archive named by `data.data_files.train`
  (cifar-100-python.tar.gz or its extracted folder).

Splits, drawn once from `data.split_seed`: dev is `dev_fraction` of the official train set, quiz is
`quiz_fraction` of the rest (held out for the teacher's meta-update, as the official CV code holds out 10% of
train), train is what remains; test is the official test set. `test_fraction` is not used.

A batch is {"teacher": {"pixel_values"}, "student": {"pixel_values"}, "labels"}: both models see the same image.
Train batches get a random crop and flip; the quiz, dev and test batches are only normalised. A train batch's
augmentation is drawn from a generator seeded by its example indices, so, like the batch itself, it is a
function of the step: a resumed run sees the very images an uninterrupted one does, and the global RNG (which
the meta step replays for dropout) is never touched. Micro-batches are augmented one by one, so micro-batching
changes which crops are drawn, not how many.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch

from metadistil_scale.config import DataConfig
from metadistil_scale.data.images import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    ImageSet,
    augment_batch,
    load_cifar100,
    load_fashion_mnist,
    normalize_batch,
)
from metadistil_scale.data.text import DataError, TaskInfo


@dataclass(frozen=True)
class ImageTaskInfo(TaskInfo):
    in_channels: int = 3
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class AugmentedImages:
    """A selection of training images, with the seed of its crops and flips."""

    images: ImageSet
    seed: int


@dataclass(frozen=True)
class TrainImages:
    """The train split: `select` returns images for the collate to augment."""

    images: ImageSet

    def __len__(self) -> int:
        return len(self.images)

    def select(self, indices: Any) -> AugmentedImages:
        ids = torch.as_tensor(indices, dtype=torch.long)
        return AugmentedImages(self.images.select(ids), zlib.crc32(ids.numpy().tobytes()))


class ImageCollator:
    def __init__(self, info: ImageTaskInfo, dtype: torch.dtype) -> None:
        self.mean, self.std, self.dtype = info.mean, info.std, dtype

    def __call__(self, rows: ImageSet | AugmentedImages) -> dict[str, Any]:
        if isinstance(rows, AugmentedImages):
            generator = torch.Generator().manual_seed(rows.seed)
            images = rows.images
            pixels = augment_batch(images.pixel_values, self.mean, self.std, generator)
        else:
            images = rows
            pixels = normalize_batch(images.pixel_values, self.mean, self.std)
        inputs = {"pixel_values": pixels.to(self.dtype)}
        return {"teacher": inputs, "student": inputs, "labels": images.label}


def load_image_task(data: DataConfig, dtype: torch.dtype) -> tuple[dict[str, Any], ImageTaskInfo, ImageCollator]:
    """(splits train/quiz/dev/test, info, collate) for `data.task` in config.IMAGE_TASKS."""
    source = (data.data_files or {}).get("train")
    try:
        if data.task == "fashion_mnist":
            full_train, test = load_fashion_mnist(source or FASHION_MNIST_DIR)
            mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
        elif data.task == "cifar100":
            if source is None:
                raise DataError("data.data_files.train: cifar100 needs the path of a local cifar-100-python.tar.gz "
                                "(or its extracted folder), e.g. --set data.data_files.train=PATH")
            full_train, test = load_cifar100(source)
            mean, std = CIFAR100_MEAN, CIFAR100_STD
        else:
            raise DataError(f"data.task: unknown image task {data.task!r}")
    except FileNotFoundError as err:
        raise DataError(f"data.data_files.train: {err}") from err
    info = ImageTaskInfo(data.task, full_train.num_classes, False, "accuracy", full_train.class_names, False,
                         in_channels=full_train.pixel_values.shape[1], mean=mean, std=std)

    generator = torch.Generator().manual_seed(data.split_seed)
    order = torch.randperm(len(full_train), generator=generator)
    n_dev = round(len(full_train) * data.dev_fraction)
    dev_ids, rest = order[:n_dev], order[n_dev:]
    n_quiz = round(len(rest) * data.quiz_fraction)
    quiz_ids, train_ids = rest[:n_quiz], rest[n_quiz:]
    test_ids = torch.randperm(len(test), generator=generator)  # so that max_eval_examples takes a random subset
    if data.max_train_examples is not None:
        train_ids = train_ids[: data.max_train_examples]
    if data.max_eval_examples is not None:
        dev_ids, test_ids = dev_ids[: data.max_eval_examples], test_ids[: data.max_eval_examples]
    if min(len(train_ids), len(quiz_ids), len(dev_ids)) == 0:
        raise DataError(f"data: {data.task} has {len(full_train)} training images; dev_fraction="
                        f"{data.dev_fraction} and quiz_fraction={data.quiz_fraction} leave an empty split")
    splits = {
        "train": TrainImages(full_train.select(train_ids)),
        "quiz": full_train.select(quiz_ids),
        "dev": full_train.select(dev_ids),
        "test": test.select(test_ids),
    }
    return splits, info, ImageCollator(info, dtype)
