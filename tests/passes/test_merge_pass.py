"""The merge pass: which layers it folds, in place and once each, checks before writing, leaves the
graph alone, and its records undo each fold exactly."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxlora
from fxlora import LoraConfig
from fxlora.errors import MergeError
from fxlora.core.delta import delta_weight
from fxlora.core.fold import unfold_layer
from fxlora.core.gates import make_gate_state
from fxlora.passes.merge import merge_graph, merge_targets
from fxlora.tracing.call_keys import canonical_key
from fxlora.tracing.traced import trace_through_ids, trace_variant


class Net(nn.Module):
    """`fc` is called twice, `conv` once; `spare` is adapted but never called by the forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)
        self.spare = nn.Linear(4, 4)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean(-1)
        return self.out(self.fc(self.fc(h)))


TARGETS = ["conv", "fc", "out", "spare"]


def setup(targets=TARGETS):
    lora = fxlora.transform(Net(), LoraConfig(target_modules=targets, init_lora_weights=False))
    root = lora.model
    graph = trace_variant(root, trace_through_ids(root, [root.get_submodule(t) for t in targets]), canonical_key(root, False)).graph
    return lora, root, graph


def weights(root):
    return {n: p.detach().clone() for n, p in root.named_parameters() if ".lora_" not in n}


def test_targets_are_the_called_adapted_layers_in_call_order_each_once():
    _, root, graph = setup()
    assert list(merge_targets(graph, root, ["default"])) == ["conv", "fc", "out"]
    assert list(merge_targets(graph, root, ["default"], prefix="body.")) == ["body.conv", "body.fc", "body.out"]
    assert merge_targets(graph, root, ["other"]) == {}


def test_folds_each_called_layer_once_in_place_and_leaves_the_graph_alone():
    lora, root, graph = setup()
    before = weights(root)
    params = {n: p for n, p in root.named_parameters()}
    code = graph.python_code("self").src
    expected = {n: before[f"{n}.weight"] + delta_weight(root.get_submodule(n), "default", 0.5) for n in ("conv", "fc", "out")}
    records = merge_graph(graph, root, {"default": 0.5})
    assert list(records) == ["conv", "fc", "out"]
    for name, value in expected.items():
        torch.testing.assert_close(root.get_submodule(name).weight, value, rtol=0, atol=1e-6)  # once, not twice for fc
    assert torch.equal(root.spare.weight, before["spare.weight"])  # not called by this graph
    assert all(p is params[n] for n, p in root.named_parameters())  # same parameter objects
    assert graph.python_code("self").src == code


def test_skip_leaves_layers_out():
    _, root, graph = setup()
    before = weights(root)
    records = merge_graph(graph, root, {"default": 1.0}, skip={id(root.fc)})
    assert list(records) == ["conv", "out"]
    assert torch.equal(root.fc.weight, before["fc.weight"])


def test_records_undo_every_fold_bit_for_bit():
    _, root, graph = setup()
    before = weights(root)
    for _ in range(3):
        records = merge_graph(graph, root, {"default": 1.0})
        assert any(not torch.equal(root.get_submodule(n).weight, before[f"{n}.weight"]) for n in records)
        for name, record in reversed(records.items()):
            unfold_layer(root.get_submodule(name), record)
        for name, value in weights(root).items():
            assert torch.equal(value, before[name]), name


class Late(nn.Module):
    """A mergeable layer first, a grouped convolution (which cannot be merged) after it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.conv = nn.Conv1d(4, 4, 1, groups=2)

    def forward(self, x):
        return self.conv(self.fc(x).unsqueeze(-1))


def test_a_layer_that_cannot_be_merged_stops_the_pass_before_any_write():
    lora = fxlora.transform(Late(), LoraConfig(target_modules=["fc", "conv"], r=2, init_lora_weights=False))
    root = lora.model
    graph = trace_variant(root, trace_through_ids(root, [root.fc, root.conv]), canonical_key(root, False)).graph
    assert list(merge_targets(graph, root, ["default"])) == ["fc", "conv"]
    before = weights(root)
    with pytest.raises(MergeError, match="'conv'.*groups=2"):
        merge_graph(graph, root, {"default": 1.0})
    for name, value in weights(root).items():
        assert torch.equal(value, before[name]), name


def test_a_failure_while_writing_undoes_the_layers_already_written(monkeypatch):
    import fxlora.passes.merge as merge_pass

    _, root, graph = setup()
    before = weights(root)
    real = merge_pass.fold_layer
    calls = []

    def failing(module, scales, *args):
        calls.append(module)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(module, scales, *args)

    monkeypatch.setattr(merge_pass, "fold_layer", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge_graph(graph, root, {"default": 1.0})
    for name, value in weights(root).items():
        assert torch.equal(value, before[name]), name


def test_merged_graph_code_with_gate_adjusted_gives_the_same_outputs():
    """The contract with the model: folding plus (wanted - merged) on the gate keeps outputs."""
    lora, root, graph = setup()
    lora.eval()
    x = torch.randn(3, 4, 6)
    ref = lora(x)
    reference_model = copy.deepcopy(lora)
    merge_graph(graph, root, {"default": 1.0})
    state = lora.adapter_state

    def gated(scale):  # the gated code (what torch.compile sees) with that gate value
        gates = make_gate_state({"default": scale}, {"default": 1.0}, None)
        return state.calling(dataclasses.replace(gates, eager=None))

    with gated(0.0):  # what the adapter state publishes once merged
        torch.testing.assert_close(lora(x), ref, rtol=1e-5, atol=1e-6)
    # `spare` is not called, so the only folded layers are the ones the forward uses
    with gated(-1.0), reference_model.disable_adapter():  # adapter switched off while merged
        torch.testing.assert_close(lora(x), reference_model(x), rtol=1e-5, atol=1e-6)
