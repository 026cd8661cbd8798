"""How often does a 2-rank DeepSpeed CPU launch end in an abort after its work is done?

Launches the two-rank causal-LM worker of the test suite (teacher ZeRO-3, student ZeRO-2, gloo) N times under
torchrun and counts the launches whose exit status is not 0, and among them those where a rank printed
"terminate called without an active exception" (the gloo-thread abort at interpreter exit that
`dist.exit_process` removes). To compare with the worker of an earlier commit:

    git show <commit>:tests/lm_deepspeed_worker.py > /tmp/worker_before.py
    python benchmarks/launch_exits.py --worker /tmp/worker_before.py --json before.json
    python benchmarks/launch_exits.py --json after.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "lm_deepspeed_worker.py"
ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: Path, out: Path) -> dict[str, object]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(worker), str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return {"returncode": proc.returncode, "aborted": ABORT in proc.stderr,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", type=int, default=20)
    parser.add_argument("--worker", type=Path, default=WORKER, help="the worker script to launch")
    parser.add_argument("--json", type=Path, help="write every launch's result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="launch-exits-") as folder:
        runs = [launch(args.worker, Path(folder) / f"ranks_{i}.pt")
                for i in tqdm(range(args.launches), desc="launches")]
    failed = sum(r["returncode"] != 0 for r in runs)
    aborted = sum(bool(r["aborted"]) for r in runs)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    summary = {"commit": commit, "worker": args.worker.name, "launches": len(runs), "failed": failed,
               "aborted": aborted, "runs": runs}
    print(f"| commit | worker | launches | failed | of which gloo aborts |\n|---|---|---|---|---|\n"
          f"| {commit} | {args.worker.name} | {len(runs)} | {failed} | {aborted} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
