"""The top-k teacher cache's error on a real causal LM: the KD loss and its gradient against the full teacher.

    python benchmarks/lm_top_k_error.py                       # SmolLM2-135M -> its every-other-layer student
    python benchmarks/lm_top_k_error.py --rows 4 --ks 1 16 256 --set distill.temperature=1.0

On a few KJV rows (the lm-train job's embedded data and models, `distill` as configs/lm_smollm2_kjv.yaml), the
chunked KD loss against the teacher's top k (lm.chunked.head_top_k_kd_loss_sum) and against its full
distribution (head_kd_loss_sum): the loss's relative error and the relative error of the gradient the student
receives, w.r.t. its final hidden states and its LM head, and the teacher's mean mass outside the top k.
Prints one row per k.
"""

from __future__ import annotations

import argparse

import torch

from metadistil_scale.lm.chunked import HeadLogits, head_kd_loss_sum, head_top_k
from metadistil_scale.lm.data import build_splits
from metadistil_scale.lm.models import CausalLMHead
from metadistil_scale.lm.recipe import build_lm_models, load_lm_config


def loss_and_grads(student: HeadLogits, teacher, labels: torch.Tensor, cfg) -> tuple[float, list[torch.Tensor]]:
    hidden, weight = (t.detach().requires_grad_(True) for t in (student.hidden, student.weight))
    loss = head_kd_loss_sum(HeadLogits(hidden, weight, student.chunk_rows), teacher, labels, cfg)
    loss.backward()
    return float(loss.detach()), [hidden.grad, weight.grad]


def relative(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    diff = sum(float((g - w).double().pow(2).sum()) for g, w in zip(got, want))
    return (diff / sum(float(w.double().pow(2).sum()) for w in want)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/lm_smollm2_kjv.yaml")
    parser.add_argument("--rows", type=int, default=4, help="train rows of data.seq_len tokens")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    parser.add_argument("--set", action="append", default=[], help="a config override, as lm-train's --set")
    args = parser.parse_args()
    cfg = load_lm_config(args.config, args.set)
    teacher, student, tokenizer = build_lm_models(cfg, torch.device("cpu"))
    d = cfg.data
    rows = build_splits(d.source, tokenizer, seq_len=d.seq_len, packed=d.packed, quiz_fraction=d.quiz_fraction,
                        heldout_fraction=d.heldout_fraction, seed=d.split_seed, max_documents=40)["train"]
    batch = rows.batch(list(range(args.rows)))
    with torch.no_grad():
        z_t = CausalLMHead(teacher.eval(), chunk_rows=cfg.model.chunk_rows)(**batch["teacher"])
        z_s = CausalLMHead(student, chunk_rows=cfg.model.chunk_rows)(**batch["student"])
    full_loss, full_grads = loss_and_grads(z_s, z_t, batch["labels"], cfg.distill)
    vocab = z_t.weight.shape[0]
    print(f"{int((batch['labels'] != -100).sum())} tokens, V = {vocab}, alpha = {cfg.distill.alpha}, "
          f"T = {cfg.distill.temperature}; full KD loss {full_loss:.4f}")
    print("| k | bytes/token | mass outside top k | loss rel. error | gradient rel. error |\n|---|---|---|---|---|")
    for k in args.ks:
        top = head_top_k(z_t, k, cfg.distill.temperature)
        loss, grads = loss_and_grads(z_s, top, batch["labels"], cfg.distill)
        print(f"| {k} | {8 * k + 4} | {float(top.rest.exp().mean()):.3f} | {abs(loss - full_loss) / full_loss:.2e} | "
              f"{relative(grads, full_grads):.2e} |")


if __name__ == "__main__":
    main()
