"""LoRA students and teachers against full ones: step time, peak memory and optimizer state, per configuration.

    python benchmarks/bench_lora.py                      # MiniLM-L6 -> 3 layers, batch 32, length 128, r = 8
    python benchmarks/bench_lora.py --batch 8 --length 32 --steps 2   # a quick look

Each configuration runs in its own process (bench_step.py's measure): peak memory is what the step adds to the
resident size once models, optimizers and batches exist. Times are medians over --steps steps after one warm-up;
ratios are against the full-model run of the same method in the same invocation. Optimizer state is the bytes
of every tensor the optimizer holds after the steps (AdamW: two moments per trained parameter).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench_step import measure_config, peak_rss_mb, rss_mb

# method, LoRA on the student, LoRA on the teacher
CONFIGS = {
    "kd full": ("kd", False, False),
    "kd lora-student": ("kd", True, False),
    "metadistil full": ("metadistil", False, False),
    "metadistil lora-student": ("metadistil", True, False),
    "metadistil lora-teacher": ("metadistil", False, True),
    "metadistil lora-both": ("metadistil", True, True),
}


def optimizer_bytes(model) -> int:
    if model is None or model.optimizer is None:
        return 0
    return sum(t.numel() * t.element_size() for state in model.optimizer.state.values()
               for t in state.values() if hasattr(t, "numel") and t.dim() > 0)


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.module.parameters() if p.requires_grad)


def run_one(name: str, batch: int, length: int, steps: int, rank: int) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    from metadistil_scale.backends.torch_backend import TorchModel, retain_freed_host_memory
    from metadistil_scale.config import DistillConfig, LoraConfig, MetaConfig, OptimConfig
    from metadistil_scale.meta import MetaDistil
    from metadistil_scale.models import apply_lora
    from metadistil_scale.models.text import load_classifier
    from metadistil_scale.steps import kd_step

    hf_logging.set_verbosity_error()
    retain_freed_host_memory()
    method, lora_student, lora_teacher = CONFIGS[name]
    torch.manual_seed(0)
    teacher = load_classifier("embedded:minilm-l6", 2)
    student = load_classifier("embedded:minilm-l6", 2, num_layers=3)
    if lora_teacher:
        teacher = apply_lora(teacher, LoraConfig(r=rank), "teacher")
    if lora_student:
        student = apply_lora(student, LoraConfig(r=rank), "student")
    g = torch.Generator().manual_seed(0)

    def make_batch() -> list[dict]:
        inputs = {"input_ids": torch.randint(1000, 30000, (batch, length), generator=g),
                  "attention_mask": torch.ones(batch, length, dtype=torch.long)}
        return [{"teacher": inputs, "student": inputs, "labels": torch.randint(0, 2, (batch,), generator=g)}]

    batches, quizzes = [make_batch() for _ in range(steps + 1)], [make_batch() for _ in range(steps + 1)]
    optim, distill = OptimConfig(lr=1e-5, warmup_ratio=0.0), DistillConfig()
    s = TorchModel(student.train(), optim, 100)
    t = TorchModel(teacher.eval(), optim if method == "metadistil" else None, 100)
    meta = MetaDistil(t, s, distill, MetaConfig(u_mode="jvp", schedule="lean"))
    base, times = rss_mb(), []
    for i in range(steps + 1):
        start = time.perf_counter()
        if method == "kd":
            kd_step(t, s, batches[i], distill, regression=False)
        else:
            meta.step(batches[i], quizzes[i], diagnostics=False)
        times.append(time.perf_counter() - start)
    return {"config": name, "step_s": statistics.median(times[1:]), "step_peak_mb": peak_rss_mb() - base,
            "student_trainable": trainable_count(s), "teacher_trainable": trainable_count(t),
            "student_optimizer_mb": optimizer_bytes(s) / 2**20, "teacher_optimizer_mb": optimizer_bytes(t) / 2**20,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.batch, args.length, args.steps, args.rank)))
        return
    rows = []
    for name in args.configs:
        rows.append(measure_config(__file__, name, ["--batch", str(args.batch), "--length", str(args.length),
                                                    "--steps", str(args.steps), "--rank", str(args.rank)]))
        print(f"  {name}: {rows[-1]['step_s']:.2f} s, +{rows[-1]['step_peak_mb']:.0f} MB", file=sys.stderr)
    by = {r["config"]: r for r in rows}
    print(f"\nMiniLM-L6 -> 3 layers, batch={args.batch} length={args.length} steps={args.steps} LoRA r={args.rank} "
          "(query, value)")
    print("| config | step (s) | x full | step peak (MB) | x full | trained student / teacher params "
          "| optimizer state student / teacher (MB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        full = by.get(f"{CONFIGS[r['config']][0]} full")
        time_ratio = f"{r['step_s'] / full['step_s']:.2f}" if full else "-"
        mem_ratio = f"{r['step_peak_mb'] / full['step_peak_mb']:.2f}" if full and full["step_peak_mb"] else "-"
        print(f"| {r['config']} | {r['step_s']:.2f} | {time_ratio} | {r['step_peak_mb']:.0f} | {mem_ratio} | "
              f"{r['student_trainable']:,} / {r['teacher_trainable']:,} | "
              f"{r['student_optimizer_mb']:.1f} / {r['teacher_optimizer_mb']:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
