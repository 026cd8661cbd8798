"""MetaDistil on a tiny causal LM across data-parallel ranks with DeepSpeed: the teacher under ZeRO-3 (every
parameter partitioned, the head gathered for the chunked losses), the student under ZeRO-2. Each rank takes its
slice of every global batch; rank 0 saves both models' parameters after the steps. tests/test_lm.py runs it under
torchrun and compares with one process on the whole batches (run_steps with the torch backend).

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/lm_deepspeed_worker.py OUT.pt
"""

from __future__ import annotations

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from metadistil_scale.config import DistillConfig, MetaConfig, OptimConfig
from metadistil_scale.lm.data import LMRows, pack
from metadistil_scale.lm.models import CausalLMHead, student_from_layers
from metadistil_scale.meta import MetaDistil

VOCAB = 37
ROWS_PER_STEP, QUIZ_ROWS_PER_STEP, STEPS = 4, 2, 2
TEACHER_OPTIM = OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, warmup_ratio=0.0,
                            max_grad_norm=None, schedule="constant")
STUDENT_OPTIM = OptimConfig(lr=1e-2, warmup_ratio=0.0, max_grad_norm=None, schedule="constant")
DISTILL = DistillConfig(alpha=0.5, temperature=2.0)
META = MetaConfig(pilot_lr=0.5, u_mode="jvp", schedule="lean", teacher_ce_weight=1.0)
ZERO3 = {"gradient_clipping": "auto", "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
ZERO2 = {"gradient_clipping": "auto", "zero_optimization": {"stage": 2}}


def build() -> tuple[LlamaForCausalLM, LlamaForCausalLM, LMRows, LMRows]:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True, initializer_range=0.2, attn_implementation="eager")
    teacher = LlamaForCausalLM(config)
    student = student_from_layers(teacher, [1])
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, VOCAB - 1, (int(k),), generator=g).tolist() + [VOCAB - 1]
            for k in torch.randint(2, 9, (24,), generator=g)]
    rows = pack(docs[:18], 8, pad_id=0)
    quiz = pack(docs[18:], 8, pad_id=0)
    assert len(rows) >= ROWS_PER_STEP * STEPS and len(quiz) >= QUIZ_ROWS_PER_STEP * STEPS
    return teacher, student, rows, quiz


def run_steps(teacher, student, rows: LMRows, quiz: LMRows, rank: int, world: int) -> None:
    """STEPS MetaDistil steps; this rank's share of each global batch is a contiguous slice of its rows."""
    meta = MetaDistil(teacher, student, DISTILL, META)
    for step in range(STEPS):
        train_ids = list(range(step * ROWS_PER_STEP, (step + 1) * ROWS_PER_STEP))
        quiz_ids = list(range(step * QUIZ_ROWS_PER_STEP, (step + 1) * QUIZ_ROWS_PER_STEP))
        mine, mine_q = len(train_ids) // world, len(quiz_ids) // world
        meta.step([rows.batch(train_ids[rank * mine:(rank + 1) * mine])],
                  [quiz.batch(quiz_ids[rank * mine_q:(rank + 1) * mine_q])])


def main(out: str) -> None:
    from metadistil_scale.backends import dist
    from metadistil_scale.backends.deepspeed_backend import DeepSpeedModel

    teacher_lm, student_lm, rows, quiz = build()
    teacher_lm.eval()
    dist.init_distributed(use_deepspeed=True)
    world = dist.world_size()
    teacher = DeepSpeedModel(CausalLMHead(teacher_lm, chunk_rows=5), TEACHER_OPTIM, STEPS, ZERO3,
                             micro_batch_size=ROWS_PER_STEP // world, grad_accum=1, key="deepspeed_teacher")
    student = DeepSpeedModel(CausalLMHead(student_lm, chunk_rows=5), STUDENT_OPTIM, STEPS, ZERO2,
                             micro_batch_size=ROWS_PER_STEP // world, grad_accum=1, key="deepspeed_student",
                             functional=True)
    run_steps(teacher, student, rows, quiz, dist.rank(), world)
    with teacher.gathered():
        teacher_state = {n: p.detach().clone() for n, p in teacher.module.lm.named_parameters()}
    student_state = {n: p.detach().clone() for n, p in student.module.lm.named_parameters()}
    if dist.is_main():
        torch.save({"teacher": teacher_state, "student": student_state, "world": world}, out)
    dist.exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1])
