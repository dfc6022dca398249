"""Identical blocks are rewritten and compiled once per call pattern (`fxlora.runtime.builds.built_once`,
`Build.function`); blocks whose adapters differ (rank, alpha, which layers) get their own code."""

import torch

import fxlora
from fxlora import LoraConfig
from fxlora.runtime import builds as builds_module
from models import Block, Opaque


def gated_functions(model, n):
    return [next(iter(model.get_submodule(f"blocks.{i}").forward._gated.values())).fn for i in range(n)]


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
