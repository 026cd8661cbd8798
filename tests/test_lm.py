"""Causal-LM distillation: the row-chunked KD loss and MetaDistil teacher meta-gradient against materialised and
hand-written unrolled (create_graph) references, on tiny random Llama models in float64."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from metadistil_scale.backends.torch_backend import TorchModel
from metadistil_scale.config import DistillConfig, MetaConfig, OptimConfig
from metadistil_scale.lm.chunked import IGNORE_INDEX, HeadLogits, head_ce_sum, head_kd_loss_sum
from metadistil_scale.lm.data import LMRows, pack, pad_documents, split_documents
from metadistil_scale.lm.models import CausalLMHead, check_same_tokenizer, select_layers, student_from_layers
from metadistil_scale.meta import MetaDistil
from metadistil_scale.models.text import ModelError
from metadistil_scale.steps import kd_step

VOCAB = 37
EOS = VOCAB - 1
TEMPERATURE = 2.0
PILOT_LR = 0.5


# ---------------------------------------------------------------- float64 all the way through


def _rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
    value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@pytest.fixture(autouse=True)
def exact_float64(monkeypatch):
    """Llama's RMSNorm and eager softmax round through float32 whatever the input dtype; float64 comparisons
    at 1e-8 need them in float64 (both sides of every comparison run the same patched model)."""
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", _eager_attention)


# ---------------------------------------------------------------- tiny models and batches


def tiny_llama(layers: int, seed: int, vocab: int = VOCAB, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tie, initializer_range=0.2,
        attn_implementation="eager", bos_token_id=None, eos_token_id=EOS, pad_token_id=0,
    )
    return LlamaForCausalLM(config).double()


def pair() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A 3-layer teacher and a student made of its layers 0 and 2, moved off the teacher's weights."""
    teacher = tiny_llama(3, seed=0)
    student = student_from_layers(teacher, [0, 2])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def documents(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n,), generator=g).tolist()
    return [torch.randint(1, EOS, (k,), generator=g).tolist() + [EOS] for k in lengths]


def rows(layout: str, n_docs: int, seed: int) -> LMRows:
    docs = documents(n_docs, seed)
    return pack(docs, 8, pad_id=0) if layout == "packed" else pad_documents(docs, 8, pad_id=0)


def batch(layout: str, n_docs: int, seed: int) -> dict:
    r = rows(layout, n_docs, seed)
    return r.batch(list(range(len(r))))


def full_logits(lm: torch.nn.Module, inputs: dict, params: dict | None = None) -> torch.Tensor:
    """The model's own logits, materialised, one row per token."""
    kwargs = {**inputs, "use_cache": False}
    out = lm(**kwargs) if params is None else functional_call(lm, params, kwargs=kwargs)
    return out.logits.reshape(-1, out.logits.shape[-1])


# ---------------------------------------------------------------- the independent reference


def reference_kd_sum(z_s, z_t, labels, *, soft, alpha, temperature=TEMPERATURE):
    valid = labels != IGNORE_INDEX
    ce = F.cross_entropy(z_s, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    log_q, log_p = F.log_softmax(z_s / temperature, -1), F.log_softmax(z_t / temperature, -1)
    if soft == "kl":
        per_token = temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        per_token = (log_q.exp() - log_p.exp()).pow(2).sum(-1)
    return alpha * ce + (1 - alpha) * per_token[valid].sum()


def reference_teacher_grad(teacher, student, train, quiz, *, soft, alpha, beta=0.0):
    """∇θt of the mean quiz CE at θs − λ∇θs L_S(θs; θt) (plus β × the teacher's own mean CE on the train
    batch), by create_graph through the models' own logits."""
    params = dict(student.named_parameters())
    z_t = full_logits(teacher, train["teacher"])
    z_s = full_logits(student, train["student"], params)
    n = int((train["labels"] != IGNORE_INDEX).sum())
    loss = reference_kd_sum(z_s, z_t, train["labels"], soft=soft, alpha=alpha) / n
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    pilot = {k: p - PILOT_LR * g for (k, p), g in zip(params.items(), grads)}
    z_q = full_logits(student, quiz["student"], pilot)
    meta_loss = F.cross_entropy(z_q, quiz["labels"], ignore_index=IGNORE_INDEX)
    if beta:
        meta_loss = meta_loss + beta * F.cross_entropy(z_t, train["labels"], ignore_index=IGNORE_INDEX)
    grads = torch.autograd.grad(meta_loss, list(teacher.parameters()), allow_unused=True)
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, teacher.parameters())]


def rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    got_flat = torch.cat([g.reshape(-1) for g in got])
    want_flat = torch.cat([w.reshape(-1) for w in want])
    return float((got_flat - want_flat).norm() / want_flat.norm())


def make_meta(teacher, student, *, chunk_rows=None, materialize=False, u_mode="jvp", schedule="lean", soft="kl",
              alpha=0.5, beta=0.0) -> MetaDistil:
    teacher_optim = OptimConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, warmup_ratio=0.0,
                                max_grad_norm=None)
    student_optim = OptimConfig(lr=1e-2, warmup_ratio=0.0, max_grad_norm=None)
    wrap = {"chunk_rows": chunk_rows, "materialize": materialize}
    return MetaDistil(
        TorchModel(CausalLMHead(teacher, **wrap), teacher_optim, 100),
        TorchModel(CausalLMHead(student, **wrap), student_optim, 100),
        DistillConfig(alpha=alpha, temperature=TEMPERATURE, soft_loss=soft),
        MetaConfig(pilot_lr=PILOT_LR, u_mode=u_mode, schedule=schedule, fd_epsilon=1e-5, teacher_ce_weight=beta),
    )


def teacher_grads(teacher) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in teacher.parameters()]


# ---------------------------------------------------------------- the meta-gradient


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("soft,alpha", [("kl", 0.5), ("mse", 0.0)])
@pytest.mark.parametrize("u_mode,tol", [("jvp", 1e-8), ("finite-difference", 1e-5), ("unrolled", 1e-10)])
def test_chunked_teacher_meta_gradient_equals_unrolled(layout, soft, alpha, u_mode, tol):
    teacher, student = pair()
    train, quiz = batch(layout, 6, seed=1), batch(layout, 4, seed=2)
    assert (train["labels"] == IGNORE_INDEX).any()  # padding and document ends are in play
    want = reference_teacher_grad(teacher, student, train, quiz, soft=soft, alpha=alpha)
    make_meta(teacher, student, chunk_rows=5, u_mode=u_mode, soft=soft, alpha=alpha).accumulate_teacher_grad(
        [train], [quiz])
    assert float(torch.cat([w.reshape(-1) for w in want]).norm()) > 0
    assert rel_error(teacher_grads(teacher), want) <= tol
    assert all(p.grad is None for p in student.parameters())


@pytest.mark.parametrize("schedule", ["lean", "fast"])
def test_teacher_ce_weight_adds_the_teachers_own_token_loss(schedule):
    teacher, student = pair()
    train, quiz = batch("padded", 6, seed=1), batch("padded", 4, seed=2)
    want = reference_teacher_grad(teacher, student, train, quiz, soft="kl", alpha=0.5, beta=0.7)
    make_meta(teacher, student, chunk_rows=3, schedule=schedule, beta=0.7).accumulate_teacher_grad([train], [quiz])
    assert rel_error(teacher_grads(teacher), want) <= 1e-8


@pytest.mark.parametrize("u_mode", ["jvp", "finite-difference"])
def test_chunk_size_does_not_change_the_meta_gradient(u_mode):
    runs = []
    for chunk_rows, materialize in ((1, False), (7, False), (None, False), (None, True)):
        teacher, student = pair()
        make_meta(teacher, student, chunk_rows=chunk_rows, materialize=materialize, u_mode=u_mode
                  ).accumulate_teacher_grad([batch("packed", 6, seed=1)], [batch("packed", 4, seed=2)])
        runs.append(teacher_grads(teacher))
    for other in runs[1:]:
        assert rel_error(other, runs[0]) <= (1e-12 if u_mode == "jvp" else 1e-9)  # FD amplifies rounding by 1/ε


@pytest.mark.parametrize("schedule", ["lean", "fast"])
def test_whole_step_chunked_equals_materialised(schedule):
    """Pilot, teacher update and the real student step: the chunked path moves both models exactly as the
    materialised [N, V] path does."""
    runs, metrics = [], []
    for chunk_rows, materialize in ((3, False), (None, True)):
        teacher, student = pair()
        step = make_meta(teacher, student, chunk_rows=chunk_rows, materialize=materialize, schedule=schedule)
        metrics.append(step.step([batch("packed", 6, seed=1)], [batch("packed", 4, seed=2)]))
        runs.append([p.detach().clone() for p in [*teacher.parameters(), *student.parameters()]])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for key in ("loss", "pilot_loss", "quiz_loss_before", "quiz_loss_after"):
        assert metrics[0][key] == pytest.approx(metrics[1][key], rel=1e-10)


# ---------------------------------------------------------------- the KD loss


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("soft", ["kl", "mse"])
def test_chunked_kd_loss_and_gradients_equal_unchunked(layout, soft):
    teacher, student = pair()
    train = batch(layout, 6, seed=3)
    params = list(student.parameters())
    with torch.no_grad():
        z_t = full_logits(teacher, train["teacher"])
        teacher_out = CausalLMHead(teacher)(**train["teacher"])
    want = reference_kd_sum(full_logits(student, train["student"]), z_t, train["labels"], soft=soft, alpha=0.3)
    want_grads = torch.autograd.grad(want, params)
    want_ce = F.cross_entropy(full_logits(student, train["student"]), train["labels"], reduction="sum")
    want_ce_grads = torch.autograd.grad(want_ce, params)
    cfg = DistillConfig(alpha=0.3, temperature=TEMPERATURE, soft_loss=soft)
    for chunk_rows in (1, 4, None):  # None: one chunk for this small vocabulary
        head = CausalLMHead(student, chunk_rows=chunk_rows)
        got = head_kd_loss_sum(head(**train["student"]), teacher_out, train["labels"], cfg)
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-12)
        assert rel_error(torch.autograd.grad(got, params), want_grads) <= 1e-12
        ce = head_ce_sum(head(**train["student"]), train["labels"])
        assert float(ce.detach()) == pytest.approx(float(want_ce.detach()), rel=1e-12)
        assert rel_error(torch.autograd.grad(ce, params), want_ce_grads) <= 1e-12


def test_kd_step_chunked_equals_materialised_and_no_grad_skips_the_backward_work():
    runs = []
    for chunk_rows, materialize in ((2, False), (None, True)):
        teacher, student = pair()
        cfg = DistillConfig(alpha=0.5, temperature=TEMPERATURE)
        t = TorchModel(CausalLMHead(teacher, chunk_rows=chunk_rows, materialize=materialize), None)
        s = TorchModel(CausalLMHead(student, chunk_rows=chunk_rows, materialize=materialize),
                       OptimConfig(lr=1e-2, warmup_ratio=0.0, max_grad_norm=None), 100)
        kd_step(t, s, [batch("padded", 6, seed=4)], cfg, regression=False)
        runs.append([p.detach().clone() for p in student.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        out = CausalLMHead(student)(**batch("packed", 3, seed=5)["student"])
        loss = head_ce_sum(out, batch("packed", 3, seed=5)["labels"])
    assert not loss.requires_grad and isinstance(out, HeadLogits)


# ---------------------------------------------------------------- models


def test_student_from_layers_keeps_embeddings_head_and_chosen_layers():
    teacher = tiny_llama(4, seed=0)
    keep = select_layers("every-other", 4)
    assert keep == [0, 2]
    student = student_from_layers(teacher, keep)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    assert student.model.layers[1].mlp.up_proj.weight is not teacher.model.layers[2].mlp.up_proj.weight
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    assert select_layers(3, 4) == [0, 1, 2] and select_layers([3, 1], 4) == [1, 3]
    with pytest.raises(ModelError, match="distinct indices"):
        select_layers([0, 4], 4)


def word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", *words, "<eos>"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<unk>")


def test_tokenizer_mismatch_is_refused_clearly():
    words = [f"w{i}" for i in range(VOCAB - 2)]
    teacher, student = tiny_llama(2, seed=0), tiny_llama(1, seed=1)
    same = word_tokenizer(words)
    check_same_tokenizer(same, word_tokenizer(words), teacher, student)  # equal vocabularies pass
    swapped = word_tokenizer([words[1], words[0], *words[2:]])
    with pytest.raises(ModelError, match=r"tokenizers differ.*'w0' is 1 for the teacher and 2 for the student"):
        check_same_tokenizer(same, swapped, teacher, student)
    with pytest.raises(ModelError, match="tokenizers differ.*37 and 38 tokens"):
        check_same_tokenizer(same, word_tokenizer([*words, "extra"]), teacher, student)
    with pytest.raises(ModelError, match="output vocabularies differ: 37 vs 40"):
        check_same_tokenizer(same, word_tokenizer(words), teacher, tiny_llama(1, seed=1, vocab=40))


# ---------------------------------------------------------------- data


def test_packing_keeps_documents_apart():
    docs = [[1, 2, 3, EOS], [4, 5, EOS], [6, 7, 8, 9, EOS]]
    r = pack(docs, 5, pad_id=0)
    assert r.input_ids.tolist() == [[1, 2, 3, EOS, 4], [5, EOS, 6, 7, 8], [9, EOS, 0, 0, 0]]
    assert r.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    x = IGNORE_INDEX
    assert r.labels.tolist() == [[2, 3, EOS, x, x], [EOS, x, 7, 8, x], [EOS, x, x, x, x]]
    # The block-diagonal mask: a document's logits do not depend on what is packed before it.
    teacher = tiny_llama(2, seed=0)
    together = full_logits(teacher, {"input_ids": r.input_ids[1:2], "position_ids": r.position_ids[1:2]})
    alone = full_logits(teacher, {"input_ids": torch.tensor([[6, 7, 8]])})
    torch.testing.assert_close(together[2:], alone, rtol=1e-12, atol=1e-12)


def test_padding_keeps_every_target_once():
    docs = [[1, 2, 3, EOS], [4, 5, 6, 7, 8, 9, 10, EOS]]
    r = pad_documents(docs, 4, pad_id=0)
    targets = [t for t in r.labels.reshape(-1).tolist() if t != IGNORE_INDEX]
    assert targets == [2, 3, EOS, 5, 6, 7, 8, 9, 10, EOS]
    assert r.attention_mask.tolist()[-1] == [1, 1, 0, 0]
    assert r.num_tokens == len(targets)


def test_split_by_document_is_disjoint_and_seeded():
    docs = [f"doc {i}" for i in range(40)]
    a = split_documents(docs, quiz_fraction=0.1, heldout_fraction=0.2, seed=3)
    assert (len(a["train"]), len(a["quiz"]), len(a["heldout"])) == (28, 4, 8)
    assert set(a["train"]) | set(a["quiz"]) | set(a["heldout"]) == set(docs)
    assert a == split_documents(docs, quiz_fraction=0.1, heldout_fraction=0.2, seed=3)
    assert a != split_documents(docs, quiz_fraction=0.1, heldout_fraction=0.2, seed=4)


def test_local_corpus_formats(tmp_path):
    from metadistil_scale.data.text import DataError
    from metadistil_scale.lm.data import load_documents

    (tmp_path / "a.txt").write_text("first para\nstill first\n\nsecond para\n")
    assert load_documents(str(tmp_path / "a.txt")) == ["first para\nstill first", "second para"]
    assert len(load_documents(str(tmp_path / "a.txt"), sample_by="line")) == 3
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": f"text {i}"}) + "\n" for i in range(3)))
    assert load_documents(str(tmp_path / "b.jsonl"), text_field="body") == ["text 0", "text 1", "text 2"]
    with pytest.raises(DataError, match="no column 'text'; the columns are body"):
        load_documents(str(tmp_path / "b.jsonl"))
    import pandas as pd

    pd.DataFrame({"text": ["x y", "", "z"]}).to_parquet(tmp_path / "c.parquet")
    assert load_documents(str(tmp_path / "c.parquet")) == ["x y", "z"]
    with pytest.raises(DataError, match="mixes file types"):
        load_documents(str(tmp_path))


def test_embedded_kjv_chapters():
    from metadistil_scale.lm.data import kjv_chapters

    chapters = kjv_chapters()
    assert len(chapters) == 1189
    assert chapters[0].startswith("In the beginning God created the heaven and the earth.")
    assert chapters[-1].endswith("be with you all. Amen.")
    assert not any("[" in c for c in chapters[:50])


def test_copy_of_batch_inputs_is_shared_by_teacher_and_student():
    b = batch("packed", 4, seed=0)
    assert b["teacher"] is b["student"] and b["labels"].dim() == 1
    assert copy.deepcopy(b)["labels"].shape[0] == b["teacher"]["input_ids"].numel()


# ---------------------------------------------------------------- the recipe end to end


def save_tiny(folder, lm, tokenizer) -> str:
    lm.float().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_corpus(path, words: list[str], n_docs: int = 40) -> str:
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(words[i] for i in torch.randint(0, len(words), (int(k),), generator=g).tolist())
            for k in torch.randint(3, 12, (n_docs,), generator=g)]
    path.write_text("\n\n".join(docs) + "\n")
    return str(path)


def test_lm_train_cli_runs_each_method_and_refuses_a_foreign_tokenizer(tmp_path, capsys):
    from metadistil_scale.cli import main

    words = [f"w{i}" for i in range(VOCAB - 2)]
    tokenizer = word_tokenizer(words)
    teacher = save_tiny(tmp_path / "teacher", tiny_llama(2, seed=0), tokenizer)
    corpus = tiny_corpus(tmp_path / "corpus.txt", words)
    common = [f"model.teacher={teacher}", f"data.source={corpus}", "data.seq_len=16", "data.quiz_fraction=0.1",
              "data.heldout_fraction=0.1", "student_train.batch_size=2", "student_train.max_steps=2",
              "meta.quiz_batch_size=2", "model.chunk_rows=5", "model.student_layers=[1]", "eval_batch_size=4"]
    code = main(["lm-train", "--output-dir", str(tmp_path / "run"),
                 *[x for o in common for x in ("--set", o)],
                 "--set", "methods=[finetune, kd, metadistil]"])
    assert code == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["-", "initial", "finetune", "kd", "metadistil"]
    assert all(math.isfinite(r["heldout"]["perplexity"]) and r["heldout"]["tokens"] > 0 for r in results["rows"])
    assert "teacher_heldout_after" in results["rows"][-1]
    assert "| student | metadistil | 2 |" in capsys.readouterr().out

    foreign = save_tiny(tmp_path / "foreign", tiny_llama(1, seed=1), word_tokenizer(words[::-1]))
    code = main(["lm-train", "--output-dir", str(tmp_path / "bad"), *[x for o in common for x in ("--set", o)],
                 "--set", f"model.student={foreign}"])
    assert code == 2
    assert "teacher and student tokenizers differ" in capsys.readouterr().err


def test_lm_config_shares_the_run_level_checks_of_the_classification_config():
    """The run-level keys are checked by one function for both config kinds: a repeated method (which would
    train twice into the same folder) is refused for an LM run as for a classification run."""
    from metadistil_scale.config import ConfigError, load_config
    from metadistil_scale.lm.recipe import load_lm_config

    for load in (load_config, load_lm_config):
        with pytest.raises(ConfigError, match=r"^methods: expected no repeated method, got \['kd', 'kd'\]$"):
            load(None, ["methods=[kd, kd]"])
        with pytest.raises(ConfigError, match=r"^dtype: expected one of \('float32', 'float64', 'bfloat16'\)"):
            load(None, ["dtype=float16"])


def test_teacher_lr_schedule_spans_its_updates(tmp_path, monkeypatch):
    """With meta.interval=4 the teacher steps every 4th step after frozen_steps: its linear schedule (no
    warmup) is sized by those updates, so its lr reaches 0 with the last one."""
    from metadistil_scale.lm import recipe

    lrs: list[float] = []

    class Recording(recipe.MetaDistil):
        def step(self, parts, quiz, *, update_teacher=True, **kwargs):
            record = super().step(parts, quiz, update_teacher=update_teacher, **kwargs)
            if update_teacher:
                lrs.append(self.teacher.lr)
            return record

    monkeypatch.setattr(recipe, "MetaDistil", Recording)
    lr = 1e-3
    cfg = recipe.load_lm_config(None, [
        "student_train.max_steps=10", "student_train.batch_size=2", "meta.interval=4", "meta.frozen_steps=1",
        "meta.quiz_batch_size=2", f"meta.teacher_optim.lr={lr}", "meta.teacher_optim.warmup_ratio=0",
        "meta.teacher_optim.schedule=linear", "model.chunk_rows=5", "eval_batch_size=4", "log_every=100"])
    splits = {"train": rows("packed", 12, seed=1), "quiz": rows("packed", 6, seed=2),
              "heldout": rows("packed", 4, seed=3)}
    teacher, student = pair()
    recipe.train_method("metadistil", cfg, teacher, student, splits, torch.device("cpu"), tmp_path / "log")
    # Updates at steps 1, 5 and 9: the lr after each is 2/3, 1/3 and 0 of the base lr.
    assert lrs == pytest.approx([lr * 2 / 3, lr / 3, 0.0], abs=1e-15)


def test_lm_train_stopped_and_resumed_equals_the_uninterrupted_run(tmp_path, capsys):
    """The LM stages run in the shared stage loop: --stop-after checkpoints and exits 3, --resume continues, and
    the weights (both models, optimizers), the loop's state and metrics.jsonl end as in one uninterrupted run."""
    from metadistil_scale.checkpoint import load_checkpoint
    from metadistil_scale.cli import main

    words = [f"w{i}" for i in range(VOCAB - 2)]
    teacher = save_tiny(tmp_path / "teacher", tiny_llama(2, seed=0), word_tokenizer(words))
    corpus = tiny_corpus(tmp_path / "corpus.txt", words)
    settings = [f"model.teacher={teacher}", f"data.source={corpus}", "data.seq_len=16", "data.quiz_fraction=0.1",
                "data.heldout_fraction=0.1", "student_train.batch_size=2", "student_train.max_steps=4",
                "meta.quiz_batch_size=2", "model.chunk_rows=5", "model.student_layers=[1]", "eval_batch_size=4",
                "eval_every=2", "methods=[kd, metadistil]"]

    def lm_train(out: str, *flags: str) -> int:
        return main(["lm-train", "--output-dir", str(tmp_path / out), *[x for o in settings for x in ("--set", o)],
                     *flags])

    assert lm_train("full") == 0
    assert lm_train("stopped", "--stop-after", "3") == 3  # kd stops at step 3 of 4
    assert "[kd] stopped at step 3/4; rerun with --resume" in capsys.readouterr().out
    assert lm_train("stopped", "--resume", "--stop-after", "3") == 3  # kd ends; metadistil stops at 3
    assert lm_train("stopped", "--resume") == 0

    def without_times(path) -> list[dict]:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in records]

    for method in ("kd", "metadistil"):
        full, resumed = (load_checkpoint(tmp_path / run / method / "last.pt") for run in ("full", "stopped"))
        assert resumed["state"]["step"] == 4
        for key in ("step", "best_dev", "best_step", "last_eval"):
            assert resumed["state"][key] == full["state"][key], (method, key)
        models = ("student", "teacher") if method == "metadistil" else ("student",)
        for name in models:
            for part in ("model", "optimizer"):
                flat_full, flat_resumed = _tensors(full[name][part]), _tensors(resumed[name][part])
                assert flat_full.keys() == flat_resumed.keys()
                assert all(torch.equal(flat_full[k], flat_resumed[k]) for k in flat_full), (method, name, part)
        assert without_times(tmp_path / "stopped" / method / "metrics.jsonl") == \
            without_times(tmp_path / "full" / method / "metrics.jsonl")
        assert (tmp_path / "stopped" / method / "student" / "config.json").is_file()
    full, resumed = (json.loads((tmp_path / run / "results.json").read_text())["rows"] for run in ("full", "stopped"))
    assert [r["heldout"] for r in resumed] == [r["heldout"] for r in full]


def _tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state dict, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{prefix}/{key}").items()}


def test_lm_experiment_runs_each_method_per_seed_and_summarises(tmp_path, capsys):
    from metadistil_scale.cli import main

    words = [f"w{i}" for i in range(VOCAB - 2)]
    teacher = save_tiny(tmp_path / "teacher", tiny_llama(2, seed=0), word_tokenizer(words))
    corpus = tiny_corpus(tmp_path / "corpus.txt", words)
    settings = [f"model.teacher={teacher}", f"data.source={corpus}", "data.seq_len=16", "data.quiz_fraction=0.1",
                "data.heldout_fraction=0.1", "student_train.batch_size=2", "student_train.max_steps=2",
                "meta.quiz_batch_size=2", "model.chunk_rows=5", "model.student_layers=[1]", "eval_batch_size=4",
                "eval_every=1", "methods=[kd, metadistil]", "seeds=[0, 1]"]
    out = tmp_path / "exp"
    assert main(["lm-experiment", "--output-dir", str(out), *[x for o in settings for x in ("--set", o)]]) == 0
    assert "metadistil" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "perplexity" and summary["paired"]["n"] == 2
    assert {m: s["n"] for m, s in summary["methods"].items()} == {"teacher": 2, "kd": 2, "metadistil": 2}
    runs = {(r["method"], r["seed"]): r for r in json.loads((out / "runs.json").read_text())}
    assert runs["kd", 0]["metric"] != runs["kd", 1]["metric"]  # a seed orders the batches differently
    assert [step for step, _ in runs["metadistil", 1]["curve"]] == [1, 2]
    assert runs["metadistil", 0]["teacher_curve"] and (out / "dev_curves.png").is_file()
    assert (out / "seed_1" / "metadistil" / "student" / "config.json").is_file()


def test_lm_teacher_fine_tuning_stage_resumes_exactly_and_teaches_the_methods(tmp_path, capsys):
    """model.finetune_teacher: the teacher's own stage runs in the loop before the methods (stop-after and resume
    included), and KD distils from the fine-tuned teacher."""
    from metadistil_scale.checkpoint import load_checkpoint
    from metadistil_scale.cli import main

    words = [f"w{i}" for i in range(VOCAB - 2)]
    teacher = save_tiny(tmp_path / "teacher", tiny_llama(2, seed=0), word_tokenizer(words))
    corpus = tiny_corpus(tmp_path / "corpus.txt", words)
    settings = [f"model.teacher={teacher}", f"data.source={corpus}", "data.seq_len=16", "data.quiz_fraction=0.1",
                "data.heldout_fraction=0.1", "student_train.batch_size=2", "student_train.max_steps=2",
                "model.chunk_rows=5", "model.student_layers=[1]", "eval_batch_size=4", "methods=[kd]",
                "model.finetune_teacher=true", "teacher_finetune.batch_size=2", "teacher_finetune.max_steps=3",
                "teacher_finetune.optim.lr=1e-2"]

    def lm_train(out: str, *flags: str) -> int:
        return main(["lm-train", "--output-dir", str(tmp_path / out), *[x for o in settings for x in ("--set", o)],
                     *flags])

    assert lm_train("full") == 0
    assert lm_train("stopped", "--stop-after", "2") == 3
    assert "[teacher] stopped at step 2/3" in capsys.readouterr().out
    assert lm_train("stopped", "--resume") == 0
    for stage in ("teacher", "kd"):
        full, resumed = (load_checkpoint(tmp_path / run / stage / "last.pt") for run in ("full", "stopped"))
        name = "teacher" if stage == "teacher" else "student"
        assert all(torch.equal(full[name]["model"][k], resumed[name]["model"][k]) for k in full[name]["model"])
    rows = json.loads((tmp_path / "full" / "results.json").read_text())["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [("teacher", "-"), ("student", "initial"),
                                                          ("teacher", "finetune"), ("student", "kd")]
    assert rows[2]["heldout"]["perplexity"] < rows[0]["heldout"]["perplexity"]  # it learnt the corpus
    assert lm_train("pretrained_teacher", "--set", "model.finetune_teacher=false") == 0
    kd_students = [load_checkpoint(tmp_path / run / "kd" / "last.pt")["student"]["model"]
                   for run in ("full", "pretrained_teacher")]
    assert any(not torch.equal(kd_students[0][k], kd_students[1][k]) for k in kd_students[0])  # another teacher


def test_run_lm_reports_every_stage_checkpoint_to_its_hook(tmp_path):
    """run_lm hands each completed stage checkpoint (the teacher's stage and each method's) to `on_checkpoint`,
    the hook a launcher's fault tolerance uses (launch/ray_job.py), as trainer.train does."""
    from metadistil_scale.backends.checkpointing import checkpoint_step
    from metadistil_scale.lm.recipe import load_lm_config, run_lm

    words = [f"w{i}" for i in range(VOCAB - 2)]
    teacher = save_tiny(tmp_path / "teacher", tiny_llama(2, seed=0), word_tokenizer(words))
    corpus = tiny_corpus(tmp_path / "corpus.txt", words)
    out = tmp_path / "run"
    cfg = load_lm_config(None, [
        f"output_dir={out}", f"model.teacher={teacher}", f"data.source={corpus}", "data.seq_len=16",
        "data.quiz_fraction=0.1", "data.heldout_fraction=0.1", "student_train.batch_size=2",
        "student_train.max_steps=3", "meta.quiz_batch_size=2", "model.chunk_rows=5", "model.student_layers=[1]",
        "eval_batch_size=4", "eval_every=2", "methods=[kd, metadistil]", "model.finetune_teacher=true",
        "teacher_finetune.batch_size=2", "teacher_finetune.max_steps=2"])
    reported = []

    def hook(stage: str, path, record: dict) -> None:
        # Called once the checkpoint is complete: it holds the reported step.
        reported.append((stage, path, record["step"], checkpoint_step(path), record["steps"]))
        assert math.isfinite(record["heldout_perplexity"])

    results = run_lm(cfg, on_checkpoint=hook)
    assert reported == [("teacher", out / "teacher" / "last.pt", 2, 2, 2),
                        ("kd", out / "kd" / "last.pt", 2, 2, 3), ("kd", out / "kd" / "last.pt", 3, 3, 3),
                        ("metadistil", out / "metadistil" / "last.pt", 2, 2, 3),
                        ("metadistil", out / "metadistil" / "last.pt", 3, 3, 3)]
    assert [r["method"] for r in results["rows"]] == ["-", "initial", "finetune", "kd", "metadistil"]
