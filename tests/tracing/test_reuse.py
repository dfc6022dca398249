"""Identical roots are traced once per call pattern (`fxlora.tracing.reuse.TraceCache`); roots
that differ in anything a trace can depend on are traced on their own."""

import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.tracing import reuse
from fxlora.tracing.call_keys import canonical_key
from fxlora.tracing.traced import trace_through_ids
from models import Block


class Scaled(Block):
    """A block whose forward reads a plain attribute (baked into its graph)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale


class Opaque(nn.Module):
    """Blocks called through a Python loop over a list: each block is its own root."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in list(self.blocks):
            if x.sum() > 1e9:  # data-dependent: the whole model does not trace
                break
            x = block(x)
        return x


def count_traces(monkeypatch) -> list:
    calls = []
    original = reuse.trace_variant

    def spy(root, through, key):
        calls.append(type(root).__name__)
        return original(root, through, key)

    monkeypatch.setattr(reuse, "trace_variant", spy)
    return calls


def test_identical_blocks_are_traced_once(monkeypatch):
    calls = count_traces(monkeypatch)
    torch.manual_seed(0)
    model = fxlora.transform(Opaque([Block() for _ in range(4)]), LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights=False))
    assert model.graph_roots == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert calls.count("Block") == 1
    x = torch.randn(3, 8)
    ref = fxlora.transform(Opaque([Block() for _ in range(4)]), LoraConfig(target_modules=["fc1", "fc2"]), trace="eager")
    ref.load_state_dict(model.state_dict())
    assert torch.equal(model(x), ref(x))


def test_blocks_differing_in_a_baked_attribute_are_traced_apart(monkeypatch):
    calls = count_traces(monkeypatch)
    torch.manual_seed(0)
    model = fxlora.transform(Opaque([Scaled(1.0), Scaled(2.0), Scaled(2.0)]), LoraConfig(target_modules=["fc1"], init_lora_weights=False))
    assert calls.count("Scaled") == 2
    x = torch.randn(3, 8)
    ref = fxlora.transform(Opaque([Scaled(1.0), Scaled(2.0), Scaled(2.0)]), LoraConfig(target_modules=["fc1"]), trace="eager")
    ref.load_state_dict(model.state_dict())
    assert torch.equal(model(x), ref(x))


def test_the_fingerprint_sees_shapes_and_classes():
    a, b, c = Block(8), Block(8), Block(16)
    key = canonical_key(a, True)

    def fp(block):
        return reuse.fingerprint(block, trace_through_ids(block, [block.fc1]), key)

    assert fp(a) == fp(b)
    assert fp(a) != fp(c)  # other shapes
    b.norm = nn.Identity()
    assert fp(a) != fp(b)  # another child class
