"""A rank under the deepspeed launcher: joins the group, all-reduces through DeepSpeed's shared-memory op, and
writes what it saw (the sum, and which ranks' /dev/shm buffers still have names) to <out>/rank<r>.json
(<out> comes last: the launcher puts --local_rank first)."""

import json
import sys
from pathlib import Path

import torch

from metadistil_scale.backends import dist

dist.init_distributed(use_deepspeed=True)
import deepspeed.comm as ds_comm  # noqa: E402  (after init: the launcher's environment is read there)

rank, world = dist.rank(), dist.world_size()
values = torch.full((1000,), float(rank + 1))
ds_comm.inference_all_reduce(values)  # DeepSpeed's shared-memory path when all ranks are local
named = [r for r in range(world) if dist.shm_buffer_path(r).exists()]
Path(sys.argv[-1], f"rank{rank}.json").write_text(json.dumps({"sum": values.tolist()[:3], "named": named}))
dist.exit_process(0)
