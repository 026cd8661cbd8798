"""The causal-LM distillation run: a teacher LM, a student (by default every other layer of the teacher), a
corpus split by document, and one student per method — `finetune` (no distillation: next-token CE only), `kd`
and `metadistil` (or `metadistil-no-pilot`) — reported by held-out perplexity and next-token accuracy.

The default is the embedded one: SmolLM2-135M-Instruct (GGUF, de-quantised once and cached) teaching its own
every-other-layer 15-layer student on the King James Bible, with a small budget for a CPU. The steps are the ones
the classification recipe uses (steps.py, meta.py); only the logits differ: they travel as HeadLogits and every
[tokens × vocabulary] tensor is made in row chunks.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from metadistil_scale.backends import dist, make_model
from metadistil_scale.backends.checkpointing import StageCheckpoint
from metadistil_scale.checkpoint import atomic_dir, atomic_write_text, seed_everything
from metadistil_scale.config import (
    DistillConfig,
    MetaConfig,
    OptimConfig,
    StageConfig,
    TeacherCacheConfig,
    _build,
    read_raw_config,
    require,
    validate_distill,
    validate_run,
    validate_training,
)
from metadistil_scale.lm.chunked import HeadLogits, head_eval_stats
from metadistil_scale.lm.data import EMBEDDED_KJV, LMRows, build_splits
from metadistil_scale.lm.models import (
    EMBEDDED_SMOLLM2,
    CausalLMHead,
    check_same_tokenizer,
    load_causal_lm,
    load_lm_tokenizer,
    num_layers,
    select_layers,
    student_from_layers,
)
from metadistil_scale.loop import BatchStream, CheckpointHook, Evaluation, StageRun, run_stage_loop, to_device
from metadistil_scale.meta import MetaDistil
from metadistil_scale.methods import StepContext, get_method
from metadistil_scale.objectives import require_logit_terms
from metadistil_scale.teacher_cache import TopKRows, open_teacher_cache
from metadistil_scale.trackers import stage_trackers
from metadistil_scale.trainer import DTYPES, configure_cpu_allocator, resolve_device

# ---------------------------------------------------------------- config


@dataclass
class LMDataConfig:
    source: str = EMBEDDED_KJV  # or a .txt/.jsonl/.json/.parquet file or a folder of them
    text_field: str = "text"  # the text column of jsonl/parquet
    sample_by: str = "paragraph"  # documents of a .txt: line | paragraph | document
    seq_len: int = 64
    packed: bool = True  # False: one right-padded row (or more) per document, with an attention mask
    quiz_fraction: float = 0.05
    heldout_fraction: float = 0.05
    split_seed: int = 0
    max_documents: int | None = None
    max_heldout_rows: int | None = 32  # caps the evaluation cost; None = the whole held-out split


@dataclass
class LMModelConfig:
    teacher: str = EMBEDDED_SMOLLM2  # a folder, a hub name, a .gguf file or the embedded SmolLM2
    # Another model with the teacher's tokenizer; None: the teacher's own layers `student_layers`.
    student: str | None = None
    student_layers: int | list[int] | str = "every-other"
    # The student needs an attention with forward-mode AD for u_mode=jvp; the teacher only runs forward/backward.
    attn_implementation: str = "eager"
    teacher_attn_implementation: str = "sdpa"
    chunk_rows: int | None = None  # rows per logits chunk; None: about 4M logits per chunk
    materialize: bool = False  # the [N, V] baseline, for comparison
    cache_dir: str | None = None  # where a GGUF model is kept de-quantised
    # Fine-tune the teacher on the train split's next tokens (`teacher_finetune`) before any method.
    finetune_teacher: bool = False


@dataclass
class LMTeacherCacheConfig(TeacherCacheConfig):
    """The frozen teacher's top-k tempered log-probabilities per token, kept by input row (teacher_cache.py):
    approximate (lm.chunked.head_top_k_kd_loss_sum), for KD and MetaDistil's first `meta.frozen_steps` steps."""

    top_k: int = 64  # 8·top_k + 4 bytes a token


@dataclass
class LMConfig:
    output_dir: str = "runs/lm_smollm2_kjv"
    methods: list[str] = field(default_factory=lambda: ["finetune", "kd", "metadistil"])
    seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # lm-experiment: every method once per seed
    device: str = "auto"
    cpu_allocator: str = "retain"  # as in the classification config
    dtype: str = "float32"
    eval_batch_size: int = 8
    # Where every metrics.jsonl record also goes, as in the classification config (trackers.py).
    trackers: list[str] = field(default_factory=list)
    tracking_dir: str | None = None
    log_every: int = 1
    eval_every: int = 50  # steps between held-out evaluations (and checkpoints); always at the end
    # DeepSpeed JSON configs (ds_configs/), as for the classification task; None: the torch backend
    deepspeed_teacher: str | None = None
    deepspeed_student: str | None = None
    data: LMDataConfig = field(default_factory=LMDataConfig)
    model: LMModelConfig = field(default_factory=LMModelConfig)
    teacher_cache: LMTeacherCacheConfig = field(default_factory=LMTeacherCacheConfig)
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(alpha=0.5, temperature=2.0))
    meta: MetaConfig = field(default_factory=lambda: MetaConfig(
        pilot_lr=1e-4, quiz_batch_size=4, teacher_ce_weight=1.0,
        teacher_optim=OptimConfig(lr=1e-5, weight_decay=0.0, warmup_ratio=0.0)))
    student_train: StageConfig = field(default_factory=lambda: StageConfig(
        batch_size=4, max_steps=10, optim=OptimConfig(lr=2e-4, warmup_ratio=0.0)))
    teacher_finetune: StageConfig = field(default_factory=lambda: StageConfig(
        batch_size=4, max_steps=10, optim=OptimConfig(lr=2e-5, warmup_ratio=0.0)))


def load_lm_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LMConfig:
    return lm_config_from_dict(read_raw_config(path, overrides))


def lm_config_from_dict(raw: dict[str, Any]) -> LMConfig:
    """The validated config of a raw mapping (a recipe with its overrides, or a resolved config sent to workers)."""
    config = _build(LMConfig, raw)
    validate_lm(config)
    return config


def validate_lm(c: LMConfig) -> None:
    validate_run(c)
    d = c.data
    require(d.seq_len >= 2, "data.seq_len", ">= 2", d.seq_len)
    for key in ("quiz_fraction", "heldout_fraction"):
        require(0 < getattr(d, key) < 0.5, f"data.{key}", "in (0, 0.5)", getattr(d, key))
    require(d.sample_by in ("line", "paragraph", "document"), "data.sample_by", "line, paragraph or document",
            d.sample_by)
    m = c.model
    require(m.chunk_rows is None or m.chunk_rows >= 1, "model.chunk_rows", ">= 1 or null", m.chunk_rows)
    validate_distill(c.distill)
    require_logit_terms(c.distill, "a causal LM distils its logits, in row chunks")
    validate_training(c)
    _validate_teacher_cache(c)


def _validate_teacher_cache(c: LMConfig) -> None:
    t = c.teacher_cache
    require(t.top_k >= 1, "teacher_cache.top_k", ">= 1", t.top_k)
    if not t.enabled:
        return
    require(not c.distill.terms and c.distill.soft_loss == "kl", "teacher_cache.enabled",
            "false unless distill is alpha/temperature with soft_loss=kl (the top-k cache keeps probabilities)", True)
    require(c.deepspeed_teacher is None, "teacher_cache.enabled",
            "false with deepspeed_teacher (a sharded teacher's forward involves every rank)", True)
    require(not c.model.materialize, "teacher_cache.enabled", "false with model.materialize (the [N, V] baseline)",
            True)


# ---------------------------------------------------------------- models and evaluation


def build_lm_models(cfg: LMConfig, device: torch.device) -> tuple[nn.Module, nn.Module, Any]:
    """Teacher LM, student LM and the (shared) tokenizer; a student with another tokenizer is refused."""
    m = cfg.model
    cache = Path(m.cache_dir).expanduser() if m.cache_dir else None
    dtype = DTYPES[cfg.dtype]
    tokenizer = load_lm_tokenizer(m.teacher, cache)
    teacher = load_causal_lm(m.teacher, dtype=dtype, attn_implementation=m.teacher_attn_implementation,
                             cache_dir=cache)
    if m.student is None:
        student = student_from_layers(teacher, select_layers(m.student_layers, num_layers(teacher)))
        student.set_attn_implementation(m.attn_implementation)
    else:
        student = load_causal_lm(m.student, dtype=dtype, attn_implementation=m.attn_implementation, cache_dir=cache)
        check_same_tokenizer(tokenizer, load_lm_tokenizer(m.student, cache), teacher, student)
    return teacher.to(device), student.to(device), tokenizer


def wrap(lm: nn.Module, cfg: LMConfig) -> CausalLMHead:
    return CausalLMHead(lm, chunk_rows=cfg.model.chunk_rows, materialize=cfg.model.materialize)


@torch.no_grad()
def evaluate_lm(model: CausalLMHead, rows: LMRows, batch_size: int, device: torch.device) -> dict[str, float]:
    """Held-out perplexity exp(mean CE) and next-token accuracy over the tokens that have a target."""
    was_training = model.training
    model.eval()
    ce, correct, count = 0.0, 0, 0
    # Evaluation never needs [N, V] at once, whichever path trains.
    chunked = CausalLMHead(model.lm, chunk_rows=model.chunk_rows) if model.materialize else model
    for start in range(0, len(rows), batch_size):
        batch = to_device(rows.batch(list(range(start, min(start + batch_size, len(rows))))), device)
        logits: HeadLogits = chunked(**batch["student"])
        c, k, n = head_eval_stats(logits, batch["labels"])
        ce, correct, count = ce + c, correct + k, count + n
    model.train(was_training)
    return {"perplexity": math.exp(ce / count), "token_accuracy": correct / count, "loss": ce / count,
            "tokens": count}


class _RowIndex:
    """BatchStream's dataset protocol over LMRows: selecting rows gives their indices, batched by LMRows.batch."""

    def __init__(self, rows: LMRows) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, ids: list[int]) -> list[int]:
        return ids


def _stream(rows: LMRows, batch_size: int, seed: int, micro: int | None) -> BatchStream:
    """This rank's slice of every global batch of `rows`."""
    return BatchStream(_RowIndex(rows), min(batch_size, len(rows)), seed, rows.batch, micro, dist.rank(),
                       dist.world_size())


# ---------------------------------------------------------------- one method


def train_method(
    method: str,
    cfg: LMConfig,
    base_teacher: nn.Module,
    base_student: nn.Module,
    splits: dict[str, LMRows],
    device: torch.device,
    out_dir: Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    tokenizer: Any = None,
    on_checkpoint: CheckpointHook | None = None,
) -> dict[str, Any]:
    """Train a fresh copy of the student with `method` through the stage loop (loop.py: checkpoints in
    `out_dir`, resume, stop-after, metrics.jsonl, `on_checkpoint` after each checkpoint); returns the final
    student's held-out metrics and timings. With a `tokenizer` the final student is also saved as a
    `save_pretrained` folder, `out_dir/student`."""
    seed_everything(cfg.seed)
    algorithm = get_method(method)
    stage = cfg.student_train
    steps = stage_steps(stage, len(splits["train"]))
    ctx = _lm_step_context(method, cfg, base_teacher, base_student, splits, steps, device)
    heldout = splits["heldout"]
    evaluation = Evaluation(run=lambda: _heldout_record(ctx, heldout, cfg, device),
                            key="heldout_perplexity", higher_is_better=False)
    models = {"student": ctx.student, **({"teacher": ctx.teacher} if algorithm.trains_teacher else {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    run = StageRun(method, algorithm, ctx, _stream(splits["train"], stage.batch_size, cfg.seed,
                                                   stage.micro_batch_size),
                   steps, cfg.log_every, cfg.eval_every, evaluation,
                   StageCheckpoint(out_dir, lm_stage_fingerprint(cfg, method), models,
                                   lm_stage_fingerprint(LMConfig(), method)), out_dir / "metrics.jsonl",
                   open_trackers=stage_trackers(cfg, out_dir))
    state = run_stage_loop(run, resume=resume, seed=cfg.seed, stop_after=stop_after, on_checkpoint=on_checkpoint)
    if tokenizer is not None:
        with ctx.student.gathered():  # every rank gathers, rank 0 writes
            if dist.is_main():
                atomic_dir(out_dir / "student", lambda tmp: _save_lm(ctx.student.module.lm, tokenizer, tmp))
        dist.barrier()
    # The held-out split is the only evaluation split: the result is the last model's (no selection on it).
    last = state["last_eval"]
    result = {"method": method, "steps": steps, "train_time_s": state["wall_time_s"],
              "step_time_s": state["wall_time_s"] / steps, "heldout": _unprefixed(last, "heldout_")}
    if algorithm.trains_teacher:
        result["teacher_heldout_after"] = _unprefixed(last, "teacher_heldout_")
    return result


def _lm_step_context(method: str, cfg: LMConfig, base_teacher: nn.Module, base_student: nn.Module,
                     splits: dict[str, LMRows], steps: int, device: torch.device) -> StepContext:
    """Fresh copies of the models behind their backends, and the streams `method` asks for."""
    algorithm = get_method(method)
    stage = cfg.student_train
    batching = dict(batch_size=stage.batch_size, micro_batch_size=stage.micro_batch_size, stage_key="student_train")
    student = make_model(wrap(copy.deepcopy(base_student), cfg), stage.optim, steps,
                         ds_config=cfg.deepspeed_student, ds_key="deepspeed_student", optim_key="student_train.optim",
                         functional=algorithm.trains_teacher, **batching)
    teacher = None
    if algorithm.uses_teacher:
        # A trained teacher is a copy; so is one that an engine takes over (ZeRO-3 shards its weights in place).
        copied = algorithm.trains_teacher or cfg.deepspeed_teacher is not None
        teacher_lm = copy.deepcopy(base_teacher) if copied else base_teacher
        teacher_lm.eval()
        teacher = make_model(wrap(teacher_lm, cfg), algorithm.teacher_optim(cfg.meta),
                             algorithm.teacher_schedule_steps(cfg.meta, steps), ds_config=cfg.deepspeed_teacher,
                             ds_key="deepspeed_teacher", optim_key="meta.teacher_optim", **batching)
    ctx = StepContext(student, teacher, cfg.distill, cfg.meta, device)
    if teacher is not None:  # KD and MetaDistil's frozen phase read the teacher's top k from it
        ctx.teacher_cache = open_teacher_cache(cfg, algorithm, teacher.module,
                                               TopKRows(cfg.teacher_cache.top_k, cfg.distill.temperature))
    if algorithm.trains_teacher:
        ctx.metadistil = MetaDistil(teacher, student, cfg.distill, cfg.meta)
    if algorithm.needs_quiz:
        ctx.quiz_stream = _stream(splits["quiz"], cfg.meta.quiz_batch_size, cfg.meta.quiz_seed,
                                  stage.micro_batch_size)
    if algorithm.needs_pilot_stream:
        ctx.pilot_stream = _stream(splits["train"], stage.batch_size, cfg.seed + 7919, stage.micro_batch_size)
    return ctx


def lm_stage_fingerprint(cfg: LMConfig, method: str) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: data, models, method, optimisation."""
    full = dataclasses.asdict(cfg)
    keys = ("seed", "dtype", "eval_every", "data", "model", "distill", "student_train")
    return {"method": method, **{k: full[k] for k in keys},
            **({"teacher_cache": full["teacher_cache"]} if cfg.teacher_cache.enabled else {}),  # approximate
            "meta": full["meta"] if get_method(method).trains_teacher else None,
            "teacher_finetune": full["teacher_finetune"] if cfg.model.finetune_teacher else None}


def lm_teacher_fingerprint(cfg: LMConfig) -> dict[str, Any]:
    """What the teacher stage's checkpoint must agree with: its data, its optimisation, the teacher model."""
    full = dataclasses.asdict(cfg)
    return {"method": "finetune", "stage": "teacher",
            **{k: full[k] for k in ("seed", "dtype", "eval_every", "data", "teacher_finetune")},
            "model": {k: full["model"][k] for k in ("teacher", "teacher_attn_implementation", "chunk_rows")}}


def _heldout_record(ctx: StepContext, heldout: LMRows, cfg: LMConfig, device: torch.device) -> dict[str, float]:
    """heldout_* metrics of the trained model and teacher_heldout_* of a teacher that trains. Every rank
    evaluates the whole split (ZeRO-3 forwards are collective); rank 0's figures decide for all."""
    record = {f"heldout_{k}": v for k, v in evaluate_lm(ctx.student.module, heldout, cfg.eval_batch_size,
                                                         device).items()}
    if ctx.metadistil is not None:
        teacher = evaluate_lm(ctx.teacher.module, heldout, cfg.eval_batch_size, device)
        record.update({f"teacher_heldout_{k}": v for k, v in teacher.items()})
    return dist.broadcast_object(record)


def stage_steps(stage: StageConfig, n_train: int) -> int:
    return stage.max_steps or max(1, math.ceil(stage.epochs * (n_train // stage.batch_size)))


def fine_tune_lm_teacher(cfg: LMConfig, job: LMJob, out_dir: Path, *, resume: bool = False,
                         stop_after: int | None = None, on_checkpoint: CheckpointHook | None = None) -> dict[str, Any]:
    """The optional teacher stage (model.finetune_teacher): `finetune` of the teacher on the train split's next
    tokens, in the stage loop like any method (`out_dir`: last.pt, metrics.jsonl). job.teacher then holds the
    fine-tuned weights, which every method starts from; returns the stage's row of the table."""
    seed_everything(cfg.seed)
    stage = cfg.teacher_finetune
    steps = stage_steps(stage, len(job.splits["train"]))
    teacher = make_model(wrap(copy.deepcopy(job.teacher), cfg), stage.optim, steps, ds_config=cfg.deepspeed_teacher,
                         ds_key="deepspeed_teacher", optim_key="teacher_finetune.optim", batch_size=stage.batch_size,
                         micro_batch_size=stage.micro_batch_size, stage_key="teacher_finetune")
    ctx = StepContext(teacher, None, cfg.distill, cfg.meta, job.device, role="teacher")
    evaluation = Evaluation(run=lambda: _heldout_record(ctx, job.splits["heldout"], cfg, job.device),
                            key="heldout_perplexity", higher_is_better=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = StageRun("teacher", get_method("finetune"), ctx, _stream(job.splits["train"], stage.batch_size, cfg.seed,
                                                                   stage.micro_batch_size),
                   steps, cfg.log_every, cfg.eval_every, evaluation,
                   StageCheckpoint(out_dir, lm_teacher_fingerprint(cfg), {"teacher": teacher},
                                   lm_teacher_fingerprint(LMConfig())), out_dir / "metrics.jsonl",
                   open_trackers=stage_trackers(cfg, out_dir))
    state = run_stage_loop(run, resume=resume, seed=cfg.seed, stop_after=stop_after, on_checkpoint=on_checkpoint)
    with teacher.gathered():  # whole weights on every rank, also under ZeRO-3
        job.teacher.load_state_dict({k: v.detach().clone() for k, v in teacher.module.lm.state_dict().items()})
    return {"model": "teacher", "method": "finetune", "steps": steps, "train_time_s": state["wall_time_s"],
            "step_time_s": state["wall_time_s"] / steps, "heldout": _unprefixed(state["last_eval"], "heldout_")}


def _unprefixed(record: dict[str, float], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}


def _save_lm(lm: nn.Module, tokenizer: Any, folder: Path) -> None:
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------- the run


@dataclass
class LMJob:
    """What the stages of an LM run share: the device, the base models and the splits."""

    device: torch.device
    teacher: nn.Module
    student: nn.Module
    tokenizer: Any
    splits: dict[str, LMRows]
    sizes: dict[str, dict[str, int]]


def prepare_lm(cfg: LMConfig) -> LMJob:
    """Join the ranks (under torchrun or the deepspeed launcher every rank runs the same job on its slice of each
    batch), check what the ranks need, write config.yaml, then load the models and split the corpus."""
    dist.init_distributed(use_deepspeed=bool(cfg.deepspeed_teacher or cfg.deepspeed_student))
    check_lm_distributed(cfg, dist.world_size())
    out = Path(cfg.output_dir)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), out / "config.yaml")
    device = resolve_device(cfg)
    configure_cpu_allocator(cfg, device)
    seed_everything(cfg.seed)
    teacher, student, tokenizer = build_lm_models(cfg, device)
    d = cfg.data
    splits = build_splits(d.source, tokenizer, seq_len=d.seq_len, packed=d.packed, quiz_fraction=d.quiz_fraction,
                          heldout_fraction=d.heldout_fraction, seed=d.split_seed, text_field=d.text_field,
                          sample_by=d.sample_by, max_documents=d.max_documents)
    if d.max_heldout_rows is not None and len(splits["heldout"]) > d.max_heldout_rows:
        splits["heldout"] = _first_rows(splits["heldout"], d.max_heldout_rows)
    sizes = {k: {"rows": len(v), "tokens": v.num_tokens} for k, v in splits.items()}
    if dist.is_main():
        print(f"data: {json.dumps(sizes)}", flush=True)
    return LMJob(device, teacher, student, tokenizer, splits, sizes)


def run_lm(cfg: LMConfig, *, resume: bool = False, stop_after: int | None = None,
           on_checkpoint: CheckpointHook | None = None) -> dict[str, Any]:
    """Every method's student in `output_dir/<method>/` (checkpoints, metrics.jsonl, the final `student/`),
    the table in results.json and results.md. `resume` continues each method from its last checkpoint;
    `stop_after` checkpoints and raises StopRequested once a method's stage reaches that step; `on_checkpoint`
    is called after every stage checkpoint (a launcher's fault tolerance, as for trainer.train)."""
    started = time.perf_counter()
    job = prepare_lm(cfg)
    out, device, heldout = Path(cfg.output_dir), job.device, job.splits["heldout"]
    rows = [{"model": "teacher", "method": "-", "steps": 0,
             "heldout": evaluate_lm(wrap(job.teacher, cfg), heldout, cfg.eval_batch_size, device)},
            {"model": "student", "method": "initial", "steps": 0,
             "heldout": evaluate_lm(wrap(job.student, cfg), heldout, cfg.eval_batch_size, device)}]
    if cfg.model.finetune_teacher:
        rows.append(fine_tune_lm_teacher(cfg, job, out / "teacher", resume=resume, stop_after=stop_after,
                                         on_checkpoint=on_checkpoint))
    for method in cfg.methods:
        rows.append({"model": "student", **train_method(method, cfg, job.teacher, job.student, job.splits, device,
                                                         out / method, resume=resume, stop_after=stop_after,
                                                         tokenizer=job.tokenizer, on_checkpoint=on_checkpoint)})
    results = {
        "teacher": cfg.model.teacher, "data": cfg.data.source, "seed": cfg.seed, "splits": job.sizes,
        "student_parameters": sum(p.numel() for p in job.student.parameters()),
        "teacher_parameters": sum(p.numel() for p in job.teacher.parameters()),
        "rows": rows, "wall_time_s": time.perf_counter() - started,
    }
    if dist.is_main():
        atomic_write_text(json.dumps(results, indent=2), out / "results.json")
        atomic_write_text(results_markdown(results), out / "results.md")
    dist.barrier()
    return results


def check_lm_distributed(cfg: LMConfig, world: int) -> None:
    """Refuse, before any work, batches that do not split over `world` data-parallel ranks."""
    stages = ("student_train", "teacher_finetune") if cfg.model.finetune_teacher else ("student_train",)
    for key in stages:
        stage: StageConfig = getattr(cfg, key)
        local = stage.batch_size // world
        require(stage.batch_size % world == 0, f"{key}.batch_size", f"divisible by the {world} ranks",
                stage.batch_size)
        require(stage.micro_batch_size is None or local % stage.micro_batch_size == 0, f"{key}.micro_batch_size",
                f"a divisor of the per-rank batch {local}", stage.micro_batch_size)
    if any(get_method(m).needs_quiz for m in cfg.methods):
        require(cfg.meta.quiz_batch_size % world == 0, "meta.quiz_batch_size", f"divisible by the {world} ranks",
                cfg.meta.quiz_batch_size)


def _first_rows(rows: LMRows, n: int) -> LMRows:
    cut = slice(0, n)
    return LMRows(rows.input_ids[cut], rows.labels[cut],
                  position_ids=None if rows.position_ids is None else rows.position_ids[cut],
                  attention_mask=None if rows.attention_mask is None else rows.attention_mask[cut])


def results_markdown(results: dict[str, Any]) -> str:
    lines = [
        "| model | method | steps | held-out perplexity | token accuracy | teacher perplexity after | "
        "train time (s) | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        after = r.get("teacher_heldout_after")
        trained = "train_time_s" in r
        lines.append(
            f"| {r['model']} | {r['method']} | {r['steps']} | {r['heldout']['perplexity']:.2f} | "
            f"{r['heldout']['token_accuracy']:.4f} | {_fmt(after and after['perplexity'], '.2f')} | "
            f"{_fmt(trained and r['train_time_s'], '.0f')} | {_fmt(trained and r['step_time_s'], '.1f')} |"
        )
    tokens = results["rows"][0]["heldout"]["tokens"]
    lines.append("")
    lines.append(f"Held-out: {tokens} tokens; total wall time {results['wall_time_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or value is False else format(value, spec)


def lm_train(config: str | None, overrides: list[str], *, resume: bool = False, stop_after: int | None = None) -> int:
    """The `metadistil-scale lm-train` entry: run, print the table, say where the results are."""
    quiet_transformers()
    cfg = load_lm_config(config, overrides)
    results = run_lm(cfg, resume=resume, stop_after=stop_after)
    if dist.is_main():  # every rank of a data-parallel run ends here with the same results
        print(results_markdown(results))
        print(f"results: {Path(cfg.output_dir) / 'results.json'}")
    return 0


def quiet_transformers() -> None:
    """No transformers warnings or progress bars in a run's output (the loop shows progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
