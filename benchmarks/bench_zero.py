"""Per-rank memory of the teacher's training state at each ZeRO stage, and the MetaDistil step time per stage.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 benchmarks/bench_zero.py
    torchrun --standalone --nproc_per_node 8 benchmarks/bench_zero.py --batch 64 --length 128   # GPUs

For each teacher config (ds_configs/<stem>.json) it builds the teacher (the embedded MiniLM-L6 by default) and a
student of its first layers (ZeRO-0), then:
  - counts the bytes this rank holds for the teacher: parameters (ZeRO-3: its shards), gradients (after a
    backward, before the step), optimizer state (Adam moments and fp32 master copies), and DeepSpeed's
    communication buckets apart (their size is a config choice, not a function of the model). Storages are
    counted once however many views share them; CPU-offloaded state is counted too (it lives in host memory).
  - times full MetaDistil steps (lean schedule, jvp) after a warm-up step; the slowest rank's mean.
Rank 0 prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from metadistil_scale.backends import dist
from metadistil_scale.backends.deepspeed_backend import DeepSpeedModel
from metadistil_scale.config import EMBEDDED_MINILM, DistillConfig, MetaConfig, OptimConfig
from metadistil_scale.meta import MetaDistil
from metadistil_scale.models.text import load_classifier

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


def _tensors(obj: Any, depth: int = 0):
    """Tensors reachable from an optimizer's attributes (lists, dicts, a few levels deep)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth + 1)
    elif depth < 4 and hasattr(obj, "buffer") and isinstance(obj.buffer, torch.Tensor):  # ZeRO-3 reduce buckets
        yield obj.buffer


class StorageCounter:
    """Bytes of distinct storages, each counted once across categories."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    def __call__(self, tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total


def teacher_bytes(model: DeepSpeedModel) -> dict[str, int]:
    """This rank's bytes for the teacher, by category; call between backward() and step()."""
    engine, count = model.engine, StorageCounter()
    params = list(model.module.parameters())
    zero_opt = engine.optimizer
    basic = getattr(zero_opt, "optimizer", zero_opt)  # the torch optimizer inside ZeRO's wrapper
    grad_attrs = ("averaged_gradients", "grad_partitions_flat_buffer",
                  "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition", "fp32_groups_gradients_flat")
    master_attrs = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition",
                    "fp32_groups")
    out = {
        "parameters": count([p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params]
                            + list(_tensors(getattr(zero_opt, "fp16_partitioned_groups_flat", [])))
                            + list(_tensors(getattr(zero_opt, "bit16_groups_flat", [])))
                            + list(_tensors(getattr(zero_opt, "bf16_groups_flat", [])))),
        "gradients": count([p.grad for p in params]
                           + [t for a in grad_attrs for t in _tensors(getattr(zero_opt, a, None))]
                           + [t.grad for a in master_attrs for t in _tensors(getattr(zero_opt, a, []))]),
        "optimizer": count(list(_tensors(basic.state))
                           + [t for a in master_attrs for t in _tensors(getattr(zero_opt, a, []))]),
    }
    out["buffers"] = count(list(_tensors(vars(zero_opt)))) if zero_opt is not basic else 0
    return out


def batch(n: int, length: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(1000, vocab, (n, length), generator=g),
              "attention_mask": torch.ones(n, length, dtype=torch.long)}
    return {"teacher": inputs, "student": inputs, "labels": torch.randint(0, 2, (n,), generator=g)}


def on_device(b: Any, device: torch.device) -> Any:
    if isinstance(b, torch.Tensor):
        return b.to(device)
    return {k: on_device(v, device) for k, v in b.items()}


def run(stem: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    rank, world = dist.rank(), dist.world_size()
    torch.manual_seed(0)
    teacher = load_classifier(args.teacher, 2, attn_implementation="eager").to(device).eval()
    student = load_classifier(args.teacher, 2, num_layers=args.student_layers, attn_implementation="eager").to(device)
    local = args.batch // world
    teacher_cfg = json.loads((REPO / "ds_configs" / f"{stem}.json").read_text())
    student_cfg = json.loads((REPO / "ds_configs" / f"zero{args.student_zero}.json").read_text())
    for cfg in (teacher_cfg, student_cfg):
        cfg["gradient_clipping"] = "auto"
    teacher_model = DeepSpeedModel(teacher, OptimConfig(lr=1e-5), 100, teacher_cfg, micro_batch_size=local,
                                   grad_accum=1, key="deepspeed_teacher")
    student_model = DeepSpeedModel(student, OptimConfig(lr=5e-5), 100, student_cfg, micro_batch_size=local,
                                   grad_accum=1, key="deepspeed_student", functional=True)
    meta = MetaDistil(teacher_model, student_model, DistillConfig(), MetaConfig(u_mode="jvp", schedule="lean"))
    vocab = teacher.config.vocab_size

    def part(step: int, n: int) -> list[dict]:
        whole = batch(n, args.length, vocab, seed=step)
        return [on_device({"teacher": {k: v[rank * (n // world):(rank + 1) * (n // world)]
                                       for k, v in whole["teacher"].items()},
                           "student": {k: v[rank * (n // world):(rank + 1) * (n // world)]
                                       for k, v in whole["student"].items()},
                           "labels": whole["labels"][rank * (n // world):(rank + 1) * (n // world)]}, device)]

    # The teacher's state with its Adam moments allocated: one step, then a backward measured before the step.
    meta.step(part(0, args.batch), part(1000, args.quiz))
    (p,) = part(1, args.batch)
    teacher_model.backward(teacher_model(p["teacher"]).float().logsumexp(-1).sum() / args.batch)
    held = teacher_bytes(teacher_model)
    teacher_model.step()

    times = []
    for step in range(args.warmup + args.steps):
        parts, quiz = part(10 + step, args.batch), part(2000 + step, args.quiz)
        dist.barrier()
        start = time.perf_counter()
        meta.step(parts, quiz)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = dist.all_reduce_sum(sum(times) / len(times)) / world
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in teacher.parameters())
    return {"config": stem, "teacher_params": n_params, **held, "step_s": step_s,
            "per_rank": dist.all_gather_object(held)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=EMBEDDED_MINILM, help="teacher source (student: its first layers)")
    parser.add_argument("--student-layers", type=int, default=3)
    parser.add_argument("--student-zero", type=int, default=0, choices=(0, 1, 2))
    parser.add_argument("--configs", nargs="+", default=["zero0", "zero1", "zero2", "zero3", "zero3_offload",
                                                         "zero0_bf16", "zero3_bf16"])
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--quiz", type=int, default=8, help="global quiz batch")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the student's missing layers are the point, not news
    dist.init_distributed(use_deepspeed=True)
    device = torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    rows = [run(stem, args, device) for stem in args.configs]
    if dist.is_main():
        base = rows[0]
        state = ("parameters", "gradients", "optimizer")
        print(f"\nteacher {args.teacher} ({base['teacher_params'] / 1e6:.1f}M params), student: its first "
              f"{args.student_layers} layers at ZeRO-{args.student_zero}; {dist.world_size()} ranks, global batch "
              f"{args.batch}, quiz {args.quiz}, length {args.length}, {args.steps} timed steps, "
              f"device {device.type}")
        print("| teacher config | params MB | grads MB | optimizer MB | param+grad+optim MB, per rank | vs first | "
              "buckets MB | MetaDistil step (s) |")
        print("|---|---|---|---|---|---|---|---|")
        first = max(sum(h[k] for k in state) for h in base["per_rank"])
        for r in rows:
            totals = [sum(h[k] for k in state) for h in r["per_rank"]]
            print(f"| {r['config']} | {r['parameters'] / MB:.1f} | {r['gradients'] / MB:.1f} | "
                  f"{r['optimizer'] / MB:.1f} | {' / '.join(f'{t / MB:.1f}' for t in totals)} | "
                  f"{max(totals) / first:.2f} | {r['buffers'] / MB:.1f} | {r['step_s']:.2f} |")
        print("(params/grads/optimizer/buckets: rank 0; 'vs first': the fullest rank against the first config's)")
    dist.exit_process(0)


if __name__ == "__main__":
    main()
