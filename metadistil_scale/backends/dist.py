"""Data-parallel plumbing shared by both backends: the process group, who this rank is, and collectives on
tensors and Python values. Every helper is a no-op (or the identity) in a single process, so the trainer reads
the same with one rank or many.

Ranks come from torchrun or the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as torch_dist

from metadistil_scale.config import ConfigError


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that logs, shows progress and writes shared files."""
    return rank() == 0


def launched() -> bool:
    """True under torchrun or the deepspeed launcher (which export WORLD_SIZE to every rank)."""
    return "WORLD_SIZE" in os.environ


def init_distributed(use_deepspeed: bool) -> None:
    """Join the process group the launcher set up. DeepSpeed also wants a group in a single process: there
    one is made here (world size 1 on a free local port), so `metadistil-scale train` needs no launcher."""
    if is_initialized():
        return
    if use_deepspeed and not launched():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not launched():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if use_deepspeed:
        import logging

        import deepspeed

        # DeepSpeed logs each engine's whole configuration at INFO, on every rank.
        deepspeed.utils.logger.setLevel(logging.WARNING)
        deepspeed.init_distributed()
        release_shm_buffer()
    else:
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def shm_buffer_path(rank_: int) -> Path:
    """Where DeepSpeed's CPU all-reduce keeps rank `rank_`'s buffer (its naming in
    deepspeed/ops/csrc/cpu/comm/shm.cpp: user id, MASTER_ADDR, MASTER_PORT, rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank_}"


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed shared-memory buffer once every rank has mapped every buffer.

    With all ranks on one machine under the deepspeed launcher (LOCAL_SIZE = world size), DeepSpeed's CPU
    all-reduce creates one 69 MB /dev/shm file per rank and never unlinks it: each launch, finished or killed,
    leaves world size × 69 MB of memory behind. init_distributed returns only after this rank has mapped all its
    peers' files, so after a barrier the names can go: the mappings stay valid, and the memory is freed when the
    last process of the launch ends, however it ends."""
    if world_size() < 2:
        return
    torch_dist.barrier()
    shm_buffer_path(rank()).unlink(missing_ok=True)


def destroy() -> None:
    if is_initialized():
        # Tear down together: a rank that leaves while its peer is still in a collective or writing results
        # can abort in gloo's background threads ("terminate called without an active exception").
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a launched worker process: after a success, tear the group down together (`destroy`); then run the
    exit handlers (loggers, trackers), flush, and leave without interpreter finalization.

    Why not a plain return: destroy_process_group does not stop gloo's worker threads (the process group lives
    on while DeepSpeed's engines hold it), and such a thread may still hold the last reference to a finished
    collective, whose tensors' Python objects it must release under the GIL. Once the interpreter is finalizing,
    a thread that asks for the GIL is made to exit, and unwinding a gloo thread ends in std::terminate: a SIGABRT
    ("terminate called without an active exception") after all the work was done, seen in about one of three
    2-rank CPU launches. Skipping finalization removes the race; everything worth keeping was written before.
    A failed rank skips the barrier, since its peers may be inside another collective: the launcher stops them.
    """
    if code == 0:
        destroy()
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comm_device() -> torch.device:
    """Where scalar collectives live: NCCL only moves CUDA tensors."""
    if is_initialized() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------- collectives


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum tensors over ranks in place, one flat all-reduce per dtype and device instead of one per tensor."""
    if not is_initialized() or not tensors:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        torch_dist.all_reduce(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_sum(value: float) -> float:
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    torch_dist.all_reduce(t)
    return float(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value on every rank (e.g. its evaluation, so that all ranks take the same decisions)."""
    if not is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- the data-parallel split


def local_batch(batch_size: int, micro_batch_size: int | None, key: str) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) of one rank for a global batch: global = micro × ranks × accumulation.
    Raises ConfigError naming `key` when the batch does not split evenly."""
    world = world_size()
    if batch_size % world:
        raise ConfigError(f"{key}.batch_size={batch_size} is not divisible by the {world} data-parallel ranks")
    local = batch_size // world
    micro = micro_batch_size or local
    if local % micro:
        raise ConfigError(
            f"{key}.micro_batch_size={micro_batch_size} does not divide the per-rank batch "
            f"{batch_size}/{world}={local}"
        )
    return micro, local // micro
