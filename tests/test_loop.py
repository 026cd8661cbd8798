"""The seams of the stage loop: the backend interface both backends implement, and entry points that set
process-wide options only when asked to."""

from __future__ import annotations

import inspect

import pytest
import torch

from metadistil_scale import trainer
from metadistil_scale.backends.base import BackendModel, ReadsWholeParameters
from metadistil_scale.backends.torch_backend import TorchModel
from metadistil_scale.config import load_config


def _interface() -> dict[str, object]:
    return {name: member for name, member in vars(BackendModel).items()
            if (not name.startswith("_") or name == "__call__") and (callable(member) or isinstance(member, property))}


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_each_backend_implements_the_declared_interface(backend: str) -> None:
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
        from metadistil_scale.backends.deepspeed_backend import DeepSpeedModel

        model, cls = DeepSpeedModel, DeepSpeedModel  # its members are all properties or methods
    else:
        model, cls = TorchModel(torch.nn.Linear(2, 2), None), TorchModel  # `module` is set per instance
    members = _interface()
    assert {"zero_stage", "sharded_checkpoint", "whole_parameter", "gathered", "trainable"} <= set(members)
    for name, member in members.items():
        assert hasattr(model, name), f"{cls.__name__} lacks {name}"
        if callable(member) and not isinstance(member, property):
            want = list(inspect.signature(member).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, f"{cls.__name__}.{name}"


def test_the_lm_head_reads_its_weight_through_the_backend() -> None:
    from test_lm import tiny_llama

    from metadistil_scale.lm.models import CausalLMHead

    head = CausalLMHead(tiny_llama(1, seed=0), chunk_rows=5)
    assert isinstance(head, ReadsWholeParameters)
    model = TorchModel(head, None)
    assert model.zero_stage is None and not model.sharded_checkpoint
    weight = head.lm.get_output_embeddings().weight
    assert model.whole_parameter(head, weight) is weight  # nothing to gather on the torch backend


def test_resolving_the_device_sets_no_allocator_option(monkeypatch) -> None:
    """The glibc option behind cpu_allocator is set by the entry points, never as a side effect."""
    calls: list[str] = []
    monkeypatch.setattr(trainer, "retain_freed_host_memory", lambda: calls.append("retain") or True)
    cfg = load_config(None, ["device=cpu"])
    device = trainer.resolve_device(cfg)
    assert calls == []
    trainer.configure_cpu_allocator(cfg, device)
    assert calls == ["retain"]
    trainer.configure_cpu_allocator(load_config(None, ["device=cpu", "cpu_allocator=system"]), device)
    assert calls == ["retain"]
