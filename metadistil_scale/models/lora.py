"""LoRA adapters (PEFT) on a teacher or a student.

Only trainable parameters take part in a step (`TorchModel.trainable()`), so an adapted model needs nothing
special from the steps: the student's pilot, quiz gradient, tangent u = J_s·v and real step run over its adapters
(and its head), and the teacher's meta-gradient lands on its adapters alone — its optimizer state is the adapters'
size and its frozen base is never written.

Saved as PEFT adapters (`<folder>/adapter`: adapter_config.json, adapter_model.safetensors), loadable with
`peft.PeftModel.from_pretrained(base, folder / "adapter")`, and, with `save_merged`, as merged full weights in the
folder itself, which any consumer of a plain model (an evaluation, `model.teacher_checkpoint`) loads.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from metadistil_scale.config import LoraConfig
from metadistil_scale.models.text import ModelError

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def apply_lora(model: nn.Module, spec: LoraConfig, role: str) -> nn.Module:
    """`model` with LoRA adapters on `spec.target_modules`; `role` ("teacher" or "student") picks whether the
    head trains in full when `spec.train_head` is null (the student's, untrained at the start: yes)."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise ModelError(f"model.{role}_lora needs the peft package: pip install 'metadistil-scale[lora]'") from None
    train_head = spec.train_head if spec.train_head is not None else role == "student"
    dtype = next(model.parameters()).dtype
    peft_config = PeftLoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                 target_modules=spec.target_modules,
                                 modules_to_save=[_head_name(model)] if train_head else None)
    try:
        adapted = get_peft_model(model, peft_config)
    except ValueError as err:  # e.g. no target module matched, or no default for the architecture
        raise ModelError(f"model.{role}_lora: {err}") from None
    adapted.to(dtype)  # PEFT makes adapters in float32 whatever the base's dtype
    adapted.save_merged = spec.save_merged
    return adapted


def _head_name(model: nn.Module) -> str:
    """The output layer: the last linear module (BERT's `classifier`, the CNNs' `fc`/`classifier`)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ModelError(f"{type(model).__name__} has no linear output layer for LoRA's train_head")
    return linear[-1]


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_lora(model: nn.Module, folder: Path) -> nn.Module | None:
    """Write the adapters to `<folder>/adapter`; returns the merged plain model to save in `folder` when the
    model was configured with save_merged, else None."""
    model.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)
    if not getattr(model, "save_merged", True):
        return None
    return copy.deepcopy(model).merge_and_unload()


def lora_saved(folder: Path) -> bool:
    return (folder / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file()


def load_lora_like(folder: Path, like: nn.Module) -> nn.Module:
    """The adapted model saved in `folder`: the live model's frozen base with the saved adapters (and head)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    model = copy.deepcopy(like)
    state = load_file(folder / ADAPTER_DIR / ADAPTER_WEIGHTS, device=str(next(like.parameters()).device))
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise ModelError(f"{folder / ADAPTER_DIR / ADAPTER_WEIGHTS}: weights the model does not have: "
                         f"{result.unexpected_keys[:3]}")
    return model
