"""A training stage's resumable checkpoint, for either backend and any number of ranks.

All-torch runs keep one file, `last.pt`: both models with their optimizers and schedules, the trainer's state
(step, best) and the RNG. When an engine is DeepSpeed's its optimizer state is sharded over the ranks, so the
checkpoint is a folder written through DeepSpeed's own save/load:

    last/latest                       tag of the newest complete checkpoint, replaced atomically, last
    last/step-00000040/student/       one folder per model: DeepSpeed's engine checkpoint (or model.pt)
    last/step-00000040/teacher/
    last/step-00000040/trainer.pt     config fingerprint, trainer state, every rank's RNG, world size, stages

A crash while saving leaves `latest` naming the previous complete checkpoint. Save and load are collective:
every rank calls them, and only rank 0 writes the shared files.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from metadistil_scale.backends import dist
from metadistil_scale.checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    check_fingerprint,
    load_checkpoint,
    rng_state,
    set_rng_state,
)


def _zero_stage(model: Any) -> int | None:
    return getattr(model, "zero_stage", None)


class StageCheckpoint:
    """The `last` checkpoint of one stage in `out_dir`; `models` maps names ("student", "teacher") to backend
    models (TorchModel or DeepSpeedModel)."""

    def __init__(self, out_dir: Path, fingerprint: dict[str, Any], models: dict[str, Any]) -> None:
        self.fingerprint, self.models = fingerprint, models
        self.sharded = any(_zero_stage(m) is not None for m in models.values())
        self.path = out_dir / ("last" if self.sharded else "last.pt")

    def exists(self) -> bool:
        return (self.path / "latest").is_file() if self.sharded else self.path.is_file()

    def save(self, state: dict[str, Any]) -> None:
        if self.sharded:
            self._save_folder(state)
        else:
            self._save_file(state)

    def load(self) -> dict[str, Any]:
        """Restore the models, the optimizers and this rank's RNG; returns the trainer's state."""
        return self._load_folder() if self.sharded else self._load_file()

    # -- one file (torch backend: the same weights on every rank)
    def _save_file(self, state: dict[str, Any]) -> None:
        rngs = dist.all_gather_object(rng_state())
        if dist.is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            ckpt = {"config": self.fingerprint, "state": state, "rng": rngs[0]}
            if len(rngs) > 1:
                ckpt["rng_ranks"] = rngs
            ckpt.update({name: model.state_dict() for name, model in self.models.items()})
            atomic_save(ckpt, self.path)
        dist.barrier()

    def _load_file(self) -> dict[str, Any]:
        ckpt = load_checkpoint(self.path)
        check_fingerprint(ckpt, self.fingerprint, self.path)
        for name, model in self.models.items():
            if name in ckpt:
                model.load_state_dict(ckpt[name])
        ranks = ckpt.get("rng_ranks", [])
        set_rng_state(ranks[dist.rank()] if len(ranks) == dist.world_size() else ckpt["rng"])
        return ckpt["state"]

    # -- a folder through DeepSpeed's save/load
    def _stages(self) -> dict[str, int | None]:
        return {name: _zero_stage(model) for name, model in self.models.items()}

    def _save_folder(self, state: dict[str, Any]) -> None:
        tag = f"step-{state['step']:08d}"
        folder = self.path / tag
        rngs = dist.all_gather_object(rng_state())
        if dist.is_main():
            shutil.rmtree(folder, ignore_errors=True)  # the remains of an interrupted save of this step
            folder.mkdir(parents=True)
        dist.barrier()
        for name, model in self.models.items():
            model.save_checkpoint(folder / name)
        if dist.is_main():
            atomic_save({"config": self.fingerprint, "state": state, "rng": rngs, "world_size": len(rngs),
                         "zero_stages": self._stages()}, folder / "trainer.pt")
        dist.barrier()  # every rank's shards are on disk before `latest` names them
        if dist.is_main():
            atomic_write_text(tag + "\n", self.path / "latest")
            for old in self.path.glob("step-*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def _load_folder(self) -> dict[str, Any]:
        folder = self.path / (self.path / "latest").read_text().strip()
        ckpt = load_checkpoint(folder / "trainer.pt")
        check_fingerprint(ckpt, self.fingerprint, folder)
        if ckpt["world_size"] != dist.world_size():
            raise CheckpointError(
                f"{folder} was written by {ckpt['world_size']} ranks and this run has {dist.world_size()}: "
                "resume with the same number of ranks"
            )
        if ckpt["zero_stages"] != self._stages():
            raise CheckpointError(
                f"{folder} was written with ZeRO stages {ckpt['zero_stages']} and this run uses {self._stages()}: "
                "resume with the same DeepSpeed configs"
            )
        for name, model in self.models.items():
            model.load_checkpoint(folder / name)
        set_rng_state(ckpt["rng"][dist.rank()])
        return ckpt["state"]
