"""Image data: CIFAR-100 from its python-pickle archive, Fashion-MNIST from IDX files, batch transforms, quiz split.

Splits come out as `ImageSet`: uint8 pixels [N, C, H, W] and int64 labels [N] held as tensors, plus the class
names. Tensors rather than `datasets.Dataset`: a training batch is then one index into a tensor, and the random
crop / flip and normalisation run on the whole batch (`augment_batch`, `normalize_batch`), not per example.
`ImageSet` still indexes like a map-style dataset (`set[i]` gives {"pixel_values", "label"}), so it also works
with torch's DataLoader.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metadistil_scale.data.text import DataError

# Per-channel statistics of the training images in [0, 1]. CIFAR-100: the values the CIFAR distillation code
# bases normalise with (RepDistiller's dataset/cifar100.py); Fashion-MNIST: computed on its 60,000 training
# images (0.28604, 0.35302).
CIFAR100_MEAN: tuple[float, ...] = (0.5071, 0.4867, 0.4408)
CIFAR100_STD: tuple[float, ...] = (0.2675, 0.2565, 0.2761)
FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR100_NUM_CLASSES = 100
_CIFAR_FILES = ("train", "test", "meta")
_CIFAR_FOLDER = "cifar-100-python"


@dataclass(frozen=True)
class ImageSet:
    pixel_values: Tensor  # uint8 [N, C, H, W]
    label: Tensor  # int64 [N]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return self.label.shape[0]

    def __getitem__(self, index: Any) -> dict[str, Tensor]:
        return {"pixel_values": self.pixel_values[index], "label": self.label[index]}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def select(self, indices: Tensor | Sequence[int]) -> ImageSet:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.pixel_values[indices], self.label[indices], self.class_names)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-100


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle can otherwise run arbitrary code."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def load_cifar100(path: str | Path) -> tuple[ImageSet, ImageSet]:
    """Load CIFAR-100 (train, test) with fine labels from the standard python archive.

    `path` is the `cifar-100-python.tar.gz` archive, the extracted `cifar-100-python/` folder (files `train`,
    `test`, `meta`), or a folder containing that folder. Pixels come out as uint8 [N, 3, 32, 32].
    """
    path = Path(path)
    raw = _read_cifar_tar(path) if path.is_file() else _read_cifar_folder(path)
    meta_name, meta = raw["meta"]
    class_names = _cifar_class_names(meta, meta_name)
    train = _cifar_split(*raw["train"], num_classes=len(class_names))
    test = _cifar_split(*raw["test"], num_classes=len(class_names))
    return ImageSet(*train, class_names), ImageSet(*test, class_names)


def _read_cifar_folder(path: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    if not path.exists():
        raise FileNotFoundError(
            f"CIFAR-100: {path} does not exist (expected {_CIFAR_FOLDER}/ or {_CIFAR_FOLDER}.tar.gz)"
        )
    if not (path / "train").exists() and (path / _CIFAR_FOLDER).is_dir():
        path = path / _CIFAR_FOLDER
    out = {}
    for name in _CIFAR_FILES:
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(
                f"CIFAR-100: {file} is missing (a {_CIFAR_FOLDER}/ folder holds {', '.join(_CIFAR_FILES)})"
            )
        out[name] = (str(file), _unpickle(file.read_bytes(), str(file)))
    return out


def _read_cifar_tar(path: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"{path}: not a readable tar archive ({err})") from err
    with archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
        out = {}
        for name in _CIFAR_FILES:
            where = f"{path}:{_CIFAR_FOLDER}/{name}"
            if name not in members:
                raise DataError(
                    f"{path}: the archive has no member {_CIFAR_FOLDER}/{name} (holds: "
                    f"{', '.join(sorted(members)) or 'no files'})"
                )
            handle = archive.extractfile(members[name])
            assert handle is not None  # regular file members always extract
            out[name] = (where, _unpickle(handle.read(), where))
    return out


def _unpickle(data: bytes, where: str) -> dict[str, Any]:
    # latin1 reads the Python 2 strings in the original archive as the bytes they are (numpy's advice).
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as err:
        raise DataError(f"{where}: not a CIFAR python pickle ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    # Keys are bytes or str depending on who wrote the pickle; compare them as str.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _require(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise DataError(f"{where}: missing key {key!r} (has: {', '.join(map(repr, obj)) or 'none'})")
    return obj[key]


def _cifar_class_names(meta: dict[str, Any], where: str) -> tuple[str, ...]:
    names = _require(meta, "fine_label_names", where)
    if not isinstance(names, list | tuple) or len(names) != CIFAR100_NUM_CLASSES:
        got = f"{len(names)} entries" if isinstance(names, list | tuple) else type(names).__name__
        raise DataError(
            f"{where}: 'fine_label_names' should list {CIFAR100_NUM_CLASSES} class names, got {got}"
        )
    return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)


def _cifar_split(where: str, obj: dict[str, Any], num_classes: int) -> tuple[Tensor, Tensor]:
    data = _require(obj, "data", where)
    labels = _require(obj, "fine_labels", where)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DataError(f"{where}: 'data' should be a uint8 array of shape (N, 3072), got {got}")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: 'fine_labels' should be a list of ints ({err})") from err
    if label_array.shape != (data.shape[0],):
        raise DataError(
            f"{where}: 'fine_labels' has shape {label_array.shape}, expected ({data.shape[0]},) "
            "to match 'data'"
        )
    bad = np.flatnonzero((label_array < 0) | (label_array >= num_classes))
    if bad.size:
        raise DataError(
            f"{where}: 'fine_labels' value {label_array[bad[0]]} at index {bad[0]} is out of range "
            f"[0, {num_classes}) ({bad.size} such labels)"
        )
    # Rows hold the 1024 red, then green, then blue values of a 32x32 image in row-major order.
    pixels = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return pixels, torch.from_numpy(label_array)


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _idx_code(dtype: Any) -> int:
    for code, candidate in _IDX_DTYPES.items():
        if np.dtype(candidate).newbyteorder("=") == np.dtype(dtype).newbyteorder("="):
            return code
    raise ValueError(f"IDX files cannot hold {np.dtype(dtype)}")


def read_idx(path: str | Path, expected_ndim: int | None = None, expected_dtype: Any = None) -> np.ndarray:
    """Read an IDX file (gzipped or not); the magic number, dimensions and payload size are checked."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: corrupt gzip data ({err})") from err
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header (4-byte magic number)")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{path}: magic number 0x{magic:08x} is not an IDX magic number "
            "(0x0000TTDD: type TT in 08, 09, 0b-0e, DD dimensions)"
        )
    want_code = code if expected_dtype is None else _idx_code(expected_dtype)
    want_ndim = ndim if expected_ndim is None else expected_ndim
    if (code, ndim) != (want_code, want_ndim):
        want = (want_code << 8) | want_ndim
        raise DataError(
            f"{path}: magic number 0x{magic:08x} ({np.dtype(_IDX_DTYPES[code])}, {ndim} dimensions), "
            f"expected 0x{want:08x} ({np.dtype(_IDX_DTYPES[want_code])}, {want_ndim} dimensions)"
        )
    dtype = np.dtype(_IDX_DTYPES[code])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: header of {ndim} dimensions needs {header} bytes, the file has {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_bytes = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected_bytes:
        raise DataError(
            f"{path}: dimensions {shape} need {expected_bytes} bytes of data after the header, "
            f"got {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(root: str | Path = FASHION_MNIST_DIR) -> tuple[ImageSet, ImageSet]:
    """Load Fashion-MNIST (train, test) as uint8 [N, 1, 28, 28], from Debian's dataset-fashion-mnist files."""
    root = Path(root)
    splits = []
    for prefix in ("train", "t10k"):
        images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
        images = read_idx(images_path, 3, np.uint8)
        labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        labels = read_idx(labels_path, 1, np.uint8)
        if images.shape[1:] != (28, 28):
            raise DataError(f"{images_path}: images are {images.shape[1:]}, expected (28, 28)")
        if labels.shape[0] != images.shape[0]:
            raise DataError(
                f"{labels_path}: {labels.shape[0]} labels, expected {images.shape[0]} to match the images"
            )
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise DataError(
                f"{labels_path}: label {labels.max()} is out of range [0, {len(FASHION_MNIST_CLASSES)})"
            )
        splits.append(
            ImageSet(
                torch.from_numpy(images).unsqueeze(1),
                torch.from_numpy(labels.astype(np.int64)),
                FASHION_MNIST_CLASSES,
            )
        )
    return splits[0], splits[1]


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST: neither {root / stem} nor {root / stem}.gz exists; install Debian's "
        f"package with `apt-get install {FASHION_MNIST_PACKAGE}` (it puts the IDX files in "
        f"{FASHION_MNIST_DIR}) or pass the folder that holds them"
    )


# ----------------------------------------------------------------------------------------------------------
# Batch transforms and the quiz split


def normalize_batch(pixel_values: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [B, C, H, W] -> float32, scaled to [0, 1] and standardised per channel."""
    if len(mean) != pixel_values.shape[1] or len(std) != pixel_values.shape[1]:
        raise ValueError(f"{pixel_values.shape[1]} channels but {len(mean)} means and {len(std)} stds")
    x = pixel_values.float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def augment_batch(
    pixel_values: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    *,
    padding: int = 4,
    flip: bool = True,
) -> Tensor:
    """Training transform: random crop after zero padding, random horizontal flip, then `normalize_batch`.

    Each example gets its own offsets and flip, drawn from `generator` (a CPU generator), so a seeded
    generator gives the same batch on every run and device.
    """
    b, _, h, w = pixel_values.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    offsets, flips = offsets.to(pixel_values.device), flips.to(pixel_values.device)
    # Zero padding on the uint8 image: padded pixels are black before normalisation, as torchvision pads.
    padded = torch.nn.functional.pad(pixel_values, (padding, padding, padding, padding))
    rows = offsets[0, :, None] + torch.arange(h, device=padded.device)
    ramp = torch.arange(w, device=padded.device)
    cols = offsets[1, :, None] + torch.where(flips[:, None], w - 1 - ramp, ramp)
    batch = torch.arange(b, device=padded.device)[:, None, None, None]
    channel = torch.arange(padded.shape[1], device=padded.device)[None, :, None, None]
    cropped = padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
    return normalize_batch(cropped, mean, std)


def split_quiz(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Disjoint (train_idx, quiz_idx) over range(n), `round(n * fraction)` in quiz, each sorted ascending."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"quiz fraction must be in (0, 1), got {fraction!r}")
    n_quiz = round(n * fraction)
    if not 0 < n_quiz < n:
        raise ValueError(
            f"a quiz fraction of {fraction} of {n} examples leaves {n_quiz} in quiz and "
            f"{n - n_quiz} in train; both need at least one"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_quiz:].sort().values, order[:n_quiz].sort().values
