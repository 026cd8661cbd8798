"""Activation checkpointing for transformers models, and the passes that must run without it.

With checkpointing a layer keeps only its input in the forward and runs again in the backward. The rerun reads
the module's own weights at backward time. That is right for the passes that call the model itself (the teacher's
forwards, the student's real step, the lean pilot whose parameters are the module's own tensors), and wrong for a
`functional_call` at other weights (the quiz loss at the pilot weights θs' = θs − λg): by the time its backward
runs, functional_call has put the module's weights back, so the rerun would silently use θs. Forward-mode AD (the
JVP) keeps no graph to save, and functorch transforms refuse the checkpoint's autograd calls. `checkpointing_off`
switches it off for those passes.

Dropout: a rerun layer draws its masks again from the RNG state it saved, so the MetaDistil student's replayed
forwards (the lean real step) replay by RNG state rather than by handing back recorded masks (replay.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from metadistil_scale.models.text import ModelError


def enable_activation_checkpointing(model: nn.Module, role: str) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"model.{role}_activation_checkpointing: {type(model).__name__} does not support it")
    # Non-reentrant: the recompute keeps dropout's random draws (the RNG state is saved) and needs no input that
    # requires grad, so transformers' hook that forces one on the embeddings' output goes (under a functorch
    # transform such as the JVP, that hook's requires_grad_ is an error).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
        model.disable_input_require_grads()


def is_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@contextlib.contextmanager
def checkpointing_off(model: nn.Module) -> Iterator[None]:
    """No activation checkpointing inside the block (a no-op for a model without it)."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True
