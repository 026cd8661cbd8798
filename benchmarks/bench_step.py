"""Step time and peak memory of one training step per method, each configuration in its own process.

    python benchmarks/bench_step.py                       # MiniLM-L6 -> 3 layers, batch 32, length 128
    python benchmarks/bench_step.py --pair large          # a 12-layer x 384 teacher -> 6 layers
    python benchmarks/bench_step.py --batch 8 --length 32 --steps 2   # a quick look

Peak memory is the process's peak resident set size (ru_maxrss) minus its resident size once the models,
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

CONFIGS = {
    "finetune": {},
    "kd": {},
    "metadistil jvp lean": {"u_mode": "jvp", "schedule": "lean"},
    "metadistil jvp fast": {"u_mode": "jvp", "schedule": "fast"},
    "metadistil fd lean": {"u_mode": "finite-difference", "schedule": "lean"},
    "metadistil fd fast": {"u_mode": "finite-difference", "schedule": "fast"},
    "unrolled": {"u_mode": "unrolled", "schedule": "lean"},
}


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(pair: str):
    import copy

    from transformers import BertConfig, BertForSequenceClassification

    from metadistil_scale.models.text import load_classifier

    torch_seed()
    if pair == "minilm":
        teacher = load_classifier("embedded:minilm-l6", 2)
        student = load_classifier("embedded:minilm-l6", 2, num_layers=3)
    else:  # a larger pair with the same width: random weights, same cost as a pretrained one
        config = BertConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536,
                            num_labels=2, attn_implementation="eager")
        teacher = BertForSequenceClassification(copy.deepcopy(config))
        config.num_hidden_layers = 6
        student = BertForSequenceClassification(copy.deepcopy(config))
    return teacher, student


def torch_seed() -> None:
    import torch

    torch.manual_seed(0)


def run_one(name: str, pair: str, batch: int, length: int, steps: int, allocator: str) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    from metadistil_scale.backends.torch_backend import TorchModel, retain_freed_host_memory
    from metadistil_scale.config import DistillConfig, MetaConfig, OptimConfig
    from metadistil_scale.meta import MetaDistil
    from metadistil_scale.steps import finetune_step, kd_step

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if allocator == "retain":
        retain_freed_host_memory()
    teacher, student = build(pair)
    g = torch.Generator().manual_seed(0)

    def make_batch() -> dict:
        inputs = {"input_ids": torch.randint(1000, 30000, (batch, length), generator=g),
                  "attention_mask": torch.ones(batch, length, dtype=torch.long)}
        return {"teacher": inputs, "student": inputs, "labels": torch.randint(0, 2, (batch,), generator=g)}

    batches = [[make_batch()] for _ in range(steps + 2)]
    quizzes = [[make_batch()] for _ in range(steps + 2)]
    phases: list[dict] = []
    optim = OptimConfig(lr=1e-5, warmup_ratio=0.0)
    distill = DistillConfig()
    if name == "finetune":
        model = TorchModel(teacher.train(), optim, 100)

        def step(i: int) -> None:
            finetune_step(model, batches[i], "teacher", regression=False)
    elif name == "kd":
        t, s = TorchModel(teacher.eval(), None), TorchModel(student.train(), optim, 100)

        def step(i: int) -> None:
            kd_step(t, s, batches[i], distill, regression=False)
    else:
        meta = MetaDistil(TorchModel(teacher.eval(), optim, 100), TorchModel(student.train(), optim, 100),
                          distill, MetaConfig(**CONFIGS[name]))

        def step(i: int) -> None:
            metrics = meta.step(batches[i], quizzes[i], diagnostics=i > steps)
            phases.append({k[len("time_"):]: v for k, v in metrics.items() if k.startswith("time_")})

    base = rss_mb()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    row = {"config": name, "step_s": statistics.median(times[1:]), "peak_rss_mb": peak_rss_mb(),
           "base_rss_mb": base, "step_peak_mb": peak_rss_mb() - base, "threads": torch.get_num_threads()}
    if phases:
        step(steps + 1)  # one logged step, for the cost of the quiz-after diagnostic
        row["quiz_after_s"] = phases.pop()["quiz_after"]
        row["phases_s"] = {k: statistics.median(p[k] for p in phases[1:]) for k in phases[0]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=("minilm", "large"), default="minilm")
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
        cmd = [sys.executable, __file__, "--one", name, "--pair", args.pair, "--batch", str(args.batch),
               "--length", str(args.length), "--steps", str(args.steps), "--cpu-allocator", args.cpu_allocator]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"configuration {name!r} failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
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
