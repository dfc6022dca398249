"""Compiled inference code of a qualifying graph runs the base model alone while no adapter acts
(merged, disabled, inactive), decided per call by ``torch.cond``: no recompile on a state change.
Run as on a torch whose dynamo keeps state updates across a cond (`cond_kept`); on this torch the
code is not built (tests/runtime/test_cond_support.py)."""

import pytest
import torch
import torch._dynamo
import torch.fx as fx
import torch.nn as nn
from torch._dynamo.testing import CompileCounter

import fxlora
from fxlora import LoraConfig
from fxlora.runtime.idle import skippable
from models import MLP


pytestmark = pytest.mark.usefixtures("cond_kept", "fresh_dynamo")


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.a(x), self.b(x)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x):
        return self.a(x).add_(1)


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x):
        return self.a(x) + torch.randn_like(x)


class Shape(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)

    def forward(self, x):
        return self.a(x).size()


@pytest.mark.parametrize(
    "make, expected",
    [(MLP, True), (lambda: fxlora.transform(MLP(), LoraConfig(target_modules=["seq.0"], modules_to_save=["seq.4"])).get_base_model(), False), (lambda: nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.LayerNorm(6)), True), (Pair, False), (InPlace, False), (Noisy, False), (Shape, False), (lambda: nn.Sequential(nn.Linear(6, 6), nn.Dropout(0.5)).train(), False)],
    ids=["mlp", "with-saved-module", "sequential", "tuple-out", "in-place", "random", "size-out", "dropout-training"],
)
def test_which_graphs_qualify(make, expected):
    model = make()
    assert skippable(fx.symbolic_trace(model).graph, model) is expected


class LeavesOnly(fx.Tracer):
    def is_leaf_module(self, m, qualified_name):
        return True


@pytest.mark.parametrize("fast, expected", [(False, True), (True, False)], ids=["timm-norms", "timm-fast-norms"])
def test_timm_norm_layers_qualify_on_torch_kernels(fast, expected):
    pytest.importorskip("timm")
    from timm.layers import LayerNorm, RmsNorm

    model = nn.Sequential(nn.Linear(6, 6), LayerNorm(6), nn.GELU(), RmsNorm(6))
    graph = LeavesOnly().trace(model)  # the norms as leaf modules, as fxlora's graphs call them
    assert [n.op for n in graph.nodes].count("call_module") == 4
    for m in model[1], model[3]:
        m._fast_norm = fast  # timm's opt-in fast norm may call APEX kernels: not declared pure
    assert skippable(graph, model) is expected


def test_a_merged_timm_vit_runs_no_branch_when_compiled_without_autograd():
    """A timm ViT (timm's own LayerNorm around every block): merged, compiled, no autograd, it
    runs the base code alone (the poisoned factors never show) and equals the eager model."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=16, depth=2)
    targets = r".*\.(qkv|proj|fc1|fc2)"  # the patch embedding's proj too: its module is traced through
    model = fxlora.transform(base.eval(), LoraConfig(target_modules=targets, init_lora_weights=False)).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        compiled(x)
        poison_after_merge(model)
        out = compiled(x)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, model(x))


def model_and_input():
    torch.manual_seed(0)
    model = fxlora.transform(MLP(16).eval(), LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(target_modules=["seq.0"], r=4, init_lora_weights=False))
    return model.eval(), torch.randn(4, 20)


def test_state_changes_under_no_grad_match_eager_without_recompiles():
    model, x = model_and_input()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    steps = [
        ("first", lambda: None),
        ("merged", model.merge_adapter),
        ("unmerged", model.unmerge_adapter),
        ("other", lambda: model.set_adapter("other")),
        ("back", lambda: model.set_adapter("default")),
        ("scale", lambda: model.set_adapter_scale("default", 0.5)),
    ]
    seen = []
    with torch.no_grad():
        for label, change in steps:
            change()
            got = compiled(x)
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-6, msg=label)
            seen.append(got)
        with model.disable_adapter():
            torch.testing.assert_close(compiled(x), model(x), msg="disabled")
        names = ["default", "__base__", "other", "default"]
        torch.testing.assert_close(compiled(x, adapter_names=names), model(x, adapter_names=names), rtol=1e-5, atol=1e-6)
    assert counter.frame_count <= 2  # the mixed batch's gate shape may add one
    assert not torch.allclose(seen[0], seen[3])


def poison_after_merge(model):
    """Merge, then make the adapters' factors NaN: code that still computes a merged adapter's
    branch (times a zero gate) returns NaN; code that skips it returns the merged model's output."""
    model.merge_adapter()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.fill_(float("nan"))


def test_merged_adapters_run_no_branch_when_compiled_without_autograd():
    model, x = model_and_input()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        compiled(x)
        poison_after_merge(model)
        out = compiled(x)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


def test_with_autograd_the_gated_code_runs():
    """Under autograd the branches stay (torch.cond is kept to inference): the NaN shows."""
    model, x = model_and_input()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    compiled(x)
    poison_after_merge(model)
    assert torch.isnan(compiled(x)).any()


def test_a_selected_copy_keeps_the_gated_code():
    torch.manual_seed(0)
    model = fxlora.transform(MLP(16).eval(), LoraConfig(target_modules=["seq.0"], modules_to_save=["seq.4"], init_lora_weights=False)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(1.0)
    x = torch.randn(4, 20)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        model.merge_adapter()
        torch.testing.assert_close(compiled(x), model(x))
        with model.disable_adapter():
            torch.testing.assert_close(compiled(x), model(x))


# ---------------------------------------------------------------------- skippable_fixed
def test_skippable_fixed_answers_each_graph_and_root_once_with_the_same_answer(monkeypatch):
    from fxlora.runtime import idle
    from fxlora.runtime.idle import skippable_fixed

    asked = []
    original = idle._returns_tensor
    monkeypatch.setattr(idle, "_returns_tensor", lambda graph: asked.append(graph) or original(graph))
    roots = [MLP(), Pair(), InPlace(), MLP()]
    graphs = [fx.symbolic_trace(r).graph for r in roots]
    plain = [skippable(g, r) for g, r in zip(graphs, roots)]
    assert plain == [True, False, False, True]
    asked.clear()
    with skippable_fixed():
        with skippable_fixed():  # nested: the outer table stays
            assert [skippable(g, r) for g, r in zip(graphs, roots)] == plain
        assert [skippable(g, r) for g, r in zip(graphs, roots)] == plain
        assert skippable(graphs[0], roots[3]) is True  # another root: asked on its own
    assert len(asked) == 5
    assert skippable(graphs[0], roots[0]) and len(asked) == 6  # outside: asked again
