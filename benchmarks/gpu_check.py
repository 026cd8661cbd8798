"""GPU acceptance check: one command, one report (run it as `bash scripts/gpu_check.sh [options]`).

    bash scripts/gpu_check.sh [--out DIR] [--parts kernels,bench,train,lm] [--no-install]

On a machine without CUDA it prints one line and exits 2 at once (nvidia-smi -L, else the driver's /proc
entry; torch is not imported). Otherwise, from the repository root, in this order:

  install  scripts/bootstrap.sh (it installs the default CUDA torch where nvidia-smi works), then torch must see
           the GPU; its time is reported apart, as it may download gigabytes
  kernels  Triton kd_loss and meta_cotangent against the fp64 references: fp32 and bf16 over the shapes of
           tests/test_kernels.py and N x V up to 8192 x 128256, fp64 on small shapes, the edge cases
           (benchmarks/gpu_kernels.py)
  bench    benchmarks/gpu_kernels.py's benchmark at 4096 x 32000 and 8192 x 128256: Triton vs eager vs
           torch.compile (vs Liger when importable), time, peak memory, fraction of the copy bandwidth
  train    the embedded main job (`metadistil-scale train`: MiniLM teacher, KD and MetaDistil students) for 20
           teacher and 20 student steps in bf16 with the teacher at ZeRO-3 (ds_configs/zero3_bf16.json, the
           student at zero2_bf16.json), under the deepspeed launcher on 1 GPU and in one process at the same
           time; logged losses, dev and test accuracy compared
  lm       one causal-LM MetaDistil step at V = 49152 (a SmolLM2-135M-shaped Llama with random weights, 4096
           tokens): time and peak CUDA memory, chunked and materialised logits, bf16 and fp32

Each part runs in its own process under its own time limit (the checks' limits add up to under 8 minutes); a
part that fails or runs out of time is reported and the next one runs. Everything lands in one folder,
benchmarks/results/gpu_check/<UTC time>/ unless --out says otherwise: report.json, report.md, and each part's
log and raw JSON; a one-screen summary is printed at the end. Exit status 0 when every part passed, 1 otherwise.

Up to the install this file runs under the system Python (only the standard library is imported at the top);
each part runs it again under the project's virtualenv: `python benchmarks/gpu_check.py part NAME --out DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results" / "gpu_check"
NO_CUDA_EXIT = 2
CHECKS_BUDGET_S = 8 * 60  # every part after the install

TRAIN_STEPS = 20
TRAIN_DS_TEACHER = "ds_configs/zero3_bf16.json"
TRAIN_DS_STUDENT = "ds_configs/zero2_bf16.json"
# One rank under the launcher and one process run the same job; bf16 and nondeterministic CUDA reductions let
# them drift apart a little over 20 steps, no more.
TRAIN_LOSS_REL = 2e-2
TRAIN_METRIC_ABS = 0.02

BENCH_SHAPES = [(4096, 32000), (8192, 128256)]
LM_VOCAB = 49152  # SmolLM2's vocabulary
LM_TOKENS = 4096
SHORT_DTYPES = {"bfloat16": "bf16", "float32": "fp32"}


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    title: str
    limit_s: int


PARTS = (
    Part("install", "environment: scripts/bootstrap.sh, torch sees the GPU", 1200),
    Part("kernels", "Triton kernels vs fp64 references", 120),
    Part("bench", "kernel benchmark (benchmarks/gpu_kernels.py)", 120),
    Part("train", f"main job, {TRAIN_STEPS} steps, bf16, ZeRO-3 teacher: deepspeed launcher vs one process", 170),
    Part("lm", f"causal-LM MetaDistil step at V={LM_VOCAB}", 60),
)
PART_NAMES = [p.name for p in PARTS]


# --------------------------------------------------------------------------------------------------
# CUDA detection (no torch import: on a machine without a GPU the command must end within seconds)
# --------------------------------------------------------------------------------------------------


def detect_cuda(nvidia_smi: str = "nvidia-smi", proc_gpus: Path = Path("/proc/driver/nvidia/gpus"),
                timeout_s: float = 3.0) -> tuple[bool, str]:
    """(whether an NVIDIA GPU is usable, what was found): nvidia-smi -L, else the driver's /proc entry."""
    exe = shutil.which(nvidia_smi)
    if exe is not None:
        try:
            proc = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False, f"{nvidia_smi} -L did not answer within {timeout_s:.0f} s"
        gpus = [line.strip() for line in proc.stdout.splitlines() if line.startswith("GPU ")]
        if proc.returncode == 0 and gpus:
            return True, "; ".join(gpus)
        said = (proc.stderr or proc.stdout).strip().splitlines()
        return False, f"{nvidia_smi} -L exited {proc.returncode}" + (f": {said[0]}" if said else ", listing no GPU")
    if proc_gpus.is_dir() and any(proc_gpus.iterdir()):
        return True, f"NVIDIA driver with {len(list(proc_gpus.iterdir()))} GPU(s) in {proc_gpus} (no {nvidia_smi})"
    return False, f"no {nvidia_smi} on PATH and no NVIDIA driver ({proc_gpus})"


# --------------------------------------------------------------------------------------------------
# running the parts
# --------------------------------------------------------------------------------------------------


def skip_reason(part: Part, done: dict[str, dict], venv_python: Path) -> str | None:
    """Why ``part`` cannot run after the outcomes in ``done``, or None. Every part needs a working install."""
    if part.name == "install":
        return None
    install = done.get("install")
    if install is None:
        return "the install part did not run"
    if install["status"] != "passed":
        return f"install {install['status']}"
    if not venv_python.is_file():
        return f"no virtualenv Python at {venv_python}"
    return None


def part_outcome(part: Part, rc: int | None, seconds: float, result: dict | None, log_tail: str) -> dict:
    """Status of one part from its exit status (None: killed at its limit) and the JSON it wrote, if any."""
    if rc is None:
        status = "timeout"
    elif result is None:
        status = "error"
    else:
        status = "passed" if rc == 0 and result.get("ok") else "failed"
    if result is not None and result.get("summary"):
        summary = result["summary"]
    else:
        lines = [line for line in log_tail.splitlines() if line.strip()]
        summary = lines[-1][:300] if lines else f"exit status {rc}, no output"
    if status == "timeout":
        summary = f"stopped at its {part.limit_s} s limit; {summary}"
    return {"name": part.name, "title": part.title, "status": status, "rc": rc, "seconds": round(seconds, 1),
            "limit_s": part.limit_s, "summary": summary, "result": result}


def skipped(part: Part, reason: str) -> dict:
    return {"name": part.name, "title": part.title, "status": "skipped", "rc": None, "seconds": 0.0,
            "limit_s": part.limit_s, "summary": reason, "result": None}


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the part's whole process group (launchers start children), SIGKILL what is left after grace_s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # a leader that ignored SIGTERM, or children that outlived it
    except ProcessLookupError:
        pass
    proc.wait()


def run_part(part: Part, cmd: list[str], out: Path, env: dict[str, str]) -> dict:
    """Run one part's command in its own process group under its limit; log to out/<name>.log."""
    log_path = out / f"{part.name}.log"
    result_path = out / f"{part.name}.json"
    result_path.unlink(missing_ok=True)  # a crash must not report an earlier run's result
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=part.limit_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
    seconds = time.monotonic() - started
    return part_outcome(part, rc, seconds, read_json(result_path), log_path.read_text(errors="replace")[-4000:])


def run_parts(parts, command_for: Callable[[Part], list[str]], out: Path, env: dict[str, str], venv_python: Path,
              selected: set[str], echo: Callable[[str], None] = print) -> list[dict]:
    """Every part in order; a failure is recorded and the next part still runs (unless it needs the install)."""
    done: dict[str, dict] = {}
    for part in parts:
        reason = None if part.name in selected else "not selected (--parts)"
        reason = reason or skip_reason(part, done, venv_python)
        if reason:
            done[part.name] = skipped(part, reason)
        else:
            echo(f"[gpu_check] {part.name}: {part.title} (limit {part.limit_s} s)")
            done[part.name] = run_part(part, command_for(part), out, env)
        o = done[part.name]
        echo(f"[gpu_check] {part.name}: {o['status']} in {o['seconds']:.0f} s: {o['summary']}")
    return list(done.values())


def part_command(part: Part, python: Path, out: Path, bootstrap: bool) -> list[str]:
    run = [str(python), "benchmarks/gpu_check.py", "part", part.name, "--out", str(out), "--limit-s",
           str(part.limit_s)]
    if part.name == "install" and bootstrap:
        return ["bash", "-c", 'bash scripts/bootstrap.sh && exec "$@"', "install", *run]
    return run


def part_env(base: dict[str, str]) -> dict[str, str]:
    """The parts' environment: scripts/env.sh's settings, kernels on the GPU (never the Triton interpreter)."""
    env = dict(base)
    env.pop("TRITON_INTERPRET", None)
    if env.get("DS_ACCELERATOR") == "cpu":
        env.pop("DS_ACCELERATOR")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    info = {"host": socket.gethostname()}
    for key, cmd in (("gpu", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
                     ("commit", ["git", "rev-parse", "--short", "HEAD"]),
                     ("changes", ["git", "status", "--porcelain", "--untracked-files=no"])):  # fmt: skip
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10)
            info[key] = proc.stdout.strip() if proc.returncode == 0 else ""
        except (OSError, subprocess.TimeoutExpired):
            info[key] = ""
    info["changes"] = f"{len(info['changes'].splitlines())} changed tracked files" if info["changes"] else "clean"
    return info


def build_report(started: str, machine: dict[str, str], outcomes: list[dict]) -> dict:
    checks = [o for o in outcomes if o["name"] != "install"]
    return {
        "started": started,
        "machine": machine,
        "passed": all(o["status"] == "passed" for o in outcomes if o["summary"] != "not selected (--parts)"),
        "install_s": sum(o["seconds"] for o in outcomes if o["name"] == "install"),
        "checks_s": round(sum(o["seconds"] for o in checks), 1),
        "checks_limit_s": sum(o["limit_s"] for o in checks),
        "parts": outcomes,
    }


def report_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# GPU acceptance check, {report['started']}",
        "",
        f"{m.get('gpu') or 'GPU unknown'}; host {m.get('host', '?')}; commit {m.get('commit') or '?'} ({m.get('changes')})",
        "",
        f"Overall: **{'passed' if report['passed'] else 'NOT passed'}**. Install {report['install_s']:.0f} s; "
        f"checks {report['checks_s']:.0f} s (limits add up to {report['checks_limit_s']} s).",
        "",
        "| part | status | seconds (limit) | summary |",
        "|---|---|---|---|",
    ]
    for o in report["parts"]:
        lines.append(f"| {o['name']} | {o['status']} | {o['seconds']:.0f} ({o['limit_s']}) | "
                     f"{o['summary'].replace('|', '/')} |")  # fmt: skip
    for o in report["parts"]:
        if o["result"] and o["result"].get("details_md"):
            lines += ["", f"## {o['name']}: {o['title']}", "", o["result"]["details_md"]]
    return "\n".join(lines) + "\n"


def summary_lines(report: dict, width: int = 110) -> list[str]:
    """The one-screen summary printed at the end: one line per part."""
    head = (f"GPU check {'PASSED' if report['passed'] else 'NOT PASSED'}: install {report['install_s']:.0f} s, "
            f"checks {report['checks_s']:.0f} s of {report['checks_limit_s']} s")  # fmt: skip
    lines = [head, f"  {report['machine'].get('gpu') or 'GPU unknown'}"]
    for o in report["parts"]:
        line = f"  {o['name']:8s} {o['status']:8s} {o['seconds']:4.0f} s  {o['summary']}"
        lines.append(line if len(line) <= width else line[: width - 3] + "...")
    return lines


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    write_json(json_path, report)
    md_path.write_text(report_markdown(report))
    return json_path, md_path


# --------------------------------------------------------------------------------------------------
# part: install
# --------------------------------------------------------------------------------------------------


def part_install(out: Path, limit_s: float) -> dict:
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for name in ("triton", "deepspeed", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # a broken install is what this part reports
            info[name] = None
            info[f"{name}_error"] = f"{type(err).__name__}: {err}"
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info["device"] = f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB"
        info["device_count"] = torch.cuda.device_count()
    return install_result(info)


def install_result(info: dict) -> dict:
    missing = [n for n in ("triton", "deepspeed", "transformers") if info.get(n) is None]
    if info["torch_cuda"] is None:
        summary = (f"torch {info['torch']} is a CPU build (a virtualenv made on a machine without a GPU?): "
                   "run with VENV=.venv-gpu for a fresh one")  # fmt: skip
    elif not info["cuda_available"]:
        summary = f"torch {info['torch']} (CUDA {info['torch_cuda']}) sees no GPU: driver too old for this build?"
    elif missing:
        summary = f"cannot import {', '.join(missing)}: " + "; ".join(info.get(f"{n}_error", "") for n in missing)
    else:
        summary = (f"{info['device']}; torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}, "
                   f"deepspeed {info['deepspeed']}")  # fmt: skip
    keys = ("device", "device_count", "python", "torch", "torch_cuda", "triton", "deepspeed", "transformers")
    details = "\n".join(f"- {k}: {info[k]}" for k in keys if k in info)
    return {"ok": bool(info["cuda_available"]) and not missing, "summary": summary, **info, "details_md": details}


# --------------------------------------------------------------------------------------------------
# parts: kernels and bench (benchmarks/gpu_kernels.py)
# --------------------------------------------------------------------------------------------------


def _gpu_kernels():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpu_kernels

    return gpu_kernels


def part_kernels(out: Path, limit_s: float) -> dict:
    gk = _gpu_kernels()
    checks: list[dict] = []

    def record(row: dict) -> None:
        checks.append(row)
        write_json(out / "kernels.json", kernels_result(checks, done=False))

    gk.check_correctness(gk.TEST_SHAPES + gk.LARGE_SHAPES, record)
    return kernels_result(checks, done=True)


def _case(c: dict) -> str:
    if "n" not in c:
        return c["check"]
    return f"{c['check']} {c['n']}x{c['v']} {c['dtype']} {c['soft_loss']}" + (f" {c['reduction']}" if "reduction"
                                                                              in c else "")


def kernels_result(checks: list[dict], done: bool) -> dict:
    failed = [c for c in checks if not c["ok"]]
    worst: dict[str, float] = {}
    for c in checks:
        if "dtype" in c:
            err = max(c.get("grad_err", 0.0), c.get("err", 0.0))
            worst[c["dtype"]] = max(worst.get(c["dtype"], 0.0), err)
    summary = f"{len(checks) - len(failed)}/{len(checks)} checks passed"
    if worst:
        summary += "; worst gradient/cotangent error " + ", ".join(f"{d} {e:.1e}" for d, e in sorted(worst.items()))
    if failed:
        summary += "; FAILED: " + ", ".join(_case(c) for c in failed[:3]) + (" ..." if len(failed) > 3 else "")
    if not done:
        summary += " (incomplete)"
    return {"ok": done and bool(checks) and not failed, "summary": summary, "checks": checks,
            "details_md": kernels_markdown(summary, checks)}


def kernels_markdown(summary: str, checks: list[dict]) -> str:
    failed = [c for c in checks if not c["ok"]]
    lines = [summary + ".", "", "| check | error | tolerance | ok |", "|---|---|---|---|"]
    shown = failed or [c for c in checks if "n" in c and c["n"] * c["v"] >= 8192 * 128256] or checks[:6]
    for c in shown:
        err = c.get("grad_err", c.get("err"))
        tol = c.get("grad_tol", c.get("tol"))
        err_text = f"loss {c['loss_err']:.1e}, grad {err:.1e}" if "loss_err" in c else (
            f"{err:.1e}" if err is not None else c.get("detail", ""))
        tol_text = f"{c['loss_tol']:.0e} / {tol:.0e}" if "loss_tol" in c else (f"{tol:.0e}" if tol else "")
        lines.append(f"| {_case(c)} | {err_text} | {tol_text} | {'yes' if c['ok'] else 'NO'} |")
    lines.append(f"\n{'Failed' if failed else 'Largest'} cases shown; every case is in kernels.json.")
    return "\n".join(lines)


def part_bench(out: Path, limit_s: float) -> dict:
    gk = _gpu_kernels()
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        write_json(out / "bench.json", bench_result(rows, done=False))

    gk.bench(BENCH_SHAPES, record)
    return bench_result(rows, done=True)


def bench_result(rows: list[dict], done: bool) -> dict:
    kd = [r for r in rows if r.get("kind") == "kd_loss"]
    fused = {(r["n"], r["v"]): r for r in kd if r["impl"] == "triton (fused)"}
    ok = done and all(s in fused and "error" not in fused[s] for s in BENCH_SHAPES)
    parts = []
    if kd:
        n, v = max({(r["n"], r["v"]) for r in kd}, key=lambda s: s[0] * s[1])
        cells = []
        for r in kd:
            if (r["n"], r["v"]) == (n, v):
                cells.append(f"{r['impl']} " + (f"{r['ms']:.2f} ms" + (f" ({r['fraction_of_copy']:.2f} of copy bw)"
                                                                       if r["impl"] == "triton (fused)" else "")
                                                if "ms" in r else "error"))  # fmt: skip
        parts.append(f"{n}x{v} bf16 fwd+bwd: " + ", ".join(cells))
    summary = "; ".join(parts) or "no benchmark row"
    if not done:
        summary += " (incomplete)"
    return {"ok": ok, "summary": summary, "rows": rows, "details_md": _gpu_kernels().bench_markdown(rows)}


# --------------------------------------------------------------------------------------------------
# part: train (the main job under the deepspeed launcher and in one process)
# --------------------------------------------------------------------------------------------------


def train_args() -> list[str]:
    """`metadistil-scale` arguments of the run: the embedded main job, shortened, bf16, teacher at ZeRO-3."""
    return ["train", "--set", f"teacher_finetune.max_steps={TRAIN_STEPS}", "--set",
            f"student_train.max_steps={TRAIN_STEPS}", "--set", "device=cuda",
            "--deepspeed-teacher", TRAIN_DS_TEACHER, "--deepspeed-student", TRAIN_DS_STUDENT]  # fmt: skip


def train_commands(python: str, out_launcher: Path, out_one: Path, port: int) -> dict[str, list[str]]:
    return {
        "deepspeed": [python, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(port),
                      "--module", "metadistil_scale.launch.deepspeed_train", *train_args(), "--output-dir",
                      str(out_launcher)],
        "one_process": [python, "-m", "metadistil_scale.cli", *train_args(), "--output-dir", str(out_one)],
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keep_run_files(run_dir: Path, dest: Path) -> None:
    """results.json and each stage's metrics.jsonl (not the checkpoints) into dest."""
    for path in [run_dir / "results.json", *run_dir.glob("*/metrics.jsonl")]:
        if path.is_file():
            target = dest / path.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def part_train(out: Path, limit_s: float) -> dict:
    runs_root = Path(tempfile.mkdtemp(prefix="gpu_check_train_"))
    dirs = {"deepspeed": runs_root / "deepspeed", "one_process": runs_root / "one_process"}
    cmds = train_commands(sys.executable, dirs["deepspeed"], dirs["one_process"], _free_port())
    env = dict(os.environ)
    deadline = time.monotonic() + limit_s - 15  # time left to compare and copy
    procs, codes, seconds = {}, {}, {}
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as logs:
            for name, cmd in cmds.items():  # both at once: one GPU has room for two small jobs
                log = logs.enter_context(open(out / f"train_{name}.log", "w"))
                procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True)
            for name, proc in procs.items():
                try:
                    codes[name] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _kill_group(proc, grace_s=3.0)
                    codes[name] = None
                seconds[name] = round(time.monotonic() - started, 1)
    finally:
        for proc in procs.values():
            if proc.poll() is None:  # an exception above left it running
                _kill_group(proc, grace_s=3.0)
        for name, run_dir in dirs.items():
            keep_run_files(run_dir, out / "train" / name)
        shutil.rmtree(runs_root, ignore_errors=True)
    return train_result(out / "train" / "deepspeed", out / "train" / "one_process", codes, seconds)


def _stage_losses(run: Path) -> dict[str, dict[int, float]]:
    losses = {}
    for path in sorted(run.glob("*/metrics.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        losses[path.parent.name] = {int(r["step"]): float(r["loss"]) for r in records if "loss" in r}
    return losses


def _scores(run: Path) -> tuple[str, dict[str, dict[str, float]]]:
    results = read_json(run / "results.json") or {}
    metric = results.get("metric", "accuracy")
    scores = {}
    for row in results.get("rows", []):
        key = f"{row['model']} {row['method']}"
        scores[key] = {"test": row["test"][metric], **({"best dev": row["best_dev"]} if "best_dev" in row else {})}
    return metric, scores


def compare_runs(a: Path, b: Path, loss_rel: float = TRAIN_LOSS_REL, metric_abs: float = TRAIN_METRIC_ABS
                 ) -> list[dict]:
    """Figure-by-figure comparison of two runs' results.json and metrics.jsonl; a figure one run lacks fails."""
    rows = []
    metric, scores_a = _scores(a)
    _, scores_b = _scores(b)
    for key in sorted(set(scores_a) | set(scores_b)):
        for what in sorted(set(scores_a.get(key, {})) | set(scores_b.get(key, {}))):
            x, y = scores_a.get(key, {}).get(what), scores_b.get(key, {}).get(what)
            ok = x is not None and y is not None and abs(x - y) <= metric_abs
            rows.append({"what": f"{key}: {what} {metric}", "a": x, "b": y, "tol": f"abs {metric_abs}", "ok": ok})
    losses_a, losses_b = _stage_losses(a), _stage_losses(b)
    for stage in sorted(set(losses_a) | set(losses_b)):
        steps = sorted(set(losses_a.get(stage, {})) | set(losses_b.get(stage, {})))
        for step in steps:
            x, y = losses_a.get(stage, {}).get(step), losses_b.get(stage, {}).get(step)
            ok = x is not None and y is not None and abs(x - y) <= loss_rel * max(abs(x), abs(y), 1e-12)
            rows.append({"what": f"{stage}: loss at step {step}", "a": x, "b": y, "tol": f"rel {loss_rel}", "ok": ok})
    return rows


def train_result(launcher: Path, one: Path, codes: dict[str, int | None], seconds: dict[str, float]) -> dict:
    rows = compare_runs(launcher, one)
    problems = [f"{name} {'timed out' if rc is None else f'exited {rc}'}" for name, rc in codes.items() if rc != 0]
    if not rows:
        problems.append("no results to compare")
    bad = [r for r in rows if not r["ok"]]
    summary = (f"{len(rows) - len(bad)}/{len(rows)} figures agree (launcher {seconds.get('deepspeed', 0):.0f} s, "
               f"one process {seconds.get('one_process', 0):.0f} s)")  # fmt: skip
    tests = [r for r in rows if r["what"].startswith("student") and ": test" in r["what"]]
    if tests:
        summary += "; student test " + ", ".join(
            f"{r['what'].split(':')[0].removeprefix('student ')} {_num(r['a'])} / {_num(r['b'])}" for r in tests)
    if problems or bad:
        summary += "; " + "; ".join(problems + [f"differs: {r['what']}" for r in bad[:2]])
    return {"ok": not problems and not bad, "summary": summary, "codes": codes, "seconds": seconds,
            "comparison": rows, "details_md": train_markdown(rows)}


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def train_markdown(rows: list[dict]) -> str:
    lines = [f"`deepspeed --num_gpus 1 --module metadistil_scale.launch.deepspeed_train` vs `metadistil-scale`, "
             f"both `{' '.join(train_args())}`.", "",
             "| figure | deepspeed launcher | one process | tolerance | agree |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['what']} | {_num(r['a'])} | {_num(r['b'])} | {r['tol']} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# part: lm (one causal-LM MetaDistil step)
# --------------------------------------------------------------------------------------------------


def smollm2_shaped_config(vocab: int = LM_VOCAB, layers: int = 30, hidden: int = 576):
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
                       max_position_embeddings=2048, tie_word_embeddings=True, attn_implementation="eager")  # fmt: skip


def measure_lm_step(config, tokens: int, path: str, dtype_name: str, device: str, seq_len: int = 512,
                    timed_steps: int = 2) -> dict:
    """One MetaDistil step (u by JVP, lean schedule, quiz batch of tokens/4) on a teacher and its every-other-
    layer student: seconds per step after a warm-up step, and on CUDA the peak memory."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from metadistil_scale.backends.torch_backend import TorchModel
    from metadistil_scale.config import DistillConfig, MetaConfig, OptimConfig
    from metadistil_scale.lm.models import CausalLMHead, student_from_layers
    from metadistil_scale.meta import MetaDistil

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    with torch.device(device):  # random init on the device: seconds saved per configuration
        teacher = LlamaForCausalLM(config).to(dtype)
    student = student_from_layers(teacher, list(range(0, config.num_hidden_layers, 2)))
    materialize = path == "materialised"
    optim = OptimConfig(lr=1e-4, warmup_ratio=0.0, schedule="constant")
    t = TorchModel(CausalLMHead(teacher, materialize=materialize), optim, 10)
    s = TorchModel(CausalLMHead(student, materialize=materialize), optim, 10)
    meta = MetaDistil(t, s, DistillConfig(alpha=0.5, temperature=2.0),
                      MetaConfig(pilot_lr=1e-4, u_mode="jvp", schedule="lean"))

    def batch(n_tokens: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        rows, length = max(1, n_tokens // seq_len), min(seq_len, n_tokens)
        ids = torch.randint(0, config.vocab_size, (rows, length), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:]
        inputs = {"input_ids": ids.to(device)}
        return {"teacher": inputs, "student": inputs, "labels": labels.reshape(-1).to(device)}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    meta.step([batch(tokens, 0)], [batch(tokens // 4, 1000)])
    sync()
    row = {"vocab": config.vocab_size, "tokens": tokens, "path": path, "dtype": dtype_name,
           "teacher_layers": config.num_hidden_layers, "student_layers": len(range(0, config.num_hidden_layers, 2))}
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for i in range(timed_steps):
        meta.step([batch(tokens, i + 1)], [batch(tokens // 4, 1001 + i)])
    sync()
    row["step_s"] = (time.perf_counter() - start) / timed_steps
    if device.startswith("cuda"):
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["step_added_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
    return row


def part_lm(out: Path, limit_s: float) -> dict:
    import torch

    rows: list[dict] = []
    for dtype_name in ("bfloat16", "float32"):
        for path in ("chunked", "materialised"):
            try:
                rows.append(measure_lm_step(smollm2_shaped_config(), LM_TOKENS, path, dtype_name, "cuda"))
            except Exception as err:  # e.g. OOM: that configuration only
                rows.append({"vocab": LM_VOCAB, "tokens": LM_TOKENS, "path": path, "dtype": dtype_name,
                             "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"})
            torch.cuda.empty_cache()
            write_json(out / "lm.json", lm_result(rows, done=False))
    return lm_result(rows, done=True)


def lm_result(rows: list[dict], done: bool) -> dict:
    cells = []
    for r in rows:
        what = f"{SHORT_DTYPES.get(r['dtype'], r['dtype'])} {r['path']}"
        cells.append(f"{what} error" if "error" in r else
                     f"{what} {r['step_s']:.2f} s" + (f" / {r['peak_gib']:.1f} GiB" if "peak_gib" in r else ""))
    sizes = sorted({f"V={r['vocab']}, {r['tokens']} tokens" for r in rows})
    summary = f"{'; '.join(sizes) or 'nothing measured'}, step / peak: " + (", ".join(cells) or "none")
    if not done:
        summary += " (incomplete)"
    return {"ok": done and bool(rows) and all("error" not in r for r in rows), "summary": summary, "rows": rows,
            "details_md": lm_markdown(rows)}


def lm_markdown(rows: list[dict]) -> str:
    lines = ["Random-weight Llama shaped like SmolLM2-135M (30 layers, hidden 576) teaching its every-other-layer "
             "student; one MetaDistil step (JVP, lean schedule, quiz = tokens/4), mean of 2 after a warm-up.", "",
             "| dtype | logits | V | tokens | step s | peak GiB | added by the step GiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dtype']} | {r['path']} | {r['vocab']} | {r['tokens']} | {r['error']} | | |")
        else:
            lines.append(f"| {r['dtype']} | {r['path']} | {r['vocab']} | {r['tokens']} | {r['step_s']:.3f} | "
                         f"{r.get('peak_gib', float('nan')):.2f} | {r.get('step_added_gib', float('nan')):.2f} |")
    return "\n".join(lines)


RUNNERS: dict[str, Callable[[Path, float], dict]] = {
    "install": part_install,
    "kernels": part_kernels,
    "bench": part_bench,
    "train": part_train,
    "lm": part_lm,
}


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------


def run_one_part(name: str, out: Path, limit_s: float) -> int:
    """Inside the virtualenv: run one part, write out/<name>.json; exit 0 when it passed."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = RUNNERS[name](out, limit_s)
    except Exception as err:
        import traceback

        traceback.print_exc()
        partial = read_json(out / f"{name}.json") or {}
        result = {**partial, "ok": False, "summary": f"{type(err).__name__}: {err}"[:300]}
    write_json(out / f"{name}.json", result)
    return 0 if result.get("ok") else 1


def parse_parts(text: str) -> set[str]:
    names = {p.strip() for p in text.split(",") if p.strip()}
    unknown = names - set(PART_NAMES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {sorted(unknown)}; expected some of {PART_NAMES[1:]}")
    return names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["part"]:
        parser = argparse.ArgumentParser(prog="gpu_check.py part")
        parser.add_argument("name", choices=PART_NAMES)
        parser.add_argument("--out", type=Path, required=True)
        parser.add_argument("--limit-s", type=float, default=600.0)
        args = parser.parse_args(argv[1:])
        return run_one_part(args.name, args.out, args.limit_s)

    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="report folder (default benchmarks/results/gpu_check/<UTC time>)")
    parser.add_argument("--parts", type=parse_parts, default=set(PART_NAMES[1:]),
                        help=f"comma-separated, from {','.join(PART_NAMES[1:])} (default: all)")
    parser.add_argument("--no-install", action="store_true",
                        help="use the virtualenv as it is (still checks that torch sees the GPU)")
    args = parser.parse_args(argv)

    has_cuda, found = detect_cuda()
    if not has_cuda:
        print(f"gpu_check: no CUDA GPU here ({found}); nothing was run", file=sys.stderr)
        return NO_CUDA_EXIT

    started = datetime.datetime.now(datetime.timezone.utc)
    out = (args.out or RESULTS_DIR / started.strftime("%Y%m%dT%H%M%SZ")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    venv_python = REPO / os.environ.get("VENV", ".venv") / "bin" / "python"
    print(f"[gpu_check] {found}; report folder {out}", flush=True)
    outcomes = run_parts(PARTS, lambda p: part_command(p, venv_python, out, not args.no_install), out,
                         part_env(dict(os.environ)), venv_python, args.parts | {"install"},
                         echo=lambda line: print(line, flush=True))
    report = build_report(started.strftime("%Y-%m-%d %H:%M:%S UTC"), machine_info(), outcomes)
    json_path, md_path = write_report(report, out)
    print("\n" + "\n".join(summary_lines(report)))
    print(f"report: {md_path.relative_to(REPO) if md_path.is_relative_to(REPO) else md_path} (and {json_path.name})")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
