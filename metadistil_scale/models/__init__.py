"""Teacher and student builders, one surface for both kinds of model the trainer handles:

- text: transformers sequence classifiers (a folder, a hub name or the embedded MiniLM), saved with
  `save_pretrained` next to their tokenizer;
- images: the CIFAR CNNs of `models.cifar`, named "cv:<name>" in a config (e.g. "cv:resnet56"), saved as a torch
  state dict (`cv_model.pt`) and a small json (`cv_model.json`: architecture, classes, input channels) from which
  the same module is rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metadistil_scale.models.cifar import build_cv_model
from metadistil_scale.models.lora import apply_lora, is_lora, load_lora_like, lora_saved, save_lora
from metadistil_scale.models.text import ModelError, classifier_config, load_classifier

CV_PREFIX = "cv:"
CV_SPEC_FILE = "cv_model.json"
CV_WEIGHTS_FILE = "cv_model.pt"


def _build_cv(spec: dict[str, Any], dtype: torch.dtype) -> nn.Module:
    model = build_cv_model(spec["arch"], spec["num_classes"], spec["in_channels"]).to(dtype)
    model.cv_spec = dict(spec)  # what save_model writes, so that a saved model rebuilds as the same module
    return model


def load_model(
    source: str,
    num_labels: int,
    *,
    in_channels: int | None = None,
    num_layers: int | None = None,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A freshly initialised CNN ("cv:<name>", needs `in_channels`), a saved CNN folder, or a text classifier."""
    if source.startswith(CV_PREFIX):
        if in_channels is None:
            raise ModelError(f"{source}: a CV model needs an image task (the task gives the input channels)")
        return _build_cv({"arch": source[len(CV_PREFIX):], "num_classes": num_labels, "in_channels": in_channels},
                         dtype)
    if (Path(source) / CV_SPEC_FILE).is_file():
        check_model(source, num_labels)
        return _load_cv(Path(source), dtype)
    return load_classifier(source, num_labels, num_layers=num_layers, attn_implementation=attn_implementation,
                           dtype=dtype)


def check_model(source: str, num_labels: int, *, num_layers: int | None = None) -> None:
    """What load_model would refuse (label count, layer count, an unreachable source), from config files only."""
    if source.startswith(CV_PREFIX):
        return  # built at the task's size
    if (Path(source) / CV_SPEC_FILE).is_file():
        spec_path = Path(source) / CV_SPEC_FILE
        try:
            classes = json.loads(spec_path.read_text())["num_classes"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelError(f"{spec_path}: not a CV model description ({type(err).__name__}: {err})") from err
        if classes != num_labels:
            raise ModelError(f"{source}: the model has {classes} classes, the task {num_labels}")
        return
    classifier_config(source, num_labels, num_layers=num_layers)


def _load_cv(folder: Path, dtype: torch.dtype) -> nn.Module:
    spec_path = folder / CV_SPEC_FILE
    try:
        spec = json.loads(spec_path.read_text())
        model = _build_cv(spec, dtype)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ModelError(f"{spec_path}: not a CV model description ({type(err).__name__}: {err})") from err
    state = torch.load(folder / CV_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model


def save_model(model: nn.Module, folder: Path, tokenizer: Any = None) -> None:
    """Write `model` (and a text model's tokenizer) to `folder` so that `load_model(folder)` rebuilds it; a LoRA
    model as its adapters (and its merged weights, unless configured otherwise)."""
    if is_lora(model):
        merged = save_lora(model, folder)
        if merged is None:
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            return
        model = merged
    if hasattr(model, "cv_spec"):
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), folder / CV_WEIGHTS_FILE)
        (folder / CV_SPEC_FILE).write_text(json.dumps(model.cv_spec, indent=2))
        return
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def saved_model_exists(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / CV_WEIGHTS_FILE).is_file() or lora_saved(folder)


def load_saved_like(folder: Path, like: nn.Module) -> nn.Module:
    """The model saved in `folder`, as the live model `like`'s class, dtype and device."""
    param = next(like.parameters())
    if is_lora(like):
        return load_lora_like(folder, like)
    if hasattr(like, "cv_spec"):
        model = _load_cv(folder, param.dtype)
    else:
        model = type(like).from_pretrained(folder, dtype=like.dtype,
                                           attn_implementation=like.config._attn_implementation)
    return model.to(param.device)


__all__ = ["CV_PREFIX", "ModelError", "apply_lora", "check_model", "load_model", "load_saved_like", "save_model", "saved_model_exists"]
