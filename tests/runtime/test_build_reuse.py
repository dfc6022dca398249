"""Identical blocks are rewritten and compiled once per call pattern (`fxlora.runtime.builds.built_once`,
`Build.function`); blocks whose adapters differ (rank, alpha, which layers) get their own code."""

import pytest
import torch

import fxlora
from fxlora import LoraConfig
from fxlora.runtime import builds as builds_module
from fxlora.runtime.forwards import installed_forward
from models import Block, Blocks, Opaque
from zoo import tiny_timm


def gated_functions(model, n):
    return [next(iter(model.get_submodule(f"blocks.{i}").forward.gated_code().values())).fn for i in range(n)]


def pair(config: dict, n: int = 4):
    torch.manual_seed(0)
    model = fxlora.transform(Opaque([Block() for _ in range(n)]), LoraConfig(init_lora_weights=False, **config))
    ref = fxlora.transform(Opaque([Block() for _ in range(n)]), LoraConfig(**config), trace="eager")
    ref.load_state_dict(model.state_dict())
    return model, ref


def test_identical_blocks_share_one_build(monkeypatch):
    builds = []
    original = builds_module.compile_graph
    monkeypatch.setattr(builds_module, "compile_graph", lambda graph: builds.append(graph) or original(graph))
    copies = []
    graph_copy = torch.fx.Graph.__deepcopy__
    monkeypatch.setattr(torch.fx.Graph, "__deepcopy__", lambda self, memo: copies.append(self) or graph_copy(self, memo))
    model, ref = pair(dict(target_modules=["fc1", "fc2"]))
    fns = gated_functions(model, 4)
    assert all(fn is fns[0] for fn in fns)
    assert len(builds) == 1
    assert len(copies) == 1  # the rewrite's copy of the traced graph is the one lowered, too
    x = torch.randn(3, 8)
    assert torch.equal(model(x), ref(x))


def test_blocks_with_other_adapters_build_their_own_code():
    model, ref = pair(dict(target_modules=["fc1", "fc2"], rank_pattern={"blocks.1.fc1": 4}, alpha_pattern={"blocks.2.fc2": 3}))
    fns = gated_functions(model, 4)
    assert fns[0] is fns[3] and fns[1] is not fns[0] and fns[2] is not fns[0] and fns[1] is not fns[2]
    x = torch.randn(3, 8)
    assert torch.equal(model(x), ref(x))
    model.train(), ref.train()
    assert torch.equal(model(x), ref(x))


def test_the_build_state_sees_adapters_and_layers():
    a, b = Block(), Block()
    assert builds_module.build_state(a) == builds_module.build_state(b)
    fxlora.transform(b, LoraConfig(target_modules=["fc1"]))
    assert builds_module.build_state(a) != builds_module.build_state(b)
    c = Block()
    fxlora.transform(c, LoraConfig(target_modules=["fc1"], lora_dropout=0.1))
    assert builds_module.build_state(b) != builds_module.build_state(c)


def test_a_block_with_a_replaced_layer_forward_gets_its_own_lowering():
    """Block 1's ``fc1`` had its instance forward replaced before the transform: its base call must
    go through that forward (not be lowered), while the blocks share one build."""
    torch.manual_seed(0)
    blocks = [Block() for _ in range(3)]
    calls = []
    layer = blocks[1].fc1
    layer.forward = lambda x: calls.append(1) or torch.nn.Linear.forward(layer, x)
    model = fxlora.transform(Opaque(blocks), LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights=False))
    fns = gated_functions(model, 3)
    assert fns[0] is fns[2] and fns[1] is not fns[0]
    ref = fxlora.transform(Opaque([Block() for _ in range(3)]), LoraConfig(target_modules=["fc1", "fc2"]), trace="eager")
    ref.load_state_dict(model.state_dict())
    x = torch.randn(3, 8)
    calls.clear()
    assert torch.equal(model(x), ref(x))
    assert calls == [1]


def test_graph_roots_called_whole_are_outside_the_callers_build_state():
    """A module its graph calls as a graph root of its own (never reaching into it) contributes
    its call, not its insides, to the caller's build state; one the graph reads into stays in."""
    model = Blocks(n=3)
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("blocks.0", (x,))
    y = graph.call_module("blocks.1", (y,))
    w = graph.get_attr("blocks.1.fc1.weight")
    y = graph.call_module("blocks.2", (graph.call_function(torch.add, (y, w)),))
    graph.output(graph.call_module("head", (y,)))
    closed = builds_module.closed_roots([graph], lambda m: isinstance(m, Block), model)
    assert closed == ("blocks.0", "blocks.2")  # blocks.1 is read into; head is no graph root
    state = builds_module.build_state(model, closed)
    names = [entry[0] for entry in state]
    assert "blocks.0" in names and not any(n.startswith(("blocks.0.", "blocks.2.")) for n in names)
    assert "blocks.1.fc1" in names and "head" in names
    before = state
    fxlora.transform(model.blocks[0], LoraConfig(target_modules=["fc1"]))
    assert builds_module.build_state(model, closed) == before  # what changed is the block's own concern
    model.head = torch.nn.Linear(8, 4)
    assert builds_module.build_state(model, closed) != before


def test_a_vit_root_state_leaves_out_its_blocks():
    pytest.importorskip("timm")

    vit = fxlora.transform(tiny_timm("vit")[0], LoraConfig(target_modules=["qkv", "fc1", "patch_embed.proj"]))
    forward = installed_forward(vit.model)
    assert [n for n in vit.graph_roots if n] == [f"blocks.{i}" for i in range(len(vit.model.blocks))]
    names = [entry[0] for entry in forward._state()]
    assert "blocks.0" in names and not any(n.startswith("blocks.0.") for n in names)


def test_refreshing_all_roots_together_builds_what_refreshing_each_alone_builds(cond_kept):
    """`refresh_all` walks each tree and asks `skippable` once per graph and root: the code it
    builds (gated and base-only, for the model root and its blocks) is what a lone refresh builds."""
    pytest.importorskip("timm")
    from fxlora.runtime.forwards import graph_forwards
    from fxlora.runtime.install import refresh_all

    vit = fxlora.transform(tiny_timm("vit")[0].eval(), LoraConfig(target_modules=["qkv", "fc1", "patch_embed.proj"]))
    forwards = graph_forwards(vit.model)
    assert len(forwards) > 2

    def codes():
        return [(key, code.fn, code.idle is not None, code.idle and code.idle.fn) for f in forwards for key, code in f.gated_code().items()]

    together = codes()
    assert any(gated for _, _, gated, _ in together)  # the blocks' evaluation code has its base-only twin
    for forward in reversed(forwards):  # alone, blocks last: nothing memoised
        forward.refresh()
    assert codes() == together
    refresh_all(forwards)
    assert codes() == together
