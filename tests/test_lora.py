"""LoRA students and teachers: the meta-gradient over adapters against a hand-written create_graph reference
(float64), and a whole run that trains, saves and reloads adapters."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_meta import make_step, rel_error, text_batch, tiny_bert
from test_trainer import save_tiny_bert, tiny_config
from torch.func import functional_call
from transformers import AutoModelForSequenceClassification

from metadistil_scale.backends.torch_backend import logits_of
from metadistil_scale.checkpoint import fingerprint_differences
from metadistil_scale.config import ConfigError, LoraConfig, load_config
from metadistil_scale.models import apply_lora
from metadistil_scale.trainer import load_done, stage_fingerprint, train

ALPHA, TEMPERATURE, PILOT_LR = 0.5, 2.0, 0.5  # as test_meta.make_step sets them
LORA = LoraConfig(r=2, alpha=4.0, target_modules=["query", "value"])


def adapted(model: torch.nn.Module, role: str, seed: int) -> torch.nn.Module:
    """LoRA on `model`, with random (not zero) adapters so that every adapter has a gradient."""
    model = apply_lora(model, LORA, role)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def reference_teacher_grad(teacher, student, batch, quiz) -> list[torch.Tensor]:
    """∇ over the teacher's trainable parameters of CE(f_s(xq; θs − λ∇θs L_S), yq), θs the student's trainable
    parameters only, by create_graph with torch's own losses."""
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    z_t = logits_of(teacher(**batch["teacher"]))
    z_s = logits_of(functional_call(student, params, kwargs=batch["student"]))
    log_q, log_p = F.log_softmax(z_s / TEMPERATURE, -1), F.log_softmax(z_t / TEMPERATURE, -1)
    soft = TEMPERATURE**2 * F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    loss = (ALPHA * F.cross_entropy(z_s, batch["labels"], reduction="sum") + (1 - ALPHA) * soft) / len(z_s)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
    pilot = {k: p if g is None else p - PILOT_LR * g for (k, p), g in zip(params.items(), grads)}
    meta_loss = F.cross_entropy(logits_of(functional_call(student, pilot, kwargs=quiz["student"])), quiz["labels"])
    trainable = [p for p in teacher.parameters() if p.requires_grad]
    return list(torch.autograd.grad(meta_loss, trainable))


@pytest.mark.parametrize("lora_on,u_mode,tol", [("student", "jvp", 1e-8), ("teacher", "jvp", 1e-8),
                                                ("both", "jvp", 1e-8), ("both", "finite-difference", 1e-5)])
def test_meta_gradient_over_adapters_equals_unrolled(lora_on, u_mode, tol):
    teacher, student = tiny_bert(2, seed=0).eval(), tiny_bert(1, seed=1)
    if lora_on in ("teacher", "both"):
        teacher = adapted(teacher, "teacher", seed=2)
    if lora_on in ("student", "both"):
        student = adapted(student, "student", seed=3)
    batch, quiz = text_batch(6, seed=4), text_batch(5, seed=5)
    want = reference_teacher_grad(teacher, student, batch, quiz)

    step = make_step(teacher, student, u_mode=u_mode)
    step.accumulate_teacher_grad([batch], [quiz])
    trainable = [(n, p) for n, p in teacher.named_parameters() if p.requires_grad]
    assert rel_error([p.grad for _, p in trainable], want) < tol
    frozen = [n for n, p in teacher.named_parameters() if not p.requires_grad]
    if lora_on != "student":  # only the adapters are meta-learned; the base gets no gradient at all
        assert frozen and all("lora_" in n for n, _ in trainable)
        assert all(p.grad is None for p in teacher.parameters() if not p.requires_grad)


def test_adapter_meta_gradient_is_not_the_full_students():
    """Negative control: with θs = the adapters the meta-gradient differs from the one over every student weight,
    so the comparison above can tell them apart."""
    teacher, student = tiny_bert(2, seed=0).eval(), adapted(tiny_bert(1, seed=1), "student", seed=3)
    batch, quiz = text_batch(6, seed=4), text_batch(5, seed=5)
    adapters_only = reference_teacher_grad(teacher, student, batch, quiz)
    for p in student.parameters():
        p.requires_grad_(True)
    every_weight = reference_teacher_grad(teacher, student, batch, quiz)
    assert rel_error(adapters_only, every_weight) > 1e-2


def test_lora_needs_target_modules_for_a_cnn():
    with pytest.raises(ConfigError, match=r"model\.student_lora\.target_modules"):
        load_config(None, ["data.task=fashion_mnist", "model.teacher=cv:resnet8", "model.student=cv:resnet8",
                           "model.student_layers=null", "model.student_lora.r=4"])
    with pytest.raises(ConfigError, match=r"model\.teacher_lora\.r: expected >= 1, got 0"):
        load_config(None, ["model.teacher_lora.r=0"])


def test_a_fingerprint_without_a_newer_optional_key_still_matches():
    cfg = load_config(None, [])
    now = stage_fingerprint(cfg, "kd", "kd")
    older = json.loads(json.dumps(now))
    del older["model"]["student_lora"], older["model"]["teacher_lora"]  # written before LoRA existed
    assert fingerprint_differences(older, now) == []
    on = stage_fingerprint(load_config(None, ["model.student_lora.r=4"]), "kd", "kd")
    # Once used, the option's set values are differences (a null target_modules or train_head is not).
    assert fingerprint_differences(older, on) == [f"model.student_lora.{k}"
                                                  for k in ("alpha", "dropout", "r", "save_merged")]


@pytest.mark.slow
def test_lora_run_trains_only_adapters_and_saves_what_reloads(tmp_path):
    teacher_dir = save_tiny_bert(tmp_path / "teacher", 2, 2, seed=0)
    student_dir = save_tiny_bert(tmp_path / "student", 2, 2, seed=1)
    out = tmp_path / "run"
    cfg = tiny_config(out, teacher_dir, student_dir, "methods=[metadistil]", "student_train.max_steps=4",
                      "model.student_lora.r=4", "model.student_lora.target_modules=[query, value]",
                      "model.teacher_lora.r=2", "model.teacher_lora.target_modules=[query, value]")
    train(cfg)
    best = out / "metadistil" / "best"
    assert (best / "adapter" / "adapter_model.safetensors").is_file()
    assert (best / "teacher" / "adapter" / "adapter_model.safetensors").is_file()

    # The teacher's base never moved: its merged weights differ from the starting teacher only where adapters sit.
    start = load_file(teacher_dir / "model.safetensors")
    merged = load_file(best / "teacher" / "model.safetensors")
    moved = sorted(k for k in start if not torch.equal(start[k], merged[k]))
    assert moved and all(k.endswith(("query.weight", "value.weight")) for k in moved)
    teacher_adapters = load_file(best / "teacher" / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in k for k in teacher_adapters)  # no head: the teacher's stays as fine-tuned

    # The merged student predicts what the adapted student does.
    student_adapters = load_file(best / "adapter" / "adapter_model.safetensors")
    assert any("classifier" in k for k in student_adapters)  # the student's head trains in full
    merged_student = AutoModelForSequenceClassification.from_pretrained(best).eval()
    assert load_done(out / "metadistil") is not None
    ids = torch.randint(1, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    from peft import PeftModel

    base = AutoModelForSequenceClassification.from_pretrained(student_dir, num_hidden_layers=1).eval()
    with torch.no_grad():
        via_adapters = PeftModel.from_pretrained(base, best / "adapter").eval()(input_ids=ids).logits
        assert torch.allclose(merged_student(input_ids=ids).logits, via_adapters, atol=1e-6)
