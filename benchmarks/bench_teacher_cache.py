"""KD step time with and without the teacher cache, in one process, the two steps alternating.

    python benchmarks/bench_teacher_cache.py                 # MiniLM-L6 -> 3 layers, batch 32, length 128
    python benchmarks/bench_teacher_cache.py --pair tiny --batch 8 --length 32 --rounds 5

Both configurations are bench_step.py's (`kd` and `kd cached`: the cache filled over the batches before timing,
as a second epoch or a later run finds it). Alternating them step by step exposes both to the same load, which
on a shared machine drifts more between two processes run one after the other than between two adjacent steps.
Prints medians over --rounds pairs after one warm-up pair, the ratio, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from bench_step import RANDOM_PAIRS, make_step


def timed(step, i: int) -> float:
    start = time.perf_counter()
    step(i)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=("minilm", *RANDOM_PAIRS), default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu-allocator", choices=("retain", "system"), default="retain")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args()
    if args.cpu_allocator == "retain":  # the trainer's default (cpu_allocator)
        from metadistil_scale.backends.torch_backend import retain_freed_host_memory

        retain_freed_host_memory()

    load_before = os.getloadavg()
    n = args.rounds + 1
    plain = make_step("kd", args.pair, args.batch, args.length, n)
    cached = make_step("kd cached", args.pair, args.batch, args.length, n)
    times: dict[str, list[float]] = {"kd": [], "kd cached": []}
    for i in range(n):
        times["kd"].append(timed(plain, i))
        times["kd cached"].append(timed(cached, i))
    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    result = {"args": vars(args), "step_s": medians, "all_step_s": times,
              "cached_over_plain": medians["kd cached"] / medians["kd"],
              "load_average_before": load_before, "load_average_after": os.getloadavg()}
    print(f"pair={args.pair} batch={args.batch} length={args.length} rounds={args.rounds}")
    print("| config | step (s, median) | x kd |\n|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value:.2f} | {value / medians['kd']:.2f} |")
    print(f"load average (1, 5, 15 min): before {load_before}, after {result['load_average_after']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
