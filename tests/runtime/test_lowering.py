"""Lowering base-only layer calls (`fxlora.runtime.lowering`): a layer computing as ``nn.Linear``
does becomes one ``F.linear`` of its tensors; any other layer calls its class's ``forward``; the
values are those of the layer's own call."""

import inspect

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import fxlora
from fxlora import LoraConfig
from fxlora.core.layers import BASE_ONLY
from fxlora.runtime.forwards import installed_forward
from fxlora.runtime.lowering import base_forward, lower_base_calls


class Doubled(nn.Linear):
    """A Linear subclass with its own forward: never lowered to F.linear."""

    calls = 0

    def forward(self, x):
        Doubled.calls += 1
        return super().forward(x) * 2


class KeepsForward(nn.Linear):
    """A Linear subclass that keeps nn.Linear's forward: computes as nn.Linear does."""


def stack(*layers):
    return nn.Sequential(*layers, nn.ReLU())


def eager_source(model, x):
    model.eval()
    with torch.no_grad():
        out = model(x)
    fwd = installed_forward(model.model)
    return out, inspect.getsource(next(iter(fwd._eager.values())).fn)


def test_lowered_calls_compute_what_the_layers_compute():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    layers = lambda: stack(nn.Linear(4, 4), Doubled(4, 4), KeepsForward(4, 4, bias=False))  # noqa: E731
    config = dict(target_modules=["0", "1", "2"], init_lora_weights=False)
    torch.manual_seed(1)
    graph = fxlora.transform(layers(), LoraConfig(**config))
    torch.manual_seed(1)
    eager = fxlora.transform(layers(), LoraConfig(**config), trace="eager")
    assert set(graph.target_paths.values()) == {"graph"}
    Doubled.calls = 0
    out, source = eager_source(graph, x)
    assert Doubled.calls == 1  # the subclass's own forward ran, once
    assert source.count("torch._C._nn.linear(") == 2 + 3  # two base layers, three A products
    assert source.count("fxlora_runtime_lowering_base_forward(") == 1  # the subclass
    eager.eval()
    with torch.no_grad():
        assert torch.equal(out, eager(x))


def test_lower_base_calls_contract():
    root = nn.Module()
    root.lin, root.conv, root.keep = nn.Linear(3, 3), nn.Conv1d(3, 3, 1), nn.Linear(3, 3)
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("lin", (x,), {BASE_ONLY: True})
    z = graph.call_module("conv", (graph.call_method("unsqueeze", (y, -1)),), {BASE_ONLY: True})
    w = graph.call_module("keep", (graph.call_method("squeeze", (z, -1)),), {BASE_ONLY: True})
    graph.output(w)
    lower_base_calls(graph, root, [root.lin, root.conv])  # `keep` not lowerable: stays a call_module
    assert not any(BASE_ONLY in n.kwargs for n in graph.nodes if n.op != "call_module")
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["keep"]
    linear = next(n for n in graph.nodes if n.target is F.linear)
    assert [a.target for a in linear.args[1:]] == ["lin.weight", "lin.bias"]
    assert any(n.target is base_forward for n in graph.nodes)  # the conv calls its class's forward
    graph.lint()
