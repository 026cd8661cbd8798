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
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

if TYPE_CHECKING:
    from metadistil_scale.backends.base import BackendModel
    from metadistil_scale.config import Config
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


class TeacherCache:
    """The logits of one teacher, by input row; a context manager that writes the new rows when it closes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows: dict[bytes, torch.Tensor] = {}
        self.new: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0
        self._counted = self._hits_counted = 0  # hits + misses and hits at the last take_hit_rate()
        for shard in sorted(folder.glob("rows-*.safetensors")):
            stored = load_file(shard)
            self.rows.update(zip(map(bytes, stored["keys"].numpy()), stored["logits"]))

    def logits(self, teacher: BackendModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's logits for the batch `inputs`: cached rows, and a no-grad forward of the others."""
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
            for i, row in zip(missing, computed.detach().cpu()):
                self.rows[keys[i]] = self.new[keys[i]] = row.clone()
        if missing and len(missing) == len(keys):  # a batch of new rows: the forward's own output
            result = computed
        else:
            result = torch.stack([self.rows[key] for key in keys]).to(next(iter(inputs.values())).device)
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
        save_file({"keys": keys, "logits": torch.stack(list(self.new.values())).contiguous()}, str(tmp))
        os.replace(tmp, self.folder / name)
        self.new = {}

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.save()


def cache_root(cfg: Config) -> Path:
    return Path(cfg.teacher_cache.dir) if cfg.teacher_cache.dir else Path(cfg.output_dir) / "teacher_cache"


def open_teacher_cache(cfg: Config, method: Method, teacher: nn.Module | None) -> TeacherCache | None:
    """The cache of `teacher` when `teacher_cache.enabled` and `method` runs it frozen: KD always, MetaDistil for
    its first `meta.frozen_steps` steps (after the first meta-update the teacher is another model)."""
    frozen_phase = method.uses_teacher and (not method.trains_teacher or cfg.meta.frozen_steps > 0)
    if not (cfg.teacher_cache.enabled and frozen_phase and teacher is not None):
        return None
    device_type = next(teacher.parameters()).device.type
    return TeacherCache(cache_root(cfg) / teacher_fingerprint(teacher, device_type))


def frozen_teacher_logits(teacher: BackendModel, inputs: dict[str, torch.Tensor],
                          cache: TeacherCache | None = None) -> torch.Tensor:
    """The frozen teacher's logits for a batch: from `cache` when given, else a no-grad forward."""
    if cache is not None:
        return cache.logits(teacher, inputs)
    with torch.no_grad():
        return teacher(inputs)
