"""Multi-process entry: the `metadistil-scale` CLI in every rank, under the deepspeed launcher or torchrun.

    deepspeed --num_gpus 8 --module metadistil_scale.launch.deepspeed_train train --config recipe.yaml \\
        --deepspeed-teacher ds_configs/zero3_bf16.json --deepspeed-student ds_configs/zero2_bf16.json
    torchrun --nproc_per_node 8 -m metadistil_scale.launch.deepspeed_train train --config recipe.yaml \\
        --deepspeed-teacher ds_configs/zero3_bf16.json --deepspeed-student ds_configs/zero2_bf16.json

Without --deepspeed-* configs the models use the torch backend, data-parallel over the ranks (gradients summed
by hand, as torch DDP would). Every rank runs the same job on its slice of each global batch; rank 0 alone
logs, shows progress and writes the shared files. The output folder must be one that every rank sees.
"""

from __future__ import annotations

import os
import sys


def strip_local_rank(argv: list[str]) -> list[str]:
    """Drop the --local_rank=N the deepspeed launcher appends (torchrun exports LOCAL_RANK instead)."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank"):
            os.environ.setdefault("LOCAL_RANK", next(args))
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in this rank; returns the code the launcher should see. An exception propagates, so the
    launcher reports this rank as failed and stops the others (a barrier here could wait on a peer that is
    inside another collective)."""
    from metadistil_scale import cli
    from metadistil_scale.backends import dist
    from metadistil_scale.trainer import PLANNED_STOP_EXIT

    argv = strip_local_rank(sys.argv[1:] if argv is None else argv)
    # Join the group before anything else runs; DeepSpeed's initialiser serves both backends (NCCL on GPUs,
    # gloo on CPUs).
    dist.init_distributed(use_deepspeed=True)
    code = cli.main(argv)
    # A planned --stop-after is a success for the launcher: torchrun and deepspeed report any other code as a
    # crashed rank (ChildFailedError and a traceback). The printed line says where the run stopped.
    return 0 if code == PLANNED_STOP_EXIT else code


if __name__ == "__main__":
    from metadistil_scale.backends import dist

    dist.exit_process(main())
