"""Identical blocks are rewritten and compiled once per call pattern (`fxlora.runtime.codegen.built_once`,
`lowered_once`); blocks whose adapters differ (rank, alpha, which layers) get their own code."""

import torch

import fxlora
from fxlora import LoraConfig
from fxlora.runtime import codegen
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
    original = codegen.compile_graph
    monkeypatch.setattr(codegen, "compile_graph", lambda graph: builds.append(graph) or original(graph))
    model, ref = pair(dict(target_modules=["fc1", "fc2"]))
    fns = gated_functions(model, 4)
    assert all(fn is fns[0] for fn in fns)
    assert len(builds) == 1
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
    assert codegen.build_state(a) == codegen.build_state(b)
    fxlora.transform(b, LoraConfig(target_modules=["fc1"]))
    assert codegen.build_state(a) != codegen.build_state(b)
    c = Block()
    fxlora.transform(c, LoraConfig(target_modules=["fc1"], lora_dropout=0.1))
    assert codegen.build_state(b) != codegen.build_state(c)
