"""Dropout masks recorded in one student forward and handed back to later ones (metadistil_scale/replay.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp

from metadistil_scale.replay import ForwardRandomness


class Dropouts(nn.Module):
    """Dropout the three ways models call it: a module, the functional form, and in place."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.linear(x))
        h = F.dropout(h, 0.5, self.training)
        return F.dropout(torch.tanh(h), p=0.2, training=self.training, inplace=True)


def test_recording_draws_exactly_what_torch_draws():
    torch.manual_seed(0)
    model, x = Dropouts(), torch.randn(16, 8)
    torch.manual_seed(1)
    plain = model(x)
    after_plain = torch.get_rng_state()
    torch.manual_seed(1)
    drawn = ForwardRandomness()
    with drawn.record():
        recorded = model(x)
    assert torch.equal(recorded, plain)
    assert torch.equal(torch.get_rng_state(), after_plain)
    assert [m.dtype for m in drawn.masks] == [torch.bool] * 3 and drawn.mask_replay


def test_replay_hands_back_the_masks_without_drawing():
    model, x = Dropouts(), torch.randn(16, 8)
    drawn = ForwardRandomness()
    with drawn.record():
        recorded = model(x)
    state = torch.get_rng_state()
    for _ in range(2):
        with drawn.replay():
            assert torch.equal(model(x), recorded)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(model(x), recorded)  # outside replay, new masks


def test_forward_mode_ad_sees_the_recorded_masks():
    x, v = torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 8, dtype=torch.float64)
    drawn = ForwardRandomness()
    with drawn.record():
        y = F.dropout(x, 0.4, True)
    with drawn.replay():
        primal, tangent = jvp(lambda a: F.dropout(a, 0.4, True), (x,), (v,))
    torch.testing.assert_close(primal, y, rtol=0, atol=0)
    torch.testing.assert_close(tangent, v * drawn.masks[0] / 0.6, rtol=1e-15, atol=0)


@pytest.mark.parametrize("where", ["sdpa", "rand"])
def test_other_randomness_falls_back_to_replaying_the_rng(where):
    q = torch.randn(2, 2, 5, 4)

    def forward() -> torch.Tensor:
        if where == "sdpa":
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.5) + F.dropout(q, 0.5, True)
        return q * torch.rand_like(q) + F.dropout(q, 0.5, True)

    drawn = ForwardRandomness()
    with drawn.record():
        recorded = forward()
    assert not drawn.mask_replay and drawn.masks == []
    with drawn.replay():
        assert torch.equal(forward(), recorded)
