"""Distillation objectives: every term's teacher meta-gradient against a hand-written create_graph reference
(float64), the generic cotangent against the fused fast path, and the objective's configuration."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from test_meta import NUM_LABELS, TinyCNN, image_batch, text_batch  # padded text rows, a CNN with BatchNorm
from torch import nn
from torch.func import functional_call
from transformers import BertConfig, BertForSequenceClassification

from metadistil_scale.backends.torch_backend import TorchModel
from metadistil_scale.config import (
    ConfigError,
    DistillConfig,
    DistillTermConfig,
    MetaConfig,
    OptimConfig,
    load_config,
)
from metadistil_scale.losses import student_loss_sum, teacher_cotangent
from metadistil_scale.meta import MetaDistil
from metadistil_scale.objectives import TERMS, Objective, layer_pairs, prepare_models

T = 2.0
ALPHA = 0.4
PILOT_LR = 0.5


# ---------------------------------------------------------------- models and batches


def tiny_bert(layers: int, hidden: int, seed: int, heads: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=20, max_position_embeddings=16, num_labels=NUM_LABELS,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForSequenceClassification(config).double()


def bert_pair() -> tuple[nn.Module, nn.Module]:
    """A 4-layer teacher of width 16 and a 2-layer student of width 12: hidden terms need the projection."""
    return tiny_bert(4, 16, seed=0).eval(), tiny_bert(2, 12, seed=1)


def cnn_pair() -> tuple[nn.Module, nn.Module]:
    return TinyCNN(6, seed=0).double().eval(), TinyCNN(4, seed=1).double()


# ---------------------------------------------------------------- the hand-written reference


def _log_probs(z_s, z_t):
    return F.log_softmax(z_s / T, -1), F.log_softmax(z_t / T, -1)


def _token_mean(per_token, mask):
    mask = mask.to(per_token.dtype)
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()


REFERENCE_EXTRA: dict = {}  # references of terms a test registers, by kind: (p, q) -> batch mean


def reference_term(kind: str, spec: dict, out_s, out_t, proj, mask) -> torch.Tensor:
    """One term as a batch mean, written from its definition with torch's own functions."""
    z_s, z_t = out_s.logits if hasattr(out_s, "logits") else out_s, out_t.logits if hasattr(out_t, "logits") else out_t
    log_q, log_p = _log_probs(z_s, z_t)
    p, q = log_p.exp(), log_q.exp()
    if kind == "kl":
        return T**2 * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    if kind == "reverse_kl":
        return T**2 * F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    if kind == "jsd":
        b = spec["beta"]
        m = b * p + (1 - b) * q
        return T**2 * (b * (p * (p.log() - m.log())).sum(-1) + (1 - b) * (q * (q.log() - m.log())).sum(-1)).mean()
    if kind in REFERENCE_EXTRA:
        return REFERENCE_EXTRA[kind](p, q)
    if kind == "mse":
        if spec.get("normalization") == "official":
            return F.mse_loss(p, q) * T**2  # the official GLUE code's soft loss
        return F.mse_loss(q, p, reduction="sum") / len(z_s)
    if kind in ("attention", "attention_mse"):
        return reference_attention(kind, spec, out_s.attentions, out_t.attentions, mask)
    hs, ht = out_s.hidden_states, out_t.hidden_states
    ls, lt = len(hs) - 1, len(ht) - 1
    if kind == "pkd":  # the official code: [CLS] of hidden_states[1:-1], teacher's (k-1)::k, L2-normalised
        k = lt // ls
        order = list(range(k - 1, lt - 1, k)) if spec["layers"] == "skip" else list(range(lt - ls, lt - 1))
        s_cls = torch.stack([h[:, 0] for h in hs[1:-1]])
        t_cls = torch.stack([h[:, 0] for h in ht[1:-1]])[order]
        s_cls = proj(s_cls)
        return F.mse_loss(s_cls / s_cls.norm(dim=-1, keepdim=True), t_cls / t_cls.norm(dim=-1, keepdim=True))
    pairs = [(i, 2 * i) for i in range(ls + 1)] if spec["layers"] == "uniform" else [(1, 2)]
    total = 0.0
    for i, j in pairs:
        a, b = proj(hs[i]), ht[j]
        per_token = ((a - b) ** 2).mean(-1) if kind == "hidden_mse" else 1 - F.cosine_similarity(a, b, dim=-1)
        total = total + _token_mean(per_token, mask)
    return total / len(pairs)


def reference_attention(kind: str, spec: dict, att_s, att_t, mask) -> torch.Tensor:
    """Row by row on its real tokens alone (no padding left to mask): per head and query, KL(p ‖ q) over the
    keys (MiniLM) or Σ (q − p)²; a mean over heads and queries, then over rows and matched layers. The teacher
    has twice the student's layers."""
    ls, lt = len(att_s), len(att_t)
    layers = spec["layers"]
    pairs = {"top": [(ls, lt)], "uniform": [(i, 2 * i) for i in range(1, ls + 1)],
             "skip": [(i, 2 * i) for i in range(1, ls)]}.get(layers, layers) if isinstance(layers, str) else layers
    total = 0.0
    for i, j in pairs:
        rows = []
        for r, n in enumerate(mask.sum(1).tolist()):
            q, p = att_s[i - 1][r, :, :n, :n], att_t[j - 1][r, :, :n, :n]
            d = F.kl_div(q.log(), p, reduction="sum") if kind == "attention" else F.mse_loss(q, p, reduction="sum")
            rows.append(d / (q.shape[0] * n))
        total = total + torch.stack(rows).mean()
    return total / len(pairs)


def reference_teacher_grad(teacher, student, proj_params, terms, batch, quiz, hard_weight=ALPHA):
    """∇θt CE(f_s(xq; θs − λ∇θs L_S(θs; θt)), yq) by create_graph, the projection among the student's parameters."""
    names = [n for n, _ in student.named_parameters()]
    params = {**dict(student.named_parameters()), **proj_params}
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    text = "input_ids" in batch["student"]
    extra = {"output_hidden_states": True, "output_attentions": True} if text else {}

    def proj(h):
        return F.linear(h, params["w"], params["b"]) if params else h

    out_t = teacher(**batch["teacher"], **extra)
    out_s = functional_call(student, ({n: params[n] for n in names}, buffers), kwargs={**batch["student"], **extra})
    z_s = out_s.logits if text else out_s
    loss = hard_weight * F.cross_entropy(z_s, batch["labels"]) if hard_weight else 0.0
    for spec in terms:
        loss = loss + spec["weight"] * reference_term(spec["kind"], spec, out_s, out_t, proj,
                                                      batch["student"].get("attention_mask"))
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    pilot = {k: p - PILOT_LR * g for (k, p), g in zip(params.items(), grads)}
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    z_q = functional_call(student, ({n: pilot[n] for n in names}, buffers), kwargs=quiz["student"])
    z_q = z_q.logits if text else z_q
    grads = torch.autograd.grad(F.cross_entropy(z_q, quiz["labels"]), list(teacher.parameters()), allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, teacher.parameters())]


# ---------------------------------------------------------------- the step under test


def make_step(teacher, student, terms, u_mode="jvp", hard_weight=ALPHA) -> MetaDistil:
    distill = DistillConfig(alpha=hard_weight, temperature=T, terms=[DistillTermConfig(**t) for t in terms])
    prepare_models(Objective.from_config(distill), teacher, student)
    sgd = OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=None)
    meta = MetaConfig(pilot_lr=PILOT_LR, u_mode=u_mode, fd_epsilon=1e-5, teacher_ce_weight=0.0)
    return MetaDistil(TorchModel(teacher, sgd, 100), TorchModel(student, sgd, 100), distill, meta)


def meta_grad_and_reference(kind_pair, terms, u_mode="jvp", parts=1):
    teacher, student = bert_pair() if kind_pair == "bert" else cnn_pair()
    ref_teacher, ref_student = copy.deepcopy(teacher), copy.deepcopy(student)
    step = make_step(teacher, student, terms, u_mode)
    projection = getattr(student, "distill_projection", None)
    proj_params = {} if projection is None else {"w": projection.weight.detach().clone().requires_grad_(),
                                                 "b": projection.bias.detach().clone().requires_grad_()}
    batch_fn = text_batch if kind_pair == "bert" else image_batch
    batch, quiz = batch_fn(6, seed=1), batch_fn(5, seed=2)
    want = reference_teacher_grad(ref_teacher, ref_student, proj_params, terms, batch, quiz)
    step.accumulate_teacher_grad(split(batch, parts), [quiz])
    got = [p.grad if p.grad is not None else torch.zeros_like(p) for p in teacher.parameters()]
    return got, want, step


def split(batch: dict, parts: int) -> list[dict]:
    n = len(batch["labels"])
    cuts = [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]
    return [{"teacher": {k: v[a:b] for k, v in batch["teacher"].items()},
             "student": {k: v[a:b] for k, v in batch["student"].items()}, "labels": batch["labels"][a:b]}
            for a, b in cuts]


def rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    got_flat, want_flat = torch.cat([g.reshape(-1) for g in got]), torch.cat([w.reshape(-1) for w in want])
    assert float(want_flat.norm()) > 0
    return float((got_flat - want_flat).norm() / want_flat.norm())


SINGLE_TERMS = {
    "kl": {"kind": "kl", "weight": 0.6},
    "mse": {"kind": "mse", "weight": 0.6},
    "mse_official": {"kind": "mse", "weight": 0.6, "normalization": "official"},
    "reverse_kl": {"kind": "reverse_kl", "weight": 0.6},
    "jsd": {"kind": "jsd", "weight": 0.6, "beta": 0.3},
    "pkd_skip": {"kind": "pkd", "weight": 100.0, "layers": "skip"},
    "pkd_last": {"kind": "pkd", "weight": 100.0, "layers": "last"},
    "hidden_mse": {"kind": "hidden_mse", "weight": 3.0, "layers": "uniform"},
    "cosine": {"kind": "cosine", "weight": 3.0, "layers": "skip"},
    "attention_top": {"kind": "attention", "weight": 2.0, "layers": "top"},
    "attention_pairs": {"kind": "attention", "weight": 2.0, "layers": [[1, 1], [2, 4]]},
    "attention_mse": {"kind": "attention_mse", "weight": 3.0, "layers": "uniform"},
}
OFFICIAL_MIX = [{"kind": "mse", "weight": 0.5, "normalization": "official"},
                {"kind": "pkd", "weight": 100.0, "layers": "skip"}]
KL_AND_ATTENTION = [{"kind": "kl", "weight": 0.5}, {"kind": "attention", "weight": 2.0, "layers": "top"}]


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(SINGLE_TERMS))
def test_each_term_alone_equals_unrolled_reference(name):
    got, want, _ = meta_grad_and_reference("bert", [SINGLE_TERMS[name]])
    assert rel_error(got, want) <= 1e-8


@pytest.mark.parametrize("u_mode,tol", [("jvp", 1e-8), ("finite-difference", 1e-5), ("unrolled", 1e-10)])
def test_pkd_mse_ce_mix_equals_unrolled_reference(u_mode, tol):
    mix = [*OFFICIAL_MIX, {"kind": "hidden_mse", "weight": 2.0, "layers": "uniform"}]
    got, want, _ = meta_grad_and_reference("bert", mix, u_mode)
    assert rel_error(got, want) <= tol


@pytest.mark.parametrize("u_mode,tol", [("jvp", 1e-8), ("finite-difference", 1e-5), ("unrolled", 1e-10)])
def test_attention_in_a_mix_equals_unrolled_reference(u_mode, tol):
    mix = [*KL_AND_ATTENTION, {"kind": "hidden_mse", "weight": 2.0, "layers": "uniform"},
           {"kind": "attention_mse", "weight": 3.0, "layers": "skip"}]
    got, want, _ = meta_grad_and_reference("bert", mix, u_mode)
    assert rel_error(got, want) <= tol


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd", "mse_official"])
def test_logit_terms_on_a_cnn_pair_equal_unrolled_reference(kind):
    got, want, _ = meta_grad_and_reference("cnn", [SINGLE_TERMS[kind]])
    assert rel_error(got, want) <= 1e-8


def test_a_new_term_is_one_function_and_one_registry_entry(monkeypatch):
    """The README's example: a squared Hellinger distance, registered and then meta-learned exactly."""
    from metadistil_scale.objectives import TermKind, logits_in

    def hellinger_sum(s, t, term, mask):
        p, q = (torch.softmax(logits_in(o) / term.temperature, -1) for o in (t, s))
        return (p.sqrt() - q.sqrt()).pow(2).sum()

    monkeypatch.setitem(TERMS, "hellinger", TermKind(hellinger_sum))
    monkeypatch.setitem(REFERENCE_EXTRA, "hellinger", lambda p, q: ((p.sqrt() - q.sqrt()) ** 2).sum(-1).mean())
    got, want, _ = meta_grad_and_reference("bert", [{"kind": "hellinger", "weight": 0.6}])
    assert rel_error(got, want) <= 1e-8


def test_micro_batches_equal_one_batch():
    got, want, _ = meta_grad_and_reference("bert", OFFICIAL_MIX, parts=3)
    assert rel_error(got, want) <= 1e-8


@pytest.mark.parametrize("mix", [OFFICIAL_MIX, KL_AND_ATTENTION], ids=["pkd", "attention"])
def test_a_perturbed_cotangent_is_caught(mix, monkeypatch):
    """The negative control: the comparison fails when the hidden-state or attention-map part of w is dropped,
    or when w is off by one part in a million."""
    import metadistil_scale.losses as losses

    exact = losses.generic_cotangent
    for perturb in (lambda w: [x if i == 0 else None for i, x in enumerate(w)],  # the logits' part only
                    lambda w: [None if x is None else x * (1 + 1e-6) for x in w]):
        monkeypatch.setattr(losses, "generic_cotangent", lambda *a, perturb=perturb: perturb(exact(*a)))
        got, want, _ = meta_grad_and_reference("bert", mix)
        assert rel_error(got, want) > 1e-8


@pytest.mark.parametrize("soft,regression", [("kl", False), ("mse", False), ("kl", True)])
def test_generic_cotangent_and_loss_equal_the_fused_fast_path(soft, regression):
    g = torch.Generator().manual_seed(0)
    classes = 1 if regression else 7
    z_s, z_t, u = (torch.randn(5, classes, generator=g, dtype=torch.float64) for _ in range(3))
    labels = torch.randn(5, generator=g, dtype=torch.float64) if regression else torch.randint(0, classes, (5,))
    fast = Objective.from_config(DistillConfig(alpha=ALPHA, temperature=T, soft_loss=soft), regression)
    assert fast.fast and not fast.generic().fast
    w_fast = teacher_cotangent(z_t, u, z_s, fast, PILOT_LR, 5, labels)
    (w_generic,) = teacher_cotangent(z_t, u, z_s, fast.generic(), PILOT_LR, 5, labels)
    torch.testing.assert_close(w_generic, w_fast, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(student_loss_sum(z_s, z_t, labels, fast.generic()),
                               student_loss_sum(z_s, z_t, labels, fast), rtol=1e-12, atol=1e-14)


def test_layer_maps_follow_the_official_rules():
    assert layer_pairs("skip", 6, 12) == ((1, 2), (2, 4), (3, 6), (4, 8), (5, 10))  # teacher 2, 4, 6, 8, 10
    assert layer_pairs("last", 6, 12) == ((1, 7), (2, 8), (3, 9), (4, 10), (5, 11))
    assert layer_pairs("skip", 3, 6) == ((1, 2), (2, 4))
    assert layer_pairs("uniform", 3, 6)[-1] == (3, 6)
    with pytest.raises(ConfigError, match=r"distill.terms\[0\].layers"):
        layer_pairs(((1, 9),), 3, 6, "distill.terms[0]")


def test_attention_layer_maps_start_at_the_first_layer():
    assert layer_pairs("top", 3, 6, first=1) == ((3, 6),)
    assert layer_pairs("uniform", 3, 6, first=1) == ((1, 2), (2, 4), (3, 6))  # no embeddings: no attention map
    with pytest.raises(ConfigError, match=r"distill.terms\[2\].layers: expected \[student, teacher\] pairs in 1..3"):
        layer_pairs(((0, 0),), 3, 6, "distill.terms[2]", first=1)


def objective_outputs(objective, model, inputs):
    return model(**objective.inputs(inputs))


@pytest.mark.parametrize("kind", ["attention", "attention_mse"])
@torch.no_grad()
def test_attention_terms_read_real_tokens_only(kind):
    """A padded batch gives each row the value it has alone, unpadded: padded keys and queries are left out
    (and leaving the mask out changes the value: the check can fail)."""
    teacher, student = bert_pair()
    student.eval()
    objective = Objective.from_config(DistillConfig(terms=[DistillTermConfig(kind=kind, layers="uniform")]))
    prepare_models(objective, teacher, student)
    batch = text_batch(6, seed=1)["student"]
    padded = objective.soft_sum(objective_outputs(objective, student, batch),
                                objective_outputs(objective, teacher, batch), batch["attention_mask"])
    alone = 0.0
    for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        inputs = {k: v[row : row + 1, :n] for k, v in batch.items()}
        alone = alone + objective.soft_sum(objective_outputs(objective, student, inputs),
                                           objective_outputs(objective, teacher, inputs), inputs["attention_mask"])
    torch.testing.assert_close(padded, alone, rtol=1e-12, atol=0)
    unmasked = objective.soft_sum(objective_outputs(objective, student, batch),
                                  objective_outputs(objective, teacher, batch), None)
    assert abs(float(unmasked - alone)) > 1e-3 * abs(float(alone))


def test_attention_terms_turn_the_students_attention_dropout_off():
    """The eager attention returns its maps after dropout; with an attention term the student's maps are
    distributions in train mode, and its other dropout is untouched."""
    teacher, student = tiny_bert(4, 16, seed=0).eval(), tiny_bert(2, 12, seed=1)
    for module in student.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.5
    objective = Objective.from_config(DistillConfig(terms=[DistillTermConfig(kind="attention", layers="top")]))
    inputs = objective.inputs(text_batch(6, seed=1)["student"])
    torch.manual_seed(0)
    before = student(**inputs).attentions[-1].sum(-1)
    assert not torch.allclose(before, torch.ones_like(before))  # dropped-out maps: the check can fail
    prepare_models(objective, teacher, student)
    maps = student(**inputs)["attentions"][-1]
    torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)), rtol=1e-12, atol=1e-12)
    assert student.config.attention_probs_dropout_prob == 0.0 and student.bert.embeddings.dropout.p == 0.5


def test_attention_terms_need_as_many_heads_in_both_models():
    teacher, student = tiny_bert(4, 16, seed=0, heads=4), tiny_bert(2, 12, seed=1)
    objective = Objective.from_config(DistillConfig(terms=[DistillTermConfig(kind="kl"),
                                                           DistillTermConfig(kind="attention", layers="top")]))
    with pytest.raises(ConfigError, match=r"distill.terms\[1\].kind: expected a student with as many attention "
                                          r"heads .* got \(2, 4\)"):
        prepare_models(objective, teacher, student)


@pytest.mark.parametrize("schedule", ["lean", "fast"])
def test_attention_terms_under_activation_checkpointing_equal_without(schedule):
    """Checkpointed layers rerun in the backward: with attention terms, a MetaDistil step's teacher gradient and
    both updated models equal those without activation checkpointing."""
    from metadistil_scale.models.checkpointing import enable_activation_checkpointing

    mix = [*KL_AND_ATTENTION, {"kind": "attention_mse", "weight": 3.0, "layers": "skip"}]

    def run(checkpointing: bool, full_step: bool) -> list[torch.Tensor]:
        teacher, student = bert_pair()
        if checkpointing:
            enable_activation_checkpointing(student, "student")
            enable_activation_checkpointing(teacher, "teacher")
        step = make_step(teacher, student, mix)
        step.meta.schedule = schedule
        if full_step:
            step.step([text_batch(6, seed=1)], [text_batch(5, seed=2)])
            return [p.detach().clone() for p in [*teacher.parameters(), *student.parameters()]]
        step.accumulate_teacher_grad([text_batch(6, seed=1)], [text_batch(5, seed=2)], keep=True)
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in teacher.parameters()]

    for full_step in (False, True):
        assert rel_error(run(True, full_step), run(False, full_step)) <= 1e-12


def test_kd_with_a_teacher_cache_forwards_the_teacher_for_attention_terms(tmp_path):
    """The teacher cache keeps logits only: a KD step whose objective reads attention maps runs the teacher, and
    moves the student as it does without a cache."""
    from metadistil_scale.steps import kd_step
    from metadistil_scale.teacher_cache import TeacherCache

    distill = DistillConfig(alpha=ALPHA, temperature=T, terms=[DistillTermConfig(kind="kl", weight=0.5),
                                                               DistillTermConfig(kind="attention", layers="top")])
    sgd = OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=None)
    students = []
    for cache in (None, TeacherCache(tmp_path)):
        teacher, student = bert_pair()
        start = [p.detach().clone() for p in student.parameters()]
        prepare_models(Objective.from_config(distill), teacher, student)
        kd_step(TorchModel(teacher, sgd, 100), TorchModel(student, sgd, 100), [text_batch(6, seed=1)], distill,
                False, cache)
        students.append([p.detach().clone() for p in student.parameters()])
    assert not all(torch.equal(a, b) for a, b in zip(start, students[1]))
    assert all(torch.equal(a, b) for a, b in zip(*students))


def test_layer_maps_of_models_unknown_at_config_time_are_checked_once_built():
    """A hub name outside the cache: the config cannot be checked against its layers; the check runs when the
    models are built, before any training step, and says so."""
    cfg = load_config(None, ["model.teacher=nobody/not-in-the-cache", "distill.terms=[{kind: pkd, layers: [[1, 9]]}]"])
    teacher, student = bert_pair()
    with pytest.raises(ConfigError, match=r"distill.terms\[0\].layers: expected .* for a 2-layer student and a "
                                          r"4-layer teacher \(checked once the models were built"):
        prepare_models(Objective.from_config(cfg.distill), teacher, student)


def test_terms_from_yaml_and_errors_name_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"distill": {"alpha": 0.5, "terms": OFFICIAL_MIX}}))
    cfg = load_config(recipe)
    objective = Objective.from_config(cfg.distill)
    assert not objective.fast and objective.reads_hidden and objective.terms[1].layers == "skip"
    assert Objective.from_config(load_config().distill).fast  # the default objective keeps the fused path
    for override, key in (("distill.terms=[{kind: nope}]", "distill.terms[0].kind"),
                          ("distill.terms=[{kind: jsd, beta: 1.5}]", "distill.terms[0].beta"),
                          ("distill.terms=[{kind: pkd, layers: middle}]", "distill.terms[0].layers"),
                          ("distill.terms=[{kind: mse, normalization: mean}]", "distill.terms[0].normalization")):
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            load_config(None, [override])
    assert set(TERMS) >= {"kl", "mse", "reverse_kl", "jsd", "pkd", "hidden_mse", "cosine"}


def test_hidden_terms_on_an_image_task_or_a_causal_lm_are_refused_before_any_work():
    from metadistil_scale.lm.recipe import load_lm_config

    pkd = "distill.terms=[{kind: kl, weight: 0.5}, {kind: pkd, weight: 100}]"
    with pytest.raises(ConfigError, match=r"distill.terms\[1\].kind: expected a logit term \(the CNNs"):
        load_config("fashion_mnist", [pkd])
    with pytest.raises(ConfigError, match=r"distill.terms\[1\].kind: expected a logit term \(a causal LM"):
        load_lm_config(None, [pkd])
    assert load_lm_config(None, ["distill.terms=[{kind: jsd, weight: 0.5}]"]).distill.terms[0].kind == "jsd"


def test_hidden_terms_refuse_a_cnn_with_the_key():
    teacher, student = cnn_pair()
    objective = Objective.from_config(DistillConfig(terms=[DistillTermConfig(kind="pkd")]))
    with pytest.raises(ConfigError, match="distill.terms"):
        prepare_models(objective, teacher, student)


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"])
def test_glue_configs_carry_the_official_objective(task):
    cfg = load_config(f"glue_{task}")
    soft, pkd = cfg.distill.terms
    assert (cfg.distill.alpha, cfg.distill.temperature, soft.weight) == (0.5, 5.0, 0.5)
    assert (soft.kind, soft.normalization) == (("score_mse", "sum") if task == "stsb" else ("mse", "official"))
    assert (pkd.kind, pkd.weight, pkd.layers) == ("pkd", 100.0, "skip")
    student, teacher = cfg.student_train.optim, cfg.meta.teacher_optim
    assert (student.lr, student.weight_decay, student.warmup_ratio, student.max_grad_norm) == (5e-5, 0.0, 0.0, 1.0)
    assert (teacher.lr, teacher.max_grad_norm, cfg.meta.pilot_lr) == (1e-5, 1.0, 5e-5)
    assert (cfg.student_train.batch_size, cfg.student_train.epochs, cfg.data.max_length) == (8, 3.0, 128)
    assert not cfg.meta.quiz_train_mode and cfg.meta.teacher_ce_weight == 0
    assert layer_pairs(pkd.layers, 6, 12) == ((1, 2), (2, 4), (3, 6), (4, 8), (5, 10))


def test_quiz_forward_without_dropout_when_asked():
    """meta.quiz_train_mode=false: the quiz loss and its gradient are those of the student in eval mode (no
    dropout), whatever the random state, and the student is left in train mode."""
    results = []
    for seed in (1, 2):
        teacher, student = tiny_bert(4, 16, seed=0).eval(), tiny_bert(2, 12, seed=1)
        student.config.hidden_dropout_prob = 0.3
        for module in student.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.3
        step = make_step(teacher, student, [SINGLE_TERMS["kl"]])
        step.meta.quiz_train_mode = False
        torch.manual_seed(seed)
        params = {k: p.detach() for k, p in step.student.trainable().items()}
        loss, grad = step._quiz_loss_and_grad(params, [text_batch(5, seed=2)], want_grad=True)
        assert student.training
        results.append((loss, grad))
    student.eval()
    want = F.cross_entropy(student(**text_batch(5, seed=2)["student"]).logits, text_batch(5, seed=2)["labels"])
    assert results[0][0] == pytest.approx(want.item(), rel=1e-12) and results[1][0] == results[0][0]


def test_the_whole_quiz_set_in_micro_batches_equals_one_quiz_batch_holding_it(monkeypatch):
    """meta.quiz_whole_set: the trainer's quiz stream gives every quiz row once per teacher update, in
    micro-batches of meta.quiz_batch_size (4, 4, 4, 1), and the teacher's gradient equals that of one quiz batch
    holding the whole set. Negative controls: one quiz batch (the default mode) and a quiz loss divided by
    micro-batches × their size give other gradients."""
    import _ds_worker

    import metadistil_scale.meta as meta
    from metadistil_scale.data.text import TaskInfo
    from metadistil_scale.methods import get_method
    from metadistil_scale.trainer import Task, _step_context

    quiz = _ds_worker.Rows(13, seed=2)
    task = Task({"quiz": quiz}, TaskInfo("quiz", NUM_LABELS, False, "accuracy", None, False), quiz.collate)
    cfg = load_config(None, ["meta.quiz_whole_set=true", "meta.quiz_batch_size=4", "meta.pilot_lr=0.5",
                             "meta.teacher_ce_weight=0", "distill.temperature=2.0"])
    train = split(text_batch(6, seed=1), 2)

    def teacher_grad(quiz_parts=None):
        teacher, student = bert_pair()
        ctx = _step_context(get_method("metadistil"), cfg, task, "student_train", "student", 10, student, teacher,
                            torch.device("cpu"))
        quiz_parts = ctx.quiz_stream(0) if quiz_parts is None else quiz_parts
        ctx.metadistil.accumulate_teacher_grad(train, quiz_parts)
        return [p.grad.clone() for p in teacher.parameters()], quiz_parts

    got, parts = teacher_grad()
    assert [len(p["labels"]) for p in parts] == [4, 4, 4, 1]
    rows = sorted(tuple(r) for p in parts for r in p["student"]["input_ids"].tolist())
    assert rows == sorted(tuple(r) for r in quiz.ids.tolist())
    whole, _ = teacher_grad([quiz.collate(list(range(13)))])
    assert rel_error(got, whole) <= 1e-11
    one_batch, _ = teacher_grad(parts[:1])
    assert rel_error(one_batch, whole) > 1e-3
    monkeypatch.setattr(meta, "count_rows", lambda parts, model: len(parts) * len(parts[0]["labels"]))
    per_micro_batch, _ = teacher_grad()
    assert rel_error(per_micro_batch, whole) > 1e-3


@pytest.mark.slow
def test_training_with_the_official_objective_and_the_whole_quiz_set(tmp_path):
    """The recipe end to end with PKD + official mse, the whole quiz set per teacher update, no quiz dropout."""
    from test_trainer import save_tiny_bert, tiny_config

    from metadistil_scale.trainer import train

    teacher = save_tiny_bert(tmp_path / "teacher", 4, 2, seed=0)
    student = save_tiny_bert(tmp_path / "student", 4, 2, seed=1)
    cfg = tiny_config(tmp_path / "run", teacher, student, "model.student_layers=2", "student_train.max_steps=3",
                      "methods=[metadistil]", "eval_every=3", "data.quiz_fraction=0.002",  # ~24 quiz rows
                      "distill.terms=[{kind: mse, weight: 0.5, normalization: official}, {kind: pkd, weight: 100}]",
                      "meta.quiz_whole_set=true", "meta.quiz_train_mode=false", "meta.quiz_batch_size=4")
    results = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metadistil" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("teacher_updated") for r in records)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert results["rows"][-1]["method"] == "metadistil"


@pytest.mark.slow
def test_training_with_an_attention_term(tmp_path):
    """The trainer end to end with KL and MiniLM's attention transfer: the maps come from the real tokenizer's
    padded batches, the student's attention dropout is turned off (its saved config says so)."""
    from test_trainer import save_tiny_bert, tiny_config

    from metadistil_scale.trainer import train

    teacher = save_tiny_bert(tmp_path / "teacher", 2, 2, seed=0)
    student = save_tiny_bert(tmp_path / "student", 2, 2, seed=1)
    config_file = student / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "attention_probs_dropout_prob": 0.3}))
    cfg = tiny_config(tmp_path / "run", teacher, student, "student_train.max_steps=3", "methods=[metadistil]",
                      "eval_every=3", "distill.terms=[{kind: kl, weight: 0.5}, {kind: attention, weight: 1, layers: top}]")
    results = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metadistil" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("teacher_updated") for r in records)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    saved = json.loads((tmp_path / "run" / "metadistil" / "student" / "config.json").read_text())
    assert saved["attention_probs_dropout_prob"] == 0.0 and results["rows"][-1]["method"] == "metadistil"


# ---------------------------------------------------------------- causal LMs: reverse KL and JSD, chunked


def lm_reference_soft_sum(kind: str, z_s, z_t, labels, beta=0.3):
    """Σ over labelled tokens of T²·KL(q ‖ p) or T²·JSD_β, from the definitions."""
    valid = labels != -100
    log_q, log_p = _log_probs(z_s[valid], z_t[valid])
    p, q = log_p.exp(), log_q.exp()
    if kind == "reverse_kl":
        return T**2 * F.kl_div(log_p, log_q, log_target=True, reduction="sum")
    m = beta * p + (1 - beta) * q
    return T**2 * (beta * (p * (p.log() - m.log())) + (1 - beta) * (q * (q.log() - m.log()))).sum()


def lm_reference_teacher_grad(teacher, student, train, quiz, kind):
    from test_lm import full_logits

    params = dict(student.named_parameters())
    z_t, z_s = full_logits(teacher, train["teacher"]), full_logits(student, train["student"], params)
    labels = train["labels"].reshape(-1)
    n = int((labels != -100).sum())
    loss = (ALPHA * F.cross_entropy(z_s, labels, reduction="sum") + 0.6 * lm_reference_soft_sum(kind, z_s, z_t, labels)
            ) / n
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    pilot = {k: p - PILOT_LR * g for (k, p), g in zip(params.items(), grads)}
    z_q = full_logits(student, quiz["student"], pilot)
    meta_loss = F.cross_entropy(z_q, quiz["labels"].reshape(-1))
    grads = torch.autograd.grad(meta_loss, list(teacher.parameters()), allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, teacher.parameters())]


@pytest.mark.parametrize("kind,u_mode,tol,chunk_rows,materialize", [
    ("reverse_kl", "jvp", 1e-8, 5, False), ("reverse_kl", "finite-difference", 1e-5, 5, False),
    ("jsd", "jvp", 1e-8, 5, False), ("jsd", "unrolled", 1e-10, 5, False), ("jsd", "jvp", 1e-8, None, True)])
def test_lm_chunked_reverse_kl_and_jsd_meta_gradient_equal_unrolled(kind, u_mode, tol, chunk_rows, materialize,
                                                                    monkeypatch):
    import test_lm
    from transformers.models.llama import modeling_llama

    from metadistil_scale.lm.models import CausalLMHead

    # Llama's norm and softmax in float64, as in test_lm
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", test_lm._rms_norm)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", test_lm._eager_attention)
    teacher, student = test_lm.pair()
    train, quiz = test_lm.batch("padded", 6, seed=1), test_lm.batch("padded", 4, seed=2)
    want = lm_reference_teacher_grad(teacher, student, train, quiz, kind)
    sgd = OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=None)
    wrap = {"chunk_rows": chunk_rows, "materialize": materialize}
    distill = DistillConfig(alpha=ALPHA, temperature=T, terms=[DistillTermConfig(kind=kind, weight=0.6, beta=0.3)])
    meta = MetaConfig(pilot_lr=PILOT_LR, u_mode=u_mode, fd_epsilon=1e-5, teacher_ce_weight=0.0)
    step = MetaDistil(TorchModel(CausalLMHead(teacher, **wrap), sgd, 100),
                      TorchModel(CausalLMHead(student, **wrap), sgd, 100), distill, meta)
    step.accumulate_teacher_grad([train], [quiz])
    got = [p.grad if p.grad is not None else torch.zeros_like(p) for p in teacher.parameters()]
    assert rel_error(got, want) <= tol


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["official", "attention"])
def test_two_ranks_with_the_teacher_at_zero3_equal_one_process(objective, tmp_path):
    """The official objective (PKD included) or KL with attention-map terms, data-parallel over 2 ranks with the
    teacher sharded (ZeRO-3), against one process."""
    import subprocess
    import sys
    from pathlib import Path

    from test_deepspeed import _torchrun

    worker = str(Path(__file__).parent / "_objective_worker.py")
    for cmd in (_torchrun(worker, str(tmp_path / "two.pt"), objective),
                [sys.executable, worker, str(tmp_path / "one.pt"), objective]):
        subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    import _ds_worker

    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    for role, start in zip(("teacher", "student"), _ds_worker.initial_models("metadistil")):
        got, want = torch.cat([p.reshape(-1) for p in two[role]]), torch.cat([p.reshape(-1) for p in one[role]])
        moved = want - torch.cat([p.detach().double().reshape(-1) for p in start.parameters()])
        assert float(moved.norm()) > 0
        assert float((got - want).norm() / moved.norm()) < 1e-5  # float32 sums in another order
