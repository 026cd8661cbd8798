import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

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
    read_idx,
    split_quiz,
)
from metadistil_scale.data.text import DataError

# ----------------------------------------------------------------------------------------------------------
# A fake CIFAR-100 archive with the real one's layout: bytes keys, 'data' uint8 (N, 3072), 'fine_labels' list.


def _cifar_parts(n_train: int = 6, n_test: int = 4) -> dict[str, dict[bytes, object]]:
    rng = np.random.default_rng(0)

    def split(n: int, name: bytes) -> dict[bytes, object]:
        return {
            b"batch_label": name,
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
        }

    return {
        "train": split(n_train, b"training batch 1 of 1"),
        "test": split(n_test, b"testing batch 1 of 1"),
        "meta": {
            b"fine_label_names": [f"class_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super_{i}".encode() for i in range(20)],
        },
    }


class _Py2StylePickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes and numpy's functions under numpy.core, as the original archive
    (pickled by Python 2) does; Python 3 cannot otherwise produce that file."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_global(self, obj: object, name: str | None = None) -> None:
        if getattr(obj, "__module__", None) == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + (name or obj.__name__).encode() + b"\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch[bytes] = save_bytes
    dispatch[type(len)] = save_global


def _dumps(obj: object, protocol: int | str) -> bytes:
    if protocol == "py2":
        buffer = io.BytesIO()
        _Py2StylePickler(buffer, protocol=2).dump(obj)
        return buffer.getvalue()
    return pickle.dumps(obj, protocol=protocol)


def _write_folder(root: Path, parts: dict[str, object], protocol: int | str = 4) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, obj in parts.items():
        (folder / name).write_bytes(_dumps(obj, protocol))
    return folder


def _write_tar(root: Path, parts: dict[str, object]) -> Path:
    folder = _write_folder(root / "src", parts)
    archive = root / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in parts:
            tar.add(folder / name, arcname=f"cifar-100-python/{name}")
    return archive


def _check_against(parts: dict[str, dict[bytes, object]], train: ImageSet, test: ImageSet) -> None:
    for split, loaded in (("train", train), ("test", test)):
        data = parts[split][b"data"]
        assert loaded.pixel_values.dtype == torch.uint8 and loaded.label.dtype == torch.int64
        assert loaded.pixel_values.shape == (data.shape[0], 3, 32, 32)
        # Row layout: 1024 red values, then green, then blue, each 32x32 row-major.
        i, c, y, x = 1, 2, 5, 7
        assert loaded.pixel_values[i, c, y, x].item() == data[i, c * 1024 + y * 32 + x]
        assert loaded.pixel_values.flatten(1).numpy().tolist() == data.tolist()
        assert loaded.label.tolist() == parts[split][b"fine_labels"]
        assert loaded.class_names == tuple(f"class_{i}" for i in range(100))
        assert loaded.num_classes == 100


def test_cifar100_from_folder_parent_and_tar(tmp_path: Path) -> None:
    parts = _cifar_parts()
    folder = _write_folder(tmp_path / "a", parts)
    _check_against(parts, *load_cifar100(folder))
    _check_against(parts, *load_cifar100(folder.parent))  # a root holding cifar-100-python/
    _check_against(parts, *load_cifar100(_write_tar(tmp_path / "b", parts)))
    # Python 3 protocol-2 pickles spell bytes through _codecs.encode; the reader allows that too.
    _check_against(parts, *load_cifar100(_write_folder(tmp_path / "c", parts, protocol=2)))
    # The original archive: Python 2 strings (read as latin1) and numpy.core names.
    py2 = _write_folder(tmp_path / "d", parts, protocol="py2")
    assert b"cnumpy.core.multiarray\n_reconstruct" in (py2 / "train").read_bytes()
    _check_against(parts, *load_cifar100(py2))


def test_image_set_indexing_and_select(tmp_path: Path) -> None:
    train, _ = load_cifar100(_write_folder(tmp_path, _cifar_parts()))
    item = train[2]
    assert item["pixel_values"].shape == (3, 32, 32) and item["label"].shape == ()
    picked = train.select([4, 0])
    assert len(picked) == 2 and torch.equal(picked.pixel_values[1], train.pixel_values[0])
    batch = torch.utils.data.DataLoader(train, batch_size=3)
    assert next(iter(batch))["pixel_values"].shape == (3, 3, 32, 32)


def _corrupt(parts: dict, kind: str) -> tuple[str, type[Exception], str]:
    """Break `parts` in place; return (file that should be named, error type, message pattern)."""
    if kind == "missing_key":
        del parts["train"][b"fine_labels"]
        return "train", DataError, r"missing key 'fine_labels'"
    if kind == "wrong_shape":
        parts["test"][b"data"] = np.zeros((4, 3000), dtype=np.uint8)
        return "test", DataError, r"shape \(N, 3072\), got uint8 array of shape \(4, 3000\)"
    if kind == "wrong_dtype":
        parts["test"][b"data"] = np.zeros((4, 3072), dtype=np.float32)
        return "test", DataError, r"uint8 array .*got float32"
    if kind == "label_out_of_range":
        parts["train"][b"fine_labels"][3] = 100
        return "train", DataError, r"value 100 at index 3 is out of range \[0, 100\)"
    if kind == "label_count":
        parts["train"][b"fine_labels"].pop()
        return "train", DataError, r"'fine_labels' has shape \(5,\), expected \(6,\)"
    if kind == "class_names":
        parts["meta"][b"fine_label_names"] = parts["meta"][b"fine_label_names"][:99]
        return "meta", DataError, r"should list 100 class names, got 99 entries"
    if kind == "not_a_dict":
        parts["meta"] = [1, 2, 3]
        return "meta", DataError, r"expected a pickled dict, got list"
    if kind == "code_in_pickle":
        parts["train"] = Path("x")  # unpickling a pathlib object would import a module: refused
        return "train", DataError, r"refusing to load pathlib"
    raise AssertionError(kind)


CORRUPTIONS = [
    "missing_key",
    "wrong_shape",
    "wrong_dtype",
    "label_out_of_range",
    "label_count",
    "class_names",
    "not_a_dict",
    "code_in_pickle",
]


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("form", ["folder", "tar"])
def test_cifar100_corrupt_archives_name_file_and_problem(tmp_path: Path, kind: str, form: str) -> None:
    parts = _cifar_parts()
    file, error, pattern = _corrupt(parts, kind)
    path = _write_folder(tmp_path, parts) if form == "folder" else _write_tar(tmp_path, parts)
    with pytest.raises(error, match=pattern) as info:
        load_cifar100(path)
    assert f"cifar-100-python/{file}" in str(info.value)


def test_cifar100_missing_files(tmp_path: Path) -> None:
    parts = _cifar_parts()
    del parts["meta"]
    folder = _write_folder(tmp_path / "folder", parts)
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/meta is missing"):
        load_cifar100(folder)
    with pytest.raises(DataError, match=r"no member cifar-100-python/meta \(holds: test, train\)"):
        load_cifar100(_write_tar(tmp_path / "tar", parts))
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist"):
        load_cifar100(tmp_path / "nowhere")
    not_tar = tmp_path / "cifar-100-python.tar.gz"
    not_tar.write_bytes(b"not an archive")
    with pytest.raises(DataError, match=r"not a readable tar archive"):
        load_cifar100(not_tar)


# ----------------------------------------------------------------------------------------------------------
# IDX files


def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_fashion(root: Path, n: dict[str, int], gz: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, count in n.items():
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(array)
            if gz:
                (root / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (root / stem).write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    for array, code in (
        (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08),
        (np.array([-3, 70000, 5], dtype=np.int32), 0x0C),
        (np.array([[1.5, -2.25]], dtype=np.float64), 0x0E),
    ):
        path = tmp_path / f"a{code}"
        data = _idx_bytes(array, code)
        path.write_bytes(gzip.compress(data) if gz else data)
        out = read_idx(path)
        assert out.dtype == array.dtype.newbyteorder("=") and np.array_equal(out, array)


def test_read_idx_errors(tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    labels.write_bytes(_idx_bytes(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(
        DataError,
        match=r"labels: magic number 0x00000801 \(uint8, 1 dimensions\), expected "
        r"0x00000803 \(uint8, 3 dimensions\)",
    ):
        read_idx(labels, 3, np.uint8)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))[:-1])
    with pytest.raises(
        DataError,
        match=r"short: dimensions \(2, 3, 3\) need 18 bytes of data after the header, "
        r"got 17",
    ):
        read_idx(short, 3, np.uint8)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(DataError, match=r"garbage: magic number 0x504b0304 is not an IDX magic number"):
        read_idx(garbage)
    bad_gz = tmp_path / "bad.gz"
    bad_gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02ab")[:-6])
    with pytest.raises(DataError, match=r"bad.gz: corrupt gzip data"):
        read_idx(bad_gz)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_small_idx_files(tmp_path: Path, gz: bool) -> None:
    _write_fashion(tmp_path, {"train": 7, "t10k": 3}, gz=gz)
    train, test = load_fashion_mnist(tmp_path)
    assert train.pixel_values.shape == (7, 1, 28, 28) and test.pixel_values.shape == (3, 1, 28, 28)
    assert train.pixel_values.dtype == torch.uint8 and train.label.dtype == torch.int64
    assert train.num_classes == 10 and train.class_names[0] == "T-shirt/top"


def test_fashion_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "absent")
    _write_fashion(tmp_path, {"train": 7, "t10k": 3})
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(_idx_bytes(np.zeros(4, dtype=np.uint8)))
    )
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: 4 labels, expected 3"):
        load_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.full(3, 10, np.uint8))))
    with pytest.raises(DataError, match=r"label 10 is out of range \[0, 10\)"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"Debian package dataset-fashion-mnist is not installed ({FASHION_MNIST_DIR} absent)",
)
def test_fashion_mnist_debian_files() -> None:
    train, test = load_fashion_mnist()
    assert train.pixel_values.shape == (60000, 1, 28, 28) and test.pixel_values.shape == (10000, 1, 28, 28)
    assert train.label.bincount().tolist() == [6000] * 10 and test.label.bincount().tolist() == [1000] * 10
    assert train.num_classes == 10
    x = train.pixel_values.double() / 255
    assert (
        abs(x.mean().item() - FASHION_MNIST_MEAN[0]) < 1e-4
        and abs(x.std().item() - FASHION_MNIST_STD[0]) < 1e-4
    )


# ----------------------------------------------------------------------------------------------------------
# Transforms and the quiz split


def test_normalize_batch_known_values() -> None:
    pixels = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    out = normalize_batch(pixels, CIFAR100_MEAN, CIFAR100_STD)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    expected = [
        (0 - CIFAR100_MEAN[0]) / CIFAR100_STD[0],
        (1 - CIFAR100_MEAN[1]) / CIFAR100_STD[1],
        (0.2 - CIFAR100_MEAN[2]) / CIFAR100_STD[2],
    ]
    torch.testing.assert_close(out[1, :, 1, 0], torch.tensor(expected))
    with pytest.raises(ValueError, match=r"3 channels but 1 means"):
        normalize_batch(pixels, FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def test_augment_batch_is_a_seeded_crop_and_flip() -> None:
    pixels = torch.randint(
        1, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    mean, std = CIFAR100_MEAN, CIFAR100_STD
    out = augment_batch(pixels, mean, std, torch.Generator().manual_seed(5))
    assert out.dtype == torch.float32 and out.shape == pixels.shape
    assert torch.equal(out, augment_batch(pixels, mean, std, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, augment_batch(pixels, mean, std, torch.Generator().manual_seed(6)))

    # Every output is one 8x8 window of the zero-padded image, mirrored or not; find which.
    padded = torch.nn.functional.pad(pixels, (4, 4, 4, 4))
    candidates = {}
    for dy in range(9):
        for dx in range(9):
            window = padded[:, :, dy : dy + 8, dx : dx + 8]
            candidates[dy, dx, False] = normalize_batch(window, mean, std)
            candidates[dy, dx, True] = normalize_batch(window.flip(-1), mean, std)
    seen = set()
    for i in range(len(pixels)):
        matches = [key for key, crops in candidates.items() if torch.equal(out[i], crops[i])]
        assert matches, f"example {i} is not a crop of its padded image"
        seen.update(matches)
    assert {f for _, _, f in seen} == {False, True} and len({(dy, dx) for dy, dx, _ in seen}) > 20

    plain = augment_batch(pixels, mean, std, torch.Generator(), padding=0, flip=False)
    assert torch.equal(plain, normalize_batch(pixels, mean, std))


def test_split_quiz() -> None:
    train, quiz = split_quiz(1000, 0.1, seed=3)
    assert len(quiz) == 100 and len(train) == 900
    assert torch.equal(torch.cat([train, quiz]).sort().values, torch.arange(1000))
    assert torch.equal(quiz, quiz.sort().values) and torch.equal(train, train.sort().values)
    again_train, again_quiz = split_quiz(1000, 0.1, seed=3)
    assert torch.equal(quiz, again_quiz) and torch.equal(train, again_train)
    assert not torch.equal(quiz, split_quiz(1000, 0.1, seed=4)[1])
    assert len(split_quiz(7, 0.25, seed=0)[1]) == 2  # round(1.75)
    for n, fraction in ((10, 0.0), (10, 1.0), (1, 0.5), (10, 0.01)):
        with pytest.raises(ValueError, match=r"quiz"):
            split_quiz(n, fraction, seed=0)
