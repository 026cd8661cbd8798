"""Cached teacher outputs: the frozen teacher's logits, computed once per input row and kept on disk.

KD and MetaDistil's frozen phase (`meta.frozen_steps`) run the teacher without gradients, in eval mode, on the
same train rows epoch after epoch and run after run (other seeds, methods and hyperparameters that share the
teacher). With `teacher_cache.enabled` a step looks each row of its batch up, runs the teacher on the rows it
has not seen (only those), and keeps their logits, full and unrounded, for later steps and later runs.

Exact, not approximate: a row's key is a hash of its teacher inputs as the batch gives them (token ids, attention
mask, token types, padded to the batch's longest row; pixels for an image task), so a cached row stands for the
same input at the same padded length only. The same text padded to 40 or to 48 tokens gives logits a few ulps
apart, so it is two keys. A hit returns what the live forward returns for that row in any batch of that padded
length where the teacher's forward treats rows independently, as the CPU kernels here do (the tests compare
student weights bit for bit, with and without the cache).

Reuse and invalidation: the store is one folder per teacher fingerprint (a hash of the teacher's weights and
buffers, class and config, the torch version and device type) under `teacher_cache.dir`; data and max_length are
in every key, so a changed teacher or changed data can never hit. Each process writes its new rows as a shard
file of its own (rows-*.safetensors, written atomically), so runs sharing the folder never overwrite each other.

A causal LM's teacher gives a [tokens × vocabulary] distribution per row, too large to keep whole: there the
cache keeps its top k (`TopKRows`, lm.chunked.TopKTeacher: per token the k largest tempered log-probabilities
and the rest's mass), approximate by design, in a folder of its own per (teacher, k, temperature).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from metadistil_scale.lm.chunked import HeadLogits, TopKTeacher, head_top_k

if TYPE_CHECKING:
    from metadistil_scale.backends.base import BackendModel
    from metadistil_scale.config import Config
    from metadistil_scale.lm.recipe import LMConfig
    from metadistil_scale.methods import Method

KEY_BYTES = 16
FLUSH_ROWS = 65_536  # new rows kept in memory before a shard is written mid-stage


def teacher_fingerprint(module: nn.Module, device_type: str) -> str:
    """A hash of everything the teacher's eval-mode logits depend on besides the input."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    described = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else ""
    attention = getattr(config, "_attn_implementation", None)
    digest.update(f"{type(module).__qualname__}|{described}|{attention}|{torch.__version__}|{device_type}".encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(_as_bytes(tensor.reshape(-1)).tobytes())
    return digest.hexdigest()[:24]


def row_keys(inputs: dict[str, torch.Tensor]) -> list[bytes]:
    """One key per row of a batch: a hash of every input tensor's row (its bytes, dtype and shape)."""
    names = sorted(inputs)
    rows = {name: _as_bytes(inputs[name]).reshape(len(inputs[name]), -1) for name in names}
    header = "|".join(f"{n}:{inputs[n].dtype}:{tuple(inputs[n].shape[1:])}" for n in names).encode()
    keys = []
    for i in range(len(rows[names[0]])):
        digest = hashlib.blake2b(header, digest_size=KEY_BYTES)
        for name in names:
            digest.update(rows[name][i].tobytes())
        keys.append(digest.digest())
    return keys


def _as_bytes(tensor: torch.Tensor):
    """The tensor's raw bytes as a numpy uint8 array (any dtype, bfloat16 included), on the CPU."""
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy()


class RowFormat(Protocol):
    """What the cache keeps of a teacher output, row by row, and how it stores it in a shard."""

    tag: str  # added to the folder name: a format, or its settings, never reads another's rows

    def split(self, computed: Any, rows: int) -> list[Any]:
        """The teacher's output for a batch of `rows` rows as one value per row, on the CPU."""

    def join(self, values: list[Any], device: torch.device) -> Any:
        """The output of a batch from its rows' values (what the loss reads)."""

    def pack(self, values: list[Any]) -> dict[str, torch.Tensor]: ...

    def unpack(self, stored: dict[str, torch.Tensor]) -> list[Any]: ...


class FullLogits:
    """Classification: a row's whole logits vector, unrounded (exact)."""

    tag = ""

    def split(self, computed: torch.Tensor, rows: int) -> list[torch.Tensor]:
        return [row.clone() for row in computed.detach().cpu()]

    def join(self, values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        return torch.stack(values).to(device)

    def pack(self, values: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": torch.stack(values).contiguous()}

    def unpack(self, stored: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return list(stored["logits"])


class TopKRows:
    """A causal LM: per token of a row, the teacher's top-k tempered log-probabilities and the rest's mass
    (lm.chunked.TopKTeacher); token ids kept as int32."""

    def __init__(self, k: int, temperature: float) -> None:
        self.k, self.temperature = k, temperature
        self.tag = f"-top{k}-t{temperature:g}"

    def split(self, computed: HeadLogits, rows: int) -> list[TopKTeacher]:
        top = head_top_k(computed, self.k, self.temperature)
        per_row = len(top.rest) // rows
        return [TopKTeacher(*(t[i * per_row:(i + 1) * per_row].cpu().clone()
                              for t in (top.indices.int(), top.logprobs, top.rest)), self.temperature)
                for i in range(rows)]

    def join(self, values: list[TopKTeacher], device: torch.device) -> TopKTeacher:
        return TopKTeacher(torch.cat([v.indices for v in values]).to(device, torch.long),
                           torch.cat([v.logprobs for v in values]).to(device),
                           torch.cat([v.rest for v in values]).to(device), self.temperature)

    def pack(self, values: list[TopKTeacher]) -> dict[str, torch.Tensor]:
        return {"indices": torch.cat([v.indices for v in values]), "logprobs": torch.cat([v.logprobs for v in values]),
                "rest": torch.cat([v.rest for v in values]),
                "tokens": torch.tensor([len(v.rest) for v in values], dtype=torch.long)}

    def unpack(self, stored: dict[str, torch.Tensor]) -> list[TopKTeacher]:
        sizes = stored["tokens"].tolist()
        parts = (stored[name].split(sizes) for name in ("indices", "logprobs", "rest"))
        return [TopKTeacher(i, p, r, self.temperature) for i, p, r in zip(*parts)]


class TeacherCache:
    """The outputs of one teacher, by input row (in `row_format`); a context manager that writes the new rows
    when it closes."""

    def __init__(self, folder: Path, row_format: RowFormat | None = None) -> None:
        self.folder = folder
        self.format = row_format or FullLogits()
        self.rows: dict[bytes, Any] = {}
        self.new: dict[bytes, Any] = {}
        self.hits = self.misses = 0
        self._counted = self._hits_counted = 0  # hits + misses and hits at the last take_hit_rate()
        for shard in sorted(folder.glob("rows-*.safetensors")):
            stored = load_file(shard)
            self.rows.update(zip(map(bytes, stored["keys"].numpy()), self.format.unpack(stored)))

    def logits(self, teacher: BackendModel, inputs: dict[str, torch.Tensor]) -> Any:
        """The teacher's output for the batch `inputs`: cached rows, and a no-grad forward of the others."""
        keys = row_keys(inputs)
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                if len(missing) == len(keys):
                    computed = teacher(inputs)
                else:
                    computed = teacher({name: tensor[missing] for name, tensor in inputs.items()})
            for i, row in zip(missing, self.format.split(computed, len(missing))):
                self.rows[keys[i]] = self.new[keys[i]] = row
        # Always from the rows, a new batch too: a cold run then reads what a warm one will.
        result = self.format.join([self.rows[key] for key in keys], next(iter(inputs.values())).device)
        if len(self.new) >= FLUSH_ROWS:
            self.save()
        return result

    def take_hit_rate(self) -> float:
        """The share of rows found in the cache since the last call (a step's, when called once a step)."""
        looked_up = self.hits + self.misses - self._counted
        rate = (self.hits - self._hits_counted) / looked_up if looked_up else 0.0
        self._counted, self._hits_counted = self.hits + self.misses, self.hits
        return rate

    def save(self) -> None:
        """Write the rows added since the last save as a new shard (atomically: a reader never sees half)."""
        if not self.new:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"rows-{uuid.uuid4().hex}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        keys = torch.tensor([list(key) for key in self.new], dtype=torch.uint8)
        save_file({"keys": keys, **self.format.pack(list(self.new.values()))}, str(tmp))
        os.replace(tmp, self.folder / name)
        self.new = {}

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.save()


def cache_root(cfg: Config | LMConfig) -> Path:
    return Path(cfg.teacher_cache.dir) if cfg.teacher_cache.dir else Path(cfg.output_dir) / "teacher_cache"


def open_teacher_cache(cfg: Config | LMConfig, method: Method, teacher: nn.Module | None,
                       row_format: RowFormat | None = None) -> TeacherCache | None:
    """The cache of `teacher` when `teacher_cache.enabled` and `method` runs it frozen: KD always, MetaDistil for
    its first `meta.frozen_steps` steps (after the first meta-update the teacher is another model)."""
    frozen_phase = method.uses_teacher and (not method.trains_teacher or cfg.meta.frozen_steps > 0)
    if not (cfg.teacher_cache.enabled and frozen_phase and teacher is not None):
        return None
    device_type = next(teacher.parameters()).device.type
    row_format = row_format or FullLogits()
    return TeacherCache(cache_root(cfg) / (teacher_fingerprint(teacher, device_type) + row_format.tag), row_format)


def frozen_teacher_logits(teacher: BackendModel, inputs: dict[str, torch.Tensor],
                          cache: TeacherCache | None = None) -> Any:
    """The frozen teacher's logits for a batch (a causal LM's HeadLogits, or its cached TopKTeacher): from
    `cache` when given, else a no-grad forward."""
    if cache is not None:
        return cache.logits(teacher, inputs)
    with torch.no_grad():
        return teacher(inputs)
