"""A one-at-a-time sweep of MetaDistil's teacher-side settings around a recipe, against KD on the same teacher.

    python benchmarks/sweep_meta.py --config configs/text.yaml \
        --vary meta.teacher_optim.lr=1e-6,1e-4 --vary meta.teacher_ce_weight=0 --vary meta.interval=4

The base point trains (or reuses, or takes from --set model.teacher_checkpoint=...) the recipe's fine-tuned
teacher and runs `kd` and `metadistil` with the recipe's settings; every other point changes one key and runs `metadistil` from that same teacher. Each point
reports the student's test metric, the teacher's test metric after the run, and the wall time per step
(evaluations included). Writes <output-dir>/sweep.json and sweep.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from metadistil_scale.config import ConfigError, config_to_dict, load_config
from metadistil_scale.trainer import train


def points(base: list[str], vary: list[str]) -> list[tuple[str, list[str]]]:
    """(name, overrides) for the base point, then one point per varied value."""
    out = [("base", base)]
    for item in vary:
        key, _, values = item.partition("=")
        if not values:
            raise ConfigError(f"--vary {item!r}: expected KEY=V1,V2,...")
        for value in values.split(","):
            out.append((f"{key}={value}", [*base, f"{key}={value}"]))
    return out


def lookup(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (default: the embedded text task)")
    parser.add_argument("--output-dir", default="runs/sweep")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applies to every point")
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2")
    args = parser.parse_args()
    out = Path(args.output_dir)
    plan = points(args.set, args.vary)
    varied = list(dict.fromkeys(name.split("=")[0] for name, _ in plan[1:]))
    try:  # every point is validated before any training starts
        configs = [(name, load_config(args.config, [*o, f"output_dir={out / name.replace('/', '_')}"]))
                   for name, o in plan]
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None

    rows = []
    # Every point distils from the base point's teacher: the recipe's given one, or the one the base fine-tunes.
    teacher = configs[0][1].model.teacher_checkpoint or str(Path(configs[0][1].output_dir) / "teacher" / "best")
    for i, (name, cfg) in enumerate(configs):
        if i == 0:
            cfg.methods = ["kd", "metadistil"]
        else:
            cfg.methods = ["metadistil"]
            cfg.model.teacher_checkpoint = teacher
        print(f"\n=== {name}: {' '.join(cfg.methods)} -> {cfg.output_dir}", file=sys.stderr, flush=True)
        results = train(cfg)
        metric = results["metric"]
        teacher_before = next(r for r in results["rows"] if r["model"] == "teacher")["test"][metric]
        for r in results["rows"]:
            if r["model"] != "student":
                continue
            after = r.get("teacher_test", {}).get(metric, teacher_before)
            settings = {key: lookup(config_to_dict(cfg), key) for key in varied}
            rows.append({"point": name if r["method"] != "kd" else "kd", "method": r["method"], "metric": metric,
                         "student_test": r["test"][metric], "teacher_test_before": teacher_before,
                         "teacher_test_after": after, "steps": r["steps"],
                         "s_per_step": r["wall_time_s"] / r["steps"], "settings": settings})

    kd = next(r for r in rows if r["method"] == "kd")
    lines = [f"| point | student test {kd['metric']} | vs kd (points) | teacher test before → after | s/step |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['point']} | {r['student_test']:.4f} | {100 * (r['student_test'] - kd['student_test']):+.2f} | "
                     f"{r['teacher_test_before']:.4f} → {r['teacher_test_after']:.4f} | {r['s_per_step']:.2f} |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"config": args.config, "set": args.set, "vary": args.vary,
                                                "rows": rows}, indent=2))
    (out / "sweep.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
