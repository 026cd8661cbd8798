"""Make several forwards of the student on one batch draw the same randomness (dropout masks).

The pilot forward, the tangent forwards (one JVP, or two finite-difference forwards) and, in the lean schedule,
the real step's forward must see the same dropout masks, or u is not J_s·v of the function the pilot
differentiated. `ForwardRandomness.record()` wraps the first forward: every `F.dropout` draws its noise exactly
as torch does on CPU (`bernoulli_(1−p)` then `÷(1−p)`, so results and the RNG stream are unchanged) and keeps the
mask as one byte per element. `replay()` wraps a later forward and hands the masks back instead of drawing
again — drawing dropout noise is ~13% of a MetaDistil step on CPU, and the masks cost less memory than the
activations they gate.

A forward that draws randomness some other way (dropout inside scaled_dot_product_attention, alpha/feature
dropout, explicit torch.rand...) cannot be replayed mask by mask; it is replayed by restoring the RNG state taken
before the recorded forward, which reproduces every draw made in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_OTHER_RANDOM = {
    F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like,
    torch.bernoulli, torch.normal, torch.multinomial, torch.randperm, torch.poisson,
    torch.Tensor.bernoulli_, torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_,
    torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.cauchy_, torch.Tensor.log_normal_,
}


def rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replayed_rng(state: tuple) -> Iterator[None]:
    """Run a block with the RNG as it was at `state`, then put the RNG back."""
    devices = list(range(torch.cuda.device_count())) if state[1] is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state_all(state[1])
        yield


def _dropout_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, float, bool, bool]:
    names = ("input", "p", "training", "inplace")
    bound = {"p": 0.5, "training": True, "inplace": False, **dict(zip(names, args)), **kwargs}
    return bound["input"], float(bound["p"]), bool(bound["training"]), bool(bound["inplace"])


def _sdpa_dropout(args: tuple, kwargs: dict) -> float:
    return float(kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0))


class _DropoutMasks(TorchFunctionMode):
    """Draws dropout noise as torch does on CPU, keeping the masks in `store`, or hands back `masks`."""

    def __init__(self, owner: ForwardRandomness, masks: list[torch.Tensor] | None = None,
                 store: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.owner, self.masks, self.store, self.next = owner, masks, store, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout:
            x, p, training, inplace = _dropout_args(args, kwargs)
            if training and 0.0 < p < 1.0:
                if self.masks is not None:
                    if self.next == len(self.masks):
                        raise RuntimeError(f"a replayed forward called dropout more often than the recorded one "
                                           f"({len(self.masks)} times): it must run the same model on the same inputs")
                    scale = self.masks[self.next].to(x.dtype).div_(1.0 - p)
                    self.next += 1
                else:
                    scale = torch.empty_like(x).bernoulli_(1.0 - p)
                    if self.store is not None:
                        self.store.append(scale.bool())
                    scale.div_(1.0 - p)
                return x.mul_(scale) if inplace else x * scale
        elif self.store is not None and (
            func in _OTHER_RANDOM or (func is F.scaled_dot_product_attention and _sdpa_dropout(args, kwargs) > 0)
        ):
            self.owner.mask_replay = False
        return func(*args, **kwargs)


class ForwardRandomness:
    """The randomness one student forward drew: its dropout masks, and the RNG state it started from."""

    def __init__(self, mask_replay: bool = True) -> None:
        """`mask_replay=False` replays by the RNG state alone: for a model with activation checkpointing, whose
        backward reruns layers drawing from the RNG state each layer saw, so a replayed forward must draw too."""
        self.rng = rng_state()
        self.masks: list[torch.Tensor] = []
        self.mask_replay = mask_replay

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        with _DropoutMasks(self, store=self.masks):
            yield
        if not self.mask_replay:
            self.masks.clear()

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        if self.mask_replay:
            with _DropoutMasks(self, masks=self.masks):
                yield
        else:  # the same RNG stream, drawn the same way as when recorded
            with replayed_rng(self.rng), _DropoutMasks(self):
                yield
