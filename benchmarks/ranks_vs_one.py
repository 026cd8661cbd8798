"""How close N data-parallel ranks end to one process with the same global batch, with dropout off and on.

    python benchmarks/ranks_vs_one.py                       # tiny BERT pair, dropout 0 and 0.1, kd and metadistil
    python benchmarks/ranks_vs_one.py --embedded --steps 2  # the embedded MiniLM pair (dropout 0.1 as shipped)

Each case trains the student for --steps steps under torchrun on --ranks CPU ranks (torch backend, gloo) and in one
plain process, then reports ||w_ranks - w_one|| / ||w_one - w_start|| over the student's weights: the gap relative
to how far the weights moved. Dropout masks are drawn per rank from each rank's generator, so with dropout on the
ranks draw other masks than one process does; the figure says by how much that moves the result.
Writes one JSON line per case to --out and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent


def tiny_bert(folder: Path, dropout: float) -> str:
    from transformers import BertConfig, BertForSequenceClassification

    from metadistil_scale.models.text import load_tokenizer

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(config).save_pretrained(folder)
    load_tokenizer("embedded:minilm-l6").save_pretrained(folder)
    return str(folder)


def overrides(out: Path, model: str | None, method: str, steps: int, layers: int) -> list[str]:
    sets = [f"output_dir={out}", f"methods=[{method}]", "data.max_train_examples=512", "data.max_eval_examples=64",
            "data.max_length=32", "student_train.batch_size=16", f"student_train.max_steps={steps}",
            f"eval_every={steps}", "meta.quiz_batch_size=16", f"model.student_layers={layers}",
            "teacher_finetune.max_steps=2", "teacher_finetune.batch_size=16"]
    if model is not None:
        sets += [f"model.teacher_checkpoint={model}", f"model.student={model}"]
    return [arg for s in sets for arg in ("--set", s)]


def student(out: Path, method: str) -> torch.Tensor:
    state = load_file(out / method / "student" / "model.safetensors")
    return torch.cat([state[k].flatten().double() for k in sorted(state)])


def start(argv: list[str], method: str) -> torch.Tensor:
    """The student as the trainer builds it before its first step (same seed, same construction order)."""
    from metadistil_scale.checkpoint import seed_everything
    from metadistil_scale.cli import _load, build_parser
    from metadistil_scale.trainer import build_models, load_task

    cfg = _load(build_parser().parse_args(["train", *argv]))
    seed_everything(cfg.seed)
    teacher_dir = cfg.model.teacher_checkpoint or str(Path(cfg.output_dir) / "teacher" / "best")
    _, model = build_models(cfg, load_task(cfg).info, teacher_dir, torch.device("cpu"))
    state = model.state_dict()
    return torch.cat([state[k].flatten().double() for k in sorted(state)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--embedded", action="store_true", help="the shipped MiniLM pair instead of tiny BERTs")
    parser.add_argument("--out", default="benchmarks/results/ranks_vs_one.jsonl")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.embedded:
            models = [("minilm (dropout 0.1)", None, 3)]
        else:
            models = [(f"tiny bert (dropout {p})", tiny_bert(root / f"tiny{p}", p), 1) for p in (0.0, 0.1)]
        for label, model, layers in models:
            for method in ("kd", "metadistil"):
                runs = {}
                for mode in ("one", "ranks"):
                    out = root / f"{label.split()[0]}{layers}-{model is None}-{method}-{mode}-{len(rows)}"
                    cli = ["-m", "metadistil_scale.launch.deepspeed_train", "train",
                           *overrides(out, model, method, args.steps, layers)]
                    launcher = [sys.executable] if mode == "one" else [
                        sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", str(args.ranks)]
                    proc = subprocess.run([*launcher, *cli], cwd=REPO, env=env, capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise SystemExit(f"{label} {method} {mode} failed:\n{proc.stderr[-3000:]}")
                    runs[mode] = student(out, method)
                    if mode == "one":
                        one_out = out
                moved = (runs["one"] - start(overrides(one_out, model, method, args.steps, layers), method)).norm()
                gap = float((runs["ranks"] - runs["one"]).norm() / moved)
                row = {"model": label, "method": method, "ranks": args.ranks, "steps": args.steps,
                       "relative_gap": gap}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    print(f"\n{'model':<24} {'method':<11} ranks  gap/update")
    for r in rows:
        print(f"{r['model']:<24} {r['method']:<11} {r['ranks']:>5}  {r['relative_gap']:.2e}")


if __name__ == "__main__":
    main()
