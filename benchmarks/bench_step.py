"""Step time and peak memory of one training step per method, each configuration in its own process.

    python benchmarks/bench_step.py                       # MiniLM-L6 -> 3 layers, batch 32, length 128
    python benchmarks/bench_step.py --pair large          # a 12-layer x 384 teacher -> 6 layers
    python benchmarks/bench_step.py --pair tiny           # a 4-layer x 128 teacher -> 2 layers
    python benchmarks/bench_step.py --batch 8 --length 32 --steps 2   # a quick look
    python benchmarks/bench_step.py --configs kd "kd cached"          # KD with and without the teacher cache
    python benchmarks/bench_step.py --configs kd "kd official" "metadistil jvp lean" "metadistil jvp lean official"
                                                          # the official GLUE objective (mse + PKD) vs logits-only

Peak memory is the process's peak resident set size (VmHWM) minus its resident size once the models,
optimizers and batches exist, i.e. what the step itself adds (activations, graphs, gradients, optimizer
state, pilot parameters). Times are the median over --steps steps after one warm-up step. Ratios are taken
against `kd` measured in the same invocation.

The timed MetaDistil steps are the trainer's unlogged steps (diagnostics=False); the quiz loss after the
teacher update, which the trainer computes only on the steps it logs, is timed on one more step and shown
apart. --cpu-allocator picks the host allocator setting the trainer applies (`cpu_allocator`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from peak_memory import status_kib

CONFIGS = {
    "finetune": {},
    "kd": {},
    "kd cached": {},  # the teacher's logits from a teacher cache filled over the batches before timing
    "metadistil jvp lean": {"u_mode": "jvp", "schedule": "lean"},
    "metadistil jvp fast": {"u_mode": "jvp", "schedule": "fast"},
    "metadistil fd lean": {"u_mode": "finite-difference", "schedule": "lean"},
    "metadistil fd fast": {"u_mode": "finite-difference", "schedule": "fast"},
    "unrolled": {"u_mode": "unrolled", "schedule": "lean"},
    # Activation checkpointing on both models (model.*_activation_checkpointing).
    "kd ckpt": {},
    "metadistil jvp lean ckpt": {"u_mode": "jvp", "schedule": "lean"},
    # The official MetaDistil GLUE objective (0.5 CE + 0.5 mse of softmaxes + 100 PKD, configs/glue_*.yaml): the
    # generic cotangent (its time is the phase `cotangent`) against the fused kl path of the rows above.
    "kd official": {},
    "metadistil jvp lean official": {"u_mode": "jvp", "schedule": "lean"},
}
OFFICIAL_TERMS = [{"kind": "mse", "weight": 0.5, "normalization": "official"},
                  {"kind": "pkd", "weight": 100.0, "layers": "skip"}]
CHECKPOINTED = " ckpt"
# BERT pairs with random weights: hidden size, teacher layers, heads, intermediate size; the student has half
# the layers. "large" has MiniLM's width; "tiny" runs a MetaDistil step in a fraction of a second.
RANDOM_PAIRS = {"large": (384, 12, 12, 1536), "tiny": (128, 4, 2, 512)}


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident size. Not ru_maxrss: after fork and exec that includes the parent's resident
    size (pytest's, with its models, when the benchmarks measure a configuration)."""
    try:
        return status_kib("VmHWM") / 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(pair: str):
    import copy

    from transformers import BertConfig, BertForSequenceClassification

    from metadistil_scale.models.text import load_classifier

    torch_seed()
    if pair == "minilm":
        teacher = load_classifier("embedded:minilm-l6", 2)
        student = load_classifier("embedded:minilm-l6", 2, num_layers=3)
    else:  # random weights, same cost as a pretrained pair of that shape
        hidden, layers, heads, intermediate = RANDOM_PAIRS[pair]
        config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=intermediate, num_labels=2, attn_implementation="eager")
        teacher = BertForSequenceClassification(copy.deepcopy(config))
        config.num_hidden_layers = layers // 2
        student = BertForSequenceClassification(copy.deepcopy(config))
    return teacher, student


def torch_seed() -> None:
    import torch

    torch.manual_seed(0)


def is_meta(name: str) -> bool:
    return name.removesuffix(CHECKPOINTED) not in ("finetune", "kd", "kd cached", "kd official")


def make_step(name: str, pair: str, batch: int, length: int, n_batches: int) -> Callable[..., dict]:
    """Models, optimizers and n_batches train and quiz batches for configuration `name`; returns
    step(i, diagnostics=False), one training step on batch i % n_batches, giving the step's metrics."""
    import torch
    from transformers.utils import logging as hf_logging

    from metadistil_scale.backends.torch_backend import TorchModel
    from metadistil_scale.config import DistillConfig, DistillTermConfig, MetaConfig, OptimConfig
    from metadistil_scale.meta import MetaDistil
    from metadistil_scale.objectives import Objective, prepare_models
    from metadistil_scale.steps import finetune_step, kd_step

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    teacher, student = build(pair)
    if name.endswith(CHECKPOINTED):
        from metadistil_scale.models.checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(teacher, "teacher")
        enable_activation_checkpointing(student, "student")
        name = name.removesuffix(CHECKPOINTED)
    g = torch.Generator().manual_seed(0)

    def make_batch() -> dict:
        inputs = {"input_ids": torch.randint(1000, 30000, (batch, length), generator=g),
                  "attention_mask": torch.ones(batch, length, dtype=torch.long)}
        return {"teacher": inputs, "student": inputs, "labels": torch.randint(0, 2, (batch,), generator=g)}

    batches = [[make_batch()] for _ in range(n_batches)]
    quizzes = [[make_batch()] for _ in range(n_batches)]
    optim = OptimConfig(lr=1e-5, warmup_ratio=0.0)
    distill = DistillConfig()
    if name.endswith("official"):
        distill = DistillConfig(terms=[DistillTermConfig(**t) for t in OFFICIAL_TERMS])
        prepare_models(Objective.from_config(distill), teacher, student)
    if name == "finetune":
        model = TorchModel(teacher.train(), optim, 100)

        def step(i: int, diagnostics: bool = False) -> dict:
            return finetune_step(model, batches[i % n_batches], "teacher", regression=False)
    elif name in ("kd", "kd cached", "kd official"):
        t, s = TorchModel(teacher.eval(), None), TorchModel(student.train(), optim, 100)
        cache = filled_cache(t, batches) if name == "kd cached" else None

        def step(i: int, diagnostics: bool = False) -> dict:
            return kd_step(t, s, batches[i % n_batches], distill, regression=False, cache=cache)
    else:
        meta = MetaDistil(TorchModel(teacher.eval(), optim, 100), TorchModel(student.train(), optim, 100),
                          distill, MetaConfig(**CONFIGS[name]))

        def step(i: int, diagnostics: bool = False) -> dict:
            return meta.step(batches[i % n_batches], quizzes[i % n_batches], diagnostics=diagnostics)
    return step


def filled_cache(teacher, batches: list[list[dict]]):
    """A teacher cache that holds every row of `batches` (kept in memory; the timed steps only read it)."""
    import tempfile
    from pathlib import Path

    from metadistil_scale.teacher_cache import TeacherCache

    cache = TeacherCache(Path(tempfile.mkdtemp(prefix="teacher-cache-")))
    for parts in batches:
        for part in parts:
            cache.logits(teacher, part["teacher"])
    return cache


def run_one(name: str, pair: str, batch: int, length: int, steps: int, allocator: str) -> dict:
    import torch

    from metadistil_scale.backends.torch_backend import retain_freed_host_memory

    if allocator == "retain":
        retain_freed_host_memory()
    step = make_step(name, pair, batch, length, steps + 2)
    phases: list[dict] = []
    base = rss_mb()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        metrics = step(i)
        times.append(time.perf_counter() - start)
        phases.append({k[len("time_"):]: v for k, v in metrics.items() if k.startswith("time_")})
    row = {"config": name, "step_s": statistics.median(times[1:]), "peak_rss_mb": peak_rss_mb(),
           "base_rss_mb": base, "step_peak_mb": peak_rss_mb() - base, "threads": torch.get_num_threads()}
    if is_meta(name):
        # one logged step, for the cost of the quiz-after diagnostic
        row["quiz_after_s"] = step(steps + 1, diagnostics=True)["time_quiz_after"]
        row["phases_s"] = {k: statistics.median(p[k] for p in phases[1:]) for k in phases[0]}
    return row


def measure(name: str, pair: str, batch: int, length: int, steps: int, allocator: str) -> dict:
    return measure_config(__file__, name, ["--pair", pair, "--batch", str(batch), "--length", str(length),
                                           "--steps", str(steps), "--cpu-allocator", allocator])


def measure_config(script: str, name: str, args: list[str]) -> dict:
    """`script --one name *args` in a fresh process, so that its peak resident size is this configuration's
    alone; returns the JSON row it prints last."""
    cmd = [sys.executable, os.path.abspath(script), "--one", name, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"configuration {name!r} failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=("minilm", *RANDOM_PAIRS), default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--cpu-allocator", choices=("retain", "system"), default="retain")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.pair, args.batch, args.length, args.steps, args.cpu_allocator)))
        return

    rows = []
    for name in args.configs:
        rows.append(measure(name, args.pair, args.batch, args.length, args.steps, args.cpu_allocator))
        print(f"  {name}: {rows[-1]['step_s']:.2f} s, +{rows[-1]['step_peak_mb']:.0f} MB", file=sys.stderr)

    by = {r["config"]: r for r in rows}
    kd, ft, unrolled = by.get("kd"), by.get("finetune"), by.get("unrolled")
    print(f"\npair={args.pair} batch={args.batch} length={args.length} steps={args.steps} "
          f"cpu_allocator={args.cpu_allocator}")
    print("| config | step (s) | x kd | step peak (MB) | x finetune | x unrolled | process peak (MB) |"
          " quiz-after diagnostic (s) |")
    print("|---|---|---|---|---|---|---|---|")

    def ratio(r: dict, ref: dict | None, key: str) -> str:
        return f"{r[key] / ref[key]:.2f}" if ref else "-"

    for r in rows:
        after = f"{r['quiz_after_s']:.2f}" if "quiz_after_s" in r else "-"
        print(f"| {r['config']} | {r['step_s']:.2f} | {ratio(r, kd, 'step_s')} | {r['step_peak_mb']:.0f} | "
              f"{ratio(r, ft, 'step_peak_mb')} | {ratio(r, unrolled, 'step_peak_mb')} | {r['peak_rss_mb']:.0f} | "
              f"{after} |")
    phased = [r for r in rows if "phases_s" in r]
    if phased:
        names = list(dict.fromkeys(k for r in phased for k in r["phases_s"]))
        print("\nMetaDistil phases (s, median):")
        print("| config | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for r in phased:
            print(f"| {r['config']} | " + " | ".join(f"{r['phases_s'].get(k, 0.0):.2f}" for k in names) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
