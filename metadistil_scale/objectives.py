"""A distillation objective as one typed object: the hard loss, the soft terms with their weights, and what each
model must return for them (logits; hidden states or attention maps at the layers a layer map names).

The student's loss on a batch is, summed over rows (the caller divides by the global row count):

    hard_weight · hard(z_s, y) + Σ_k weight_k · term_k(O_s, O_t)

`distill.alpha/temperature/soft_loss` alone describe today's objective, α·hard + (1−α)·soft; it keeps the fused
kernels and the closed-form meta cotangent (the fast path, `Objective.legacy`). `distill.terms` lists any mix
of the registered terms; the MetaDistil step then gets the teacher's cotangent by a double backward through the
loss function alone (`generic_cotangent`, docs/metagrad.md §3).

Adding a loss: write `def my_term(s, t, term, mask) -> Tensor` returning the term summed over rows, and add
`"my_term": TermKind(my_term)` (with `reads_hidden=True` when it reads hidden states, `reads_attentions=True`
when it reads attention maps, `softmax=True` when it reads the softmax of the logits) to TERMS.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from metadistil_scale.config import (
    IMAGE_TASKS,
    Config,
    ConfigError,
    DistillConfig,
    DistillTermConfig,
    require,
)

# A model's outputs for the objective: {"logits": [N, C], "hidden": (h_0, …, h_L)} and, for a student that owns
# a projection to the teacher's width, "projected": (P h_0, …, P h_L); "attentions": (A_1, …, A_L), each
# [N, heads, L_q, L_k], when a term reads attention maps. A plain tensor when only logits are read.
Outputs = dict[str, Any]
LAYER_MAPS = ("skip", "last", "uniform", "top")
NORMALIZATIONS = ("sum", "official")
PROJECTION_NAME = "distill_projection"


@dataclass(frozen=True)
class Term:
    """One resolved term: its kind, weight and settings (the temperature filled in from distill.temperature)."""

    kind: str
    weight: float
    temperature: float = 1.0
    layers: str | tuple[tuple[int, int], ...] = "skip"
    beta: float = 0.5
    normalization: str = "sum"
    where: str = "distill.terms"  # the config key, for error messages


TermLoss = Callable[[Outputs, Outputs, Term, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class TermKind:
    loss: TermLoss  # (student outputs, teacher outputs, term, attention mask [N, L] or None) -> sum over rows
    reads_hidden: bool = False
    reads_attentions: bool = False
    softmax: bool = False  # reads softmax(logits): a regression's single output has none to distil

    @property
    def reads_layers(self) -> bool:
        """Reads per-layer outputs, at the layers its layer map names."""
        return self.reads_hidden or self.reads_attentions

    @property
    def first_layer(self) -> int:
        """The lowest index a layer map may name: hidden states count the embeddings as 0, attention maps
        start at the first transformer layer."""
        return 1 if self.reads_attentions else 0


# ---------------------------------------------------------------- logit terms


def _log_probs(s: Outputs, t: Outputs, term: Term) -> tuple[torch.Tensor, torch.Tensor]:
    """log q = log softmax(z_s/T), log p = log softmax(z_t/T)."""
    return F.log_softmax(logits_in(s) / term.temperature, -1), F.log_softmax(logits_in(t) / term.temperature, -1)


def kl_sum(s: Outputs, t: Outputs, term: Term, mask: torch.Tensor | None) -> torch.Tensor:
    """T²·KL(p ‖ q): the `kl` soft loss."""
    log_q, log_p = _log_probs(s, t, term)
    return term.temperature**2 * (log_p.exp() * (log_p - log_q)).sum()


def reverse_kl_sum(s: Outputs, t: Outputs, term: Term, mask: torch.Tensor | None) -> torch.Tensor:
    """T²·KL(q ‖ p): mode-seeking, as used for LM distillation."""
    log_q, log_p = _log_probs(s, t, term)
    return term.temperature**2 * (log_q.exp() * (log_q - log_p)).sum()


def jsd_sum(s: Outputs, t: Outputs, term: Term, mask: torch.Tensor | None) -> torch.Tensor:
    """T²·[β·KL(p ‖ m) + (1−β)·KL(q ‖ m)], m = β·p + (1−β)·q: the generalized JSD of GKD."""
    log_q, log_p = _log_probs(s, t, term)
    beta = term.beta
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    jsd = beta * log_p.exp() * (log_p - log_m) + (1 - beta) * log_q.exp() * (log_q - log_m)
    return term.temperature**2 * jsd.sum()


def mse_sum(s: Outputs, t: Outputs, term: Term, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ_c (q − p)² per row ("sum", the `mse` soft loss), or T²·mean_c (q − p)² ("official": F.mse_loss over
    all N·C elements times T², once the caller divides by N)."""
    log_q, log_p = _log_probs(s, t, term)
    squares = (log_q.exp() - log_p.exp()).pow(2).sum()
    if term.normalization == "official":
        return squares * term.temperature**2 / log_q.shape[-1]
    return squares


def score_mse_sum(s: Outputs, t: Outputs, term: Term, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ (z_s − z_t)² on the raw outputs: the soft loss of a regression task."""
    return (logits_in(s) - logits_in(t)).pow(2).sum()


# ---------------------------------------------------------------- hidden-state terms


def pkd_sum(s: Outputs, t: Outputs, term: Term, mask: torch.Tensor | None) -> torch.Tensor:
    """Patient KD: the squared distance of the L2-normalised [CLS] states, a mean over matched layers and
    hidden units per row (the official code's F.mse_loss over layers·N·H, once the caller divides by N)."""
    total = 0.0
    pairs = _matched(s, t, term, "hidden")
    for h_s, h_t in pairs:
        cls_s, cls_t = h_s[:, 0], h_t[:, 0]
        cls_s = cls_s / cls_s.norm(dim=-1, keepdim=True)
        cls_t = cls_t / cls_t.norm(dim=-1, keepdim=True)
        total = total + (cls_s - cls_t).pow(2).sum() / cls_t.shape[-1]
    return total / len(pairs)


def hidden_mse_sum(s: Outputs, t: Outputs, term: Term, mask: torch.Tensor | None) -> torch.Tensor:
    """TinyBERT-style: the squared distance of (projected) hidden states, a mean over matched layers, the row's
    real tokens and hidden units."""
    pairs = _matched(s, t, term, "hidden")
    total = 0.0
    for h_s, h_t in pairs:
        per_token = (h_s - h_t).pow(2).sum(-1) / h_t.shape[-1]
        total = total + (per_token * _token_weights(mask, per_token)).sum()
    return total / len(pairs)


def cosine_sum(s: Outputs, t: Outputs, term: Term, mask: torch.Tensor | None) -> torch.Tensor:
    """1 − cos(h_s, h_t) of (projected) hidden states, a mean over matched layers and the row's real tokens."""
    pairs = _matched(s, t, term, "hidden")
    total = 0.0
    for h_s, h_t in pairs:
        per_token = 1 - F.cosine_similarity(h_s, h_t, dim=-1)
        total = total + (per_token * _token_weights(mask, per_token)).sum()
    return total / len(pairs)


# ---------------------------------------------------------------- attention-map terms


def attention_kl_sum(s: Outputs, t: Outputs, term: Term, mask: torch.Tensor | None) -> torch.Tensor:
    """MiniLM: KL(teacher ‖ student) of each head's attention distribution over the real keys, a mean over
    matched layers, heads and the row's real query tokens."""
    return _attention_mean(s, t, term, mask, _kl_over_keys)


def attention_mse_sum(s: Outputs, t: Outputs, term: Term, mask: torch.Tensor | None) -> torch.Tensor:
    """TinyBERT-style: the squared distance of the attention probabilities, summed over the real keys, a mean
    over matched layers, heads and the row's real query tokens."""
    return _attention_mean(s, t, term, mask, _squares_over_keys)


def _kl_over_keys(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Σ_k p log(p/q) over the last dimension. Masked keys have p = q = 0: xlogy and the clamp keep them at 0
    instead of 0·(−inf); the clamp is the identity (gradient 1) wherever q is a normal number."""
    return (torch.xlogy(p, p) - p * q.clamp_min(torch.finfo(q.dtype).tiny).log()).sum(-1)


def _squares_over_keys(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return (q - p).pow(2).sum(-1)


def _attention_mean(s: Outputs, t: Outputs, term: Term, mask: torch.Tensor | None,
                    distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    total = 0.0
    pairs = _matched(s, t, term, "attentions")
    for a_s, a_t in pairs:
        if a_s.shape != a_t.shape:
            raise ValueError(f"{term.where}: attention maps of shape {tuple(a_s.shape)} (student) and "
                             f"{tuple(a_t.shape)} (teacher): the models must share heads and tokenizer")
        if mask is not None:  # padded keys carry no probability to compare
            keys = mask[:, None, None, :].to(a_s.dtype)
            a_s, a_t = a_s * keys, a_t * keys
        per_query = distance(a_s, a_t).mean(1)  # [N, L_q]: a mean over heads
        total = total + (per_query * _token_weights(mask, per_query)).sum()
    return total / len(pairs)


TERMS: dict[str, TermKind] = {
    "kl": TermKind(kl_sum, softmax=True),
    "mse": TermKind(mse_sum, softmax=True),
    "reverse_kl": TermKind(reverse_kl_sum, softmax=True),
    "jsd": TermKind(jsd_sum, softmax=True),
    "score_mse": TermKind(score_mse_sum),
    "pkd": TermKind(pkd_sum, reads_hidden=True),
    "hidden_mse": TermKind(hidden_mse_sum, reads_hidden=True),
    "cosine": TermKind(cosine_sum, reads_hidden=True),
    "attention": TermKind(attention_kl_sum, reads_attentions=True),
    "attention_mse": TermKind(attention_mse_sum, reads_attentions=True),
}


def logits_in(o: Outputs | torch.Tensor) -> torch.Tensor:
    """The logits of a model's outputs (the outputs themselves when only logits were asked for)."""
    return o["logits"] if isinstance(o, dict) else o


def _token_weights(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """1/(real tokens of the row) on real tokens, 0 on padding: a per-row mean over tokens."""
    if mask is None:
        return torch.full_like(like, 1.0 / like.shape[-1])
    mask = mask.to(like.dtype)
    return mask / mask.sum(-1, keepdim=True).clamp(min=1.0)


def _matched(s: Outputs, t: Outputs, term: Term, key: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student, teacher) outputs per matched layer: hidden states (the student's projected ones where it owns
    a projection to the teacher's width), or attention maps (attentions[i − 1] is layer i's)."""
    if not (isinstance(s, dict) and key in s and isinstance(t, dict) and key in t):
        raise ValueError(f"{term.where}: the term needs the models' {key}: build the models with "
                         "objectives.prepare_models and forward them with Objective.inputs")
    if key == "hidden":
        pairs = layer_pairs(term.layers, len(s["hidden"]) - 1, len(t["hidden"]) - 1, term.where)
        return [(s.get("projected", s["hidden"])[i], t["hidden"][j]) for i, j in pairs]
    pairs = layer_pairs(term.layers, len(s[key]), len(t[key]), term.where, first=1)
    return [(s[key][i - 1], t[key][j - 1]) for i, j in pairs]


def layer_pairs(layers: str | tuple[tuple[int, int], ...], student_layers: int, teacher_layers: int,
                where: str = "distill.terms", first: int = 0, known_from: str = "") -> tuple[tuple[int, int], ...]:
    """(student, teacher) layer indices: transformers' hidden_states for first=0 (0 = the embeddings, L = the
    last layer), transformer layers 1…L for first=1 (attention maps).

    skip:    student layers 1…L_s−1 against teacher layers k, 2k, …, k = L_t // L_s (the official code's
             hidden_states[1:-1][(k−1)::k]: teacher layers 2, 4, 6, 8, 10 for 12 → 6);
    last:    student layers 1…L_s−1 against the teacher's last L_s−1 layers before its top one;
    uniform: student layers first…L_s (the embeddings too for hidden states) against first·k, …, L_s·k;
    top:     the student's last layer against the teacher's (MiniLM's attention transfer).
    `known_from` says where the layer counts came from, for the error.
    """
    k = teacher_layers // student_layers
    if not isinstance(layers, str):
        pairs = tuple((int(a), int(b)) for a, b in layers)
    elif layers == "uniform":
        pairs = tuple((i, k * i) for i in range(first, student_layers + 1))
    elif layers == "skip":
        pairs = tuple((i, k * i) for i in range(1, student_layers))
    elif layers == "top":
        pairs = ((student_layers, teacher_layers),)
    else:
        pairs = tuple((i, teacher_layers - student_layers + i) for i in range(1, student_layers))
    models = f"a {student_layers}-layer student and a {teacher_layers}-layer teacher{known_from}"
    if k < 1 or not pairs:
        raise ConfigError(f"{where}.layers: expected a layer map that matches layers of {models}, got {layers!r}")
    for a, b in pairs:
        if not (first <= a <= student_layers and first <= b <= teacher_layers):
            raise ConfigError(f"{where}.layers: expected [student, teacher] pairs in {first}..{student_layers} and "
                              f"{first}..{teacher_layers} for {models}, got [{a}, {b}]")
    return pairs


# ---------------------------------------------------------------- the objective


@dataclass(frozen=True)
class Objective:
    """The student's distillation loss: the hard loss ("ce", or "mse" for a regression) and the soft terms."""

    hard: str
    hard_weight: float
    terms: tuple[Term, ...]
    # Set for today's alpha/temperature/soft_loss objective: the fused kernels and closed-form cotangents run it.
    legacy: DistillConfig | None = None

    @classmethod
    def from_config(cls, cfg: DistillConfig, regression: bool = False) -> Objective:
        hard = "mse" if regression else "ce"
        if not cfg.terms:
            soft = "score_mse" if regression else cfg.soft_loss
            term = Term(soft, 1 - cfg.alpha, cfg.temperature, where="distill.soft_loss")
            return cls(hard, cfg.alpha, (term,), legacy=cfg)
        terms = tuple(
            Term(t.kind, t.weight, cfg.temperature if t.temperature is None else t.temperature,
                 t.layers if isinstance(t.layers, str) else tuple(tuple(p) for p in t.layers),
                 t.beta, t.normalization, where=f"distill.terms[{i}]")
            for i, t in enumerate(cfg.terms)
        )
        if regression:
            require_regression_terms(terms)
        return cls(hard, cfg.alpha, terms)

    @property
    def fast(self) -> bool:
        return self.legacy is not None

    def generic(self) -> Objective:
        """The same objective on the generic path (to check the fast path against it)."""
        return dataclasses.replace(self, legacy=None)

    @property
    def reads_hidden(self) -> bool:
        return any(TERMS[t.kind].reads_hidden for t in self.terms if t.weight > 0)

    @property
    def reads_attentions(self) -> bool:
        return any(TERMS[t.kind].reads_attentions for t in self.terms if t.weight > 0)

    @property
    def reads_layers(self) -> bool:
        return self.reads_hidden or self.reads_attentions

    def inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A model's inputs, asking for its hidden states or attention maps only when a term reads them."""
        if self.reads_hidden:
            inputs = {**inputs, "output_hidden_states": True}
        if self.reads_attentions:
            inputs = {**inputs, "output_attentions": True}
        return inputs

    def soft_sum(self, s: Outputs, t: Outputs, mask: torch.Tensor | None) -> torch.Tensor:
        """Σ_k weight_k · term_k, summed over rows; terms of weight 0 are left out."""
        total = logits_in(s).new_zeros(())
        for term in self.terms:
            if term.weight > 0:
                total = total + term.weight * TERMS[term.kind].loss(s, t, term, mask)
        return total


def attention_mask(inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    return inputs.get("attention_mask")


# ---------------------------------------------------------------- the generic meta cotangent

Cotangent = list  # one entry per leaf of the teacher's outputs (tree_flatten order): a tensor, or None if unread


def generic_cotangent(objective: Objective, student: Outputs, teacher: Outputs, tangent: Outputs,
                      mask: torch.Tensor | None, scale: float) -> Cotangent:
    """w = −scale · ∂/∂O_t ⟨∂soft/∂O_s, U⟩ for every teacher output, by a double backward through the loss
    function alone (O_s, O_t detached leaves: the cost is the size of the outputs). scale = λ/N. The hard loss
    does not involve the teacher and adds nothing."""
    s_leaves, s_spec = tree_flatten(student)
    t_leaves, t_spec = tree_flatten(teacher)
    u_leaves, _ = tree_flatten(tangent)
    s_vars = [x.detach().requires_grad_(True) for x in s_leaves]
    t_vars = [x.detach().requires_grad_(True) for x in t_leaves]
    with torch.enable_grad():
        soft = objective.soft_sum(tree_unflatten(s_vars, s_spec), tree_unflatten(t_vars, t_spec), mask)
        grads = torch.autograd.grad(soft, s_vars, create_graph=True, allow_unused=True)
        inner = sum((g * u.detach()).sum() for g, u in zip(grads, u_leaves) if g is not None)
        if not isinstance(inner, torch.Tensor) or not inner.requires_grad:
            return [None] * len(t_vars)
        w = torch.autograd.grad(inner, t_vars, allow_unused=True)
    return [None if g is None else -scale * g for g in w]


def contract_generic(teacher: Outputs, cotangent: Cotangent) -> torch.Tensor:
    """Σ⟨O_t, w⟩ over the teacher outputs that have a cotangent: its backward gives J_tᵀ w."""
    leaves, _ = tree_flatten(teacher)
    return sum((o * w).sum() for o, w in zip(leaves, cotangent) if w is not None)


def detach_outputs(outputs: Outputs | torch.Tensor) -> Outputs | torch.Tensor:
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, outputs)


# ---------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelShape:
    """What the layer maps are checked against: a transformer's layer and attention-head counts."""

    layers: int
    heads: int | None


def prepare_models(objective: Objective, teacher: nn.Module, student: nn.Module) -> None:
    """Make both models return what the objective reads. For per-layer terms: a forward hook turns a
    transformers output that carries hidden states or attention maps into an Outputs dict; for hidden-state
    terms a student narrower than its teacher gets a linear projection to the teacher's width (its own trained
    parameters, TinyBERT style); for attention terms the student's attention dropout is turned off.
    Call right after the models are built, before the student's optimizer and any training step: checks the
    layer maps against the models."""
    if not objective.reads_layers:
        return
    student_shape, teacher_shape = built_shape(student, "student"), built_shape(teacher, "teacher")
    check_layer_maps(objective.terms, student_shape, teacher_shape,
                     " (checked once the models were built, before any training step)")
    if objective.reads_hidden:
        _add_projection(teacher, student)
    if objective.reads_attentions:
        _attention_dropout_off(student)
    for model in (teacher, student):
        if not getattr(model, "_distill_outputs_hook", False):
            model.register_forward_hook(_objective_outputs, with_kwargs=True)
            model._distill_outputs_hook = True


def built_shape(model: nn.Module, role: str) -> ModelShape:
    config = getattr(model, "config", None)
    require(hasattr(config, "hidden_size"), "distill.terms", "per-layer terms only with transformers models",
            f"{role} {type(model).__name__}")
    return ModelShape(config.num_hidden_layers, getattr(config, "num_attention_heads", None))


def check_layer_maps(terms: tuple[Term, ...], student: ModelShape, teacher: ModelShape, known_from: str) -> None:
    """Every per-layer term's map fits the models; an attention term compares maps head by head, so both models
    need as many heads."""
    for term in terms:
        kind = TERMS[term.kind]
        if not kind.reads_layers:
            continue
        layer_pairs(term.layers, student.layers, teacher.layers, term.where, kind.first_layer, known_from)
        if kind.reads_attentions:
            require(student.heads == teacher.heads, f"{term.where}.kind", "a student with as many attention heads "
                    f"as its teacher for {term.kind!r} (student, teacher{known_from})", (student.heads, teacher.heads))


def _add_projection(teacher: nn.Module, student: nn.Module) -> None:
    width_s, width_t = student.config.hidden_size, teacher.config.hidden_size
    if width_s != width_t and not hasattr(student, PROJECTION_NAME):
        param = next(student.parameters())
        student.add_module(PROJECTION_NAME, nn.Linear(width_s, width_t).to(param.device, param.dtype))


def _attention_dropout_off(student: nn.Module) -> None:
    """The eager attention hands back its probabilities after dropout (zeros and 1/(1−p) factors: no longer
    distributions), so an attention term needs the student's attention dropout off. BERT-family attention
    modules read `dropout.p` at every forward."""
    modules = [m for m in student.modules()
               if hasattr(m, "attention_head_size") and isinstance(getattr(m, "dropout", None), nn.Dropout)]
    for module in modules:
        module.dropout.p = 0.0
    config = student.config
    rate = getattr(config, "attention_probs_dropout_prob", None) or getattr(config, "attention_dropout", 0.0)
    require(bool(modules) or not rate, "distill.terms", "a student whose attention dropout can be turned off for "
            "attention terms (BERT-family attention modules)", type(student).__name__)
    if hasattr(config, "attention_probs_dropout_prob"):
        config.attention_probs_dropout_prob = 0.0  # what the saved student's config says


def _objective_outputs(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """A forward asked for hidden states or attention maps (Objective.inputs): hand back the Outputs dict;
    otherwise (evaluation, the quiz) leave the output alone. Runs inside functional_call too, so the
    projection's functional parameters are the ones used."""
    hidden = getattr(output, "hidden_states", None)
    attentions = getattr(output, "attentions", None)
    if hidden is None and attentions is None:
        return None
    outputs = {"logits": output.logits}
    if hidden is not None:
        outputs["hidden"] = tuple(hidden)
        projection = getattr(module, PROJECTION_NAME, None)
        if projection is not None:
            outputs["projected"] = tuple(projection(h) for h in hidden)
    if attentions is not None:
        outputs["attentions"] = tuple(attentions)
    return outputs


def config_shape(source: str, keep_layers: int | None = None) -> ModelShape | None:
    """A text model's layer and head counts from its config file, when that file is on this machine (a folder,
    the embedded MiniLM, the hub's cache); None otherwise. A student keeps its first `keep_layers` layers."""
    from transformers import AutoConfig

    from metadistil_scale.models.text import resolve_source

    try:
        config = AutoConfig.from_pretrained(resolve_source(source), local_files_only=True)
    except (OSError, ValueError):  # not here (a hub name outside the cache), or no model config
        return None
    layers = getattr(config, "num_hidden_layers", None)
    if layers is None:
        return None
    return ModelShape(min(keep_layers or layers, layers), getattr(config, "num_attention_heads", None))


# ---------------------------------------------------------------- config validation


def validate_term(term: DistillTermConfig, key: str) -> None:
    require(term.kind in TERMS, f"{key}.kind", f"one of {tuple(TERMS)}", term.kind)
    require(term.weight >= 0, f"{key}.weight", ">= 0", term.weight)
    require(term.temperature is None or 0.05 <= term.temperature <= 100, f"{key}.temperature",
            "in [0.05, 100] or null", term.temperature)
    require(0 < term.beta < 1, f"{key}.beta", "in (0, 1)", term.beta)
    require(term.normalization in NORMALIZATIONS, f"{key}.normalization", f"one of {NORMALIZATIONS}",
            term.normalization)
    if isinstance(term.layers, str):
        require(term.layers in LAYER_MAPS, f"{key}.layers", f"one of {LAYER_MAPS} or [[student, teacher], ...]",
                term.layers)
    else:
        require(len(term.layers) > 0 and all(len(p) == 2 and min(p) >= 0 for p in term.layers), f"{key}.layers",
                "a non-empty list of [student_layer, teacher_layer] pairs", term.layers)


def require_logit_terms(distill: DistillConfig, why: str, key: str = "distill") -> None:
    """Models that give no hidden states to distil (CNNs; a causal LM here) take logit terms only."""
    for i, term in enumerate(distill.terms):
        require(not TERMS[term.kind].reads_layers, f"{key}.terms[{i}].kind", f"a logit term ({why})", term.kind)


def require_regression_terms(terms: tuple[Term, ...]) -> None:
    """A regression's single output has no softmax to distil: kl, mse, reverse_kl and jsd would be 0."""
    for term in terms:
        require(not TERMS[term.kind].softmax, f"{term.where}.kind", "a term for a regression's single output "
                "(score_mse, or a hidden-state or attention term)", term.kind)


def check_terms_fit(c: Config) -> None:
    """The terms against the task and the models, before any work (config.validate_objective): no softmax term
    on a regression; attention maps only from the eager attention; layer maps and head counts that fit the
    models' config files when those are on this machine (otherwise prepare_models checks them once the models
    are built, before any training step)."""
    from metadistil_scale.data.text import is_regression_task  # the task table lives with the loaders

    objective = Objective.from_config(c.distill, is_regression_task(c.data.task))
    layered = [t for t in objective.terms if TERMS[t.kind].reads_layers]
    if not layered or c.data.task in IMAGE_TASKS:  # CNNs: config.validate refuses per-layer terms
        return
    for term in layered:
        if TERMS[term.kind].reads_attentions:
            require(c.model.attn_implementation == "eager", "model.attn_implementation",
                    f"'eager' for {term.where} (only the eager attention returns attention maps)",
                    c.model.attn_implementation)
    student = config_shape(c.model.student, c.model.student_layers)
    teacher = config_shape(c.model.teacher_checkpoint or c.model.teacher)
    if student is not None and teacher is not None:
        check_layer_maps(objective.terms, student, teacher, " (from the models' config files)")
