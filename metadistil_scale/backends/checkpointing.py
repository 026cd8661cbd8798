"""A training stage's resumable checkpoint, for either backend and any number of ranks.

All-torch runs keep one file, `last.pt`: both models with their optimizers and schedules, the trainer's state
(step, best) and the RNG. When an engine is DeepSpeed's its optimizer state is sharded over the ranks, so the
checkpoint is a folder written through DeepSpeed's own save/load:

    last/latest                       tag of the newest complete checkpoint, replaced atomically, last
    last/step-00000040/student/       one folder per model: DeepSpeed's engine checkpoint (or model.pt)
    last/step-00000040/teacher/
    last/step-00000040/trainer.pt     config fingerprint, trainer state, every rank's RNG, world size, stages
    last/step-00000040/manifest.json  size and SHA-256 of every file above, written once they are all on disk

A crash while saving leaves `latest` naming the previous complete checkpoint. Save and load are collective:
every rank calls them, and only rank 0 writes the shared files. The ranks share the hashing: each digests (on
save) and verifies (on load) its share of the files, so a corrupted file is refused on every rank alike before
any of it is loaded. (The folder must be one every rank sees, as the checkpoint's layout already requires.)

Both formats are loaded with torch's weights-only unpickler, DeepSpeed's own files included (checkpoint.py).

What the checks leave open. The manifest catches corruption, not tampering (whoever can write the folder can
rewrite it); what stops a planted file is the weights-only loading. DeepSpeed asks torch.load for
weights_only=False; weights_only_loads() overrides that for the duration of the engine's load_checkpoint only
(TORCH_FORCE_WEIGHTS_ONLY_LOAD), allowing four of DeepSpeed's classes (deepspeed_checkpoint_classes): a
DeepSpeed release that pickles other classes is refused, naming them, until they are added there. The folder
also holds DeepSpeed's copies of its zero_to_fp32.py and zero_to_torch.py scripts: nothing here runs them, and
on a folder from elsewhere use the installed deepspeed's scripts, not those.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from metadistil_scale.backends import dist
from metadistil_scale.backends.base import BackendModel
from metadistil_scale.checkpoint import (
    CheckpointError,
    atomic_copy,
    atomic_dir,
    atomic_save,
    atomic_write_text,
    check_fingerprint,
    file_digest,
    folder_files,
    load_checkpoint,
    remove_stale_temps,
    rng_state,
    set_rng_state,
    verify_folder,
    write_manifest,
)

TAG = re.compile(r"step-\d{8}")


class StageCheckpoint:
    """The `last` checkpoint of one stage in `out_dir`; `models` maps names ("student", "teacher") to backend
    models. One model whose state is per rank (`sharded_checkpoint`) makes it a folder."""

    def __init__(self, out_dir: Path, fingerprint: dict[str, Any], models: dict[str, BackendModel],
                 defaults: dict[str, Any] | None = None) -> None:
        # defaults: the fingerprint of a default config, for options newer than a checkpoint (fingerprint_differences)
        self.fingerprint, self.models, self.defaults = fingerprint, models, defaults
        self.sharded = any(m.sharded_checkpoint for m in models.values())
        self.path = out_dir / ("last" if self.sharded else "last.pt")
        if dist.is_main():  # a stage starts: nothing of this run writes here yet
            removed = [entry for folder in (out_dir, out_dir / "last") for entry in remove_stale_temps(folder)]
            if removed:
                megabytes = sum(size for _, size in removed) / 1e6
                print(f"[checkpoint] removed {len(removed)} temporaries of interrupted writes ({megabytes:.1f} MB): "
                      + ", ".join(str(path) for path, _ in removed))

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
        check_fingerprint(ckpt, self.fingerprint, self.path, self.defaults)
        for name, model in self.models.items():
            if name in ckpt:
                model.load_state_dict(ckpt[name])
        ranks = ckpt.get("rng_ranks", [])
        set_rng_state(ranks[dist.rank()] if len(ranks) == dist.world_size() else ckpt["rng"])
        return ckpt["state"]

    # -- a folder through DeepSpeed's save/load
    def _stages(self) -> dict[str, int | None]:
        return {name: model.zero_stage for name, model in self.models.items()}

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
        dist.barrier()  # every rank's shards are on disk before they are digested and `latest` names them
        names = dist.broadcast_object(folder_files(folder) if dist.is_main() else None)
        mine = names[dist.rank()::dist.world_size()]  # the share verify_folder gives this rank on load
        shares = dist.all_gather_object({name: file_digest(folder / name) for name in mine})
        if dist.is_main():
            write_manifest(folder, {name: digest for share in shares for name, digest in share.items()})
            atomic_write_text(tag + "\n", self.path / "latest")
            for old in self.path.glob("step-*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def _verify(self, folder: Path) -> None:
        """verify_folder, each rank its share; every rank raises the first problem any rank found."""
        try:
            verify_folder(folder, dist.rank(), dist.world_size())
            problem = None
        except (CheckpointError, OSError) as err:  # every rank must reach the gather below
            problem = str(err)
        problems = [p for p in dist.all_gather_object(problem) if p is not None]
        if problems:
            raise CheckpointError(problems[0])

    def _load_folder(self) -> dict[str, Any]:
        folder = latest_folder(self.path)
        self._verify(folder)
        ckpt = load_checkpoint(folder / "trainer.pt")
        check_fingerprint(ckpt, self.fingerprint, folder, self.defaults)
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


def latest_folder(path: Path) -> Path:
    """The step folder that `path/latest` names (CheckpointError when it names none)."""
    tag = (path / "latest").read_text(errors="replace").strip()
    if not TAG.fullmatch(tag) or not (path / tag).is_dir():
        raise CheckpointError(f"{path / 'latest'} names {tag[:40]!r}, which is not a checkpoint folder in {path}")
    return path / tag


def checkpoint_step(path: Path) -> int | None:
    """The step of the stage checkpoint at `path` (a `last.pt` file or a `last/` folder), verified (checksums,
    weights-only load); None when there is none, CheckpointError when it is unusable."""
    if path.is_dir() and (path / "latest").is_file():
        folder = latest_folder(path)
        verify_folder(folder)
        return int(folder.name.removeprefix("step-"))
    if path.is_file():
        state = load_checkpoint(path).get("state")
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise CheckpointError(f"{path}: not a stage checkpoint (no trainer state)")
        return state["step"]
    return None


def copy_checkpoint(path: Path, target: Path) -> None:
    """Copy the newest complete stage checkpoint at `path` (StageCheckpoint.path) to `target`, in the same
    layout, swapped in whole (a launcher's storage, or back into a run folder)."""
    if path.is_dir():
        folder = latest_folder(path)

        def write(tmp: Path) -> None:
            shutil.copytree(folder, tmp / folder.name)
            shutil.copy2(path / "latest", tmp / "latest")

        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_dir(target, write)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_copy(path, target)
