"""Fault injection for tests/test_ray.py: the Ray entry point whose last worker kills itself (SIGKILL) once.

    ray job submit ... --runtime-env-json '{"env_vars": {"METADISTIL_RAY_KILL_ONCE": MARKER}}' -- \\
        python -m tests._ray_faults [the arguments of metadistil_scale.launch.ray_job]

While MARKER does not exist, the last rank creates it and kills itself right after the first checkpoint it
reports, once Ray Train has registered that checkpoint. Everything else is the production entry point.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from metadistil_scale.launch import ray_job

KILL_ONCE_ENV = "METADISTIL_RAY_KILL_ONCE"


class KillOnceReporter(ray_job.Reporter):
    def __call__(self, stage: str, path: Path, record: dict[str, Any]) -> None:
        super().__call__(stage, path, record)
        marker = os.environ.get(KILL_ONCE_ENV)
        if not marker or self.rank != self.world - 1 or Path(marker).exists():
            return
        import ray.train

        # Only once Ray Train holds the checkpoint just reported (registration trails the report).
        ray.train.get_all_reported_checkpoints(timeout_s=300)
        Path(marker).write_text(f"{stage} {record['step']}\n")
        ray_job.say(f"[ray] {KILL_ONCE_ENV}: rank {self.rank} (pid {os.getpid()}) kills itself after the checkpoint "
                    f"at {stage} step {record['step']}")
        os.kill(os.getpid(), signal.SIGKILL)


def train_worker(loop: dict[str, Any]) -> None:
    ray_job.train_worker(loop, KillOnceReporter)


if __name__ == "__main__":
    # The workers import the worker function by this module's name, not __main__'s.
    from tests._ray_faults import train_worker as worker

    sys.exit(ray_job.main(sys.argv[1:], worker))
