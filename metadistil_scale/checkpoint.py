"""Checkpoints: written atomically, verified before use, holding tensors and plain data only.

Atomic: files are written beside their target (`.<name>.tmp-<pid>`) and moved into place with os.replace;
folders are written to a temporary sibling and swapped in, so an interrupted write leaves the previous
checkpoint intact. A writer killed mid-write leaves its temporary behind: remove_stale_temps() clears those.

Verified: torch.save's zip container records a CRC-32 of each of its records (the pickle and every tensor's
bytes), which torch.load never checks; load_checkpoint() checks them first, so a corrupted file is refused
instead of resuming into garbage. The checksum lives in the file it covers, so one os.replace still commits a
checkpoint whole. A checkpoint folder of several files carries a manifest (size and SHA-256 of each file).

Safe: load_checkpoint() unpickles with torch's weights-only unpickler (tensors, containers, numbers, strings),
so a crafted file cannot run code; what is saved keeps to those types (the RNG states are converted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

MANIFEST = "manifest.json"
# What atomic_save and atomic_dir leave when killed: `.<name>.tmp-<pid>`, `.<name>.old-<pid>`.
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupted, unsafe, or from another configuration."""


# ---------------------------------------------------------------- writing


def _temp(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file with `write(file)` beside `path`, flush it to disk, then move it into place."""
    tmp = _temp(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save, atomically, with the CRC-32s that load_checkpoint verifies (whatever the process-wide option)."""
    recorded = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)
    try:
        atomic_write(path, lambda fh: torch.save(obj, fh))
    finally:
        torch.serialization.set_crc32_options(recorded)


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_copy(source: Path, path: Path) -> None:
    with open(source, "rb") as src:
        atomic_write(path, lambda fh: shutil.copyfileobj(src, fh, 1 << 20))


def atomic_dir(path: Path, write: Callable[[Path], None]) -> None:
    """Write a folder with `write(tmp_folder)`, then swap it in for `path`."""
    tmp, old = _temp(path), _temp(path, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: Path) -> list[tuple[Path, int]]:
    """Clear what writers killed mid-write left in `folder`: temporaries whose process is no longer running.
    A folder swap killed between its two renames left the previous folder as `.<name>.old-<pid>` and nothing
    at `<name>`: that one is put back. Returns the (path, bytes) removed.

    Pids are this machine's: call it where no other machine writes into `folder` at the same time (rank 0 of
    a run, at a stage's start)."""
    removed: list[tuple[Path, int]] = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        match = TEMP_NAME.fullmatch(entry.name)
        if match is None or _alive(int(match["pid"])):
            continue
        target = folder / match["name"]
        if match["kind"] == "old" and not target.exists():
            os.replace(entry, target)
            continue
        is_dir = entry.is_dir() and not entry.is_symlink()
        files = [p for p in entry.rglob("*") if p.is_file()] if is_dir else [entry]
        size = sum(p.lstat().st_size for p in files)
        if is_dir:
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append((entry, size))
    return removed


# ---------------------------------------------------------------- verifying and loading


def verify_file(path: Path) -> None:
    """Check every record of a torch.save file against the CRC-32 saved with it (CheckpointError if not)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # not a zip, truncated, a damaged directory: the same answer
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {_first_line(err)})") from err
    if bad is not None:
        raise CheckpointError(f"{path} is corrupted: its record {bad} does not match the CRC-32 saved with it; "
                              "resume from an intact copy, or delete it to restart the stage")


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), "")


def _refusal(err: pickle.UnpicklingError) -> str:
    """One line for torch's many-line weights-only refusal."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
    what = f"refers to {found[1]}" if found else "holds Python objects"
    return (f"{what}, where a checkpoint holds only tensors and plain data: refused, since loading it could "
            "run code")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file, verified, through torch's weights-only unpickler."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    verify_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} {_refusal(err)}") from err
    except Exception as err:  # a foreign file: say which
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {_first_line(err)})") from err


@contextlib.contextmanager
def weights_only_loads(where: Path, allowed: list[Any]) -> Iterator[None]:
    """Every torch.load in the block unpickles tensors, plain data and the `allowed` classes only, whatever its
    caller asks for (DeepSpeed loads its checkpoints with weights_only=False); a refusal names `where`."""
    forced = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.pop(name, None) for name in forced}
    os.environ[forced[0]] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"a file in {where} {_refusal(err)}") from err
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


# ---------------------------------------------------------------- folders: a manifest of sizes and SHA-256s


def folder_files(folder: Path) -> list[str]:
    """The files under `folder` (relative, sorted), but its manifest."""
    files = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(name for name in files if name != MANIFEST)


def file_digest(path: Path) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def write_manifest(folder: Path, digests: dict[str, dict[str, Any]] | None = None) -> None:
    """Record the size and SHA-256 of every file in `folder` (computed here unless given) in its manifest."""
    if digests is None:
        digests = {name: file_digest(folder / name) for name in folder_files(folder)}
    atomic_write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n", folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST} (the sizes and checksums of its files): it is incomplete "
                              "or was written before checkpoints carried one")
    try:
        manifest = json.loads(path.read_text())
        for name, entry in manifest.items():
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ValueError(f"{name!r} is not a path inside the folder")
            if not (isinstance(entry["size"], int) and isinstance(entry["sha256"], str)):
                raise ValueError(f"{name}: no size and sha256")
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a readable manifest ({_first_line(err)})") from err
    return manifest


def verify_folder(folder: Path, rank: int = 0, world: int = 1) -> None:
    """Check the files of a checkpoint folder against its manifest: all of them, or share `rank` of `world`."""
    manifest = read_manifest(folder)
    for name in sorted(manifest)[rank::world]:
        path, entry = folder / name, manifest[name]
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {folder / MANIFEST} lists it")
        if path.stat().st_size != entry["size"] or file_digest(path)["sha256"] != entry["sha256"]:
            raise CheckpointError(f"{path} is corrupted: its size or SHA-256 differs from {folder / MANIFEST}; "
                                  "resume from an intact copy, or delete the checkpoint to restart the stage")


def fingerprint_differences(saved: dict[str, Any], expected: dict[str, Any],
                            defaults: dict[str, Any] | None = None) -> list[str]:
    """The dotted keys on which two stage fingerprints differ.

    A key the saved fingerprint lacks was written by a version without that option, which behaved as the option's
    default does (a new option defaults to the behaviour from before it). So it is no difference when its value now
    is its default in `defaults` (the fingerprint of a default config), or, for a key `defaults` does not name,
    when it is off (null, false, empty). Adding an option therefore keeps finished runs reusable and checkpoints
    resumable, and a run that now sets it otherwise is refused."""
    saved, now, default = _flatten(saved), _flatten(expected), _flatten(defaults or {})

    def as_before(key: str) -> bool:
        if key in default:
            return now[key] == default[key]
        return now[key] is None or now[key] is False or now[key] == [] or now[key] == {}

    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and not (k not in saved
                  and as_before(k)))


def check_fingerprint(state: dict[str, Any], expected: dict[str, Any], path: Path,
                      defaults: dict[str, Any] | None = None) -> None:
    """Refuse a checkpoint written under another configuration, naming the keys that differ."""
    saved, now = _flatten(state.get("config", {})), _flatten(expected)
    differing = fingerprint_differences(state.get("config", {}), expected, defaults)
    if differing:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in differing[:5])
        more = f" and {len(differing) - 5} more" if len(differing) > 5 else ""
        raise CheckpointError(f"{path} was written by another configuration ({details}{more})")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: a refusal names the dotted config key, not a whole section."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain data (numpy's key array as a list)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    numpy = {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], np.array(numpy["keys"], dtype=np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
