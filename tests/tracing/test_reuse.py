"""Identical roots are traced once per call pattern (`fxlora.tracing.reuse.TraceCache`); roots
that differ only in plain values that reach the graph as numbers share one lifted trace, which
reads each root's own value when it runs; roots whose values decide Python control flow are
traced on their own."""

import copy

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.tracing import reuse
from fxlora.tracing.call_keys import canonical_key
from fxlora.tracing.traced import trace_through_ids
from models import Block, Opaque, Scaled, assert_same_cached_decoding, copy_peft_adapter_weights


class Branching(Block):
    """A block whose plain attribute decides Python control flow: its value shapes the graph."""

    def __init__(self, idx: int):
        super().__init__()
        self.idx = idx

    def forward(self, x):
        y = super().forward(x)
        if self.idx % 2:  # odd blocks double
            y = y * 2
        return y


class Looping(Block):
    """A block that runs its layer `repeats` times (a Python loop over a plain attribute)."""

    def __init__(self, repeats: int):
        super().__init__()
        self.repeats = repeats

    def forward(self, x):
        for _ in range(self.repeats):
            x = self.fc1(x)
        return x


class Windowed(Block):
    """A block keeping the last `window` positions (sliding-window style): a slice bound only."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, x):
        return self.fc1(x)[:, -self.window :]


class Tabled(Block):
    """A block reading a number from a dict and a shape from a tuple it holds (both baked in)."""

    def __init__(self, factor: float, shape: tuple):
        super().__init__()
        self.table = {"factor": factor}
        self.shape = shape

    def forward(self, x):
        return (super().forward(x) * self.table["factor"]).reshape(self.shape)


def count_traces(monkeypatch) -> list:
    calls = []
    original = reuse.trace_variant

    def spy(root, through, key, **options):
        calls.append(type(root).__name__ + (" lifted" if "tracer" in options else ""))
        return original(root, through, key, **options)

    monkeypatch.setattr(reuse, "trace_variant", spy)
    return calls


def transformed_and_eager(make, targets=("fc1", "fc2"), x=None):
    """fxlora's graph model and an eager-only reference with the same (non-zero) adapter weights."""
    torch.manual_seed(0)
    model = fxlora.transform(make(), LoraConfig(target_modules=list(targets), init_lora_weights=False))
    ref = fxlora.transform(make(), LoraConfig(target_modules=list(targets)), trace="eager")
    ref.load_state_dict(model.state_dict())
    return model, ref


def test_identical_blocks_are_traced_once(monkeypatch):
    calls = count_traces(monkeypatch)
    model, ref = transformed_and_eager(lambda: Opaque([Block() for _ in range(4)]))
    assert model.graph_roots == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert calls.count("Block") == 1 and "Block lifted" not in calls
    x = torch.randn(3, 8)
    assert torch.equal(model(x), ref(x))


def test_a_root_of_a_class_no_other_module_has_is_traced_without_a_fingerprint(monkeypatch):
    described = []
    original = reuse._describe_modules
    monkeypatch.setattr(reuse, "_describe_modules", lambda root, through: described.append(type(root).__name__) or original(root, through))
    calls = count_traces(monkeypatch)
    model, ref = transformed_and_eager(lambda: Opaque([Block() for _ in range(3)] + [Scaled(0.5)]))
    assert "Scaled" in calls and "Scaled" not in described  # unique: nothing to share, nothing described
    assert described.count("Block") == 3 and calls.count("Block") == 1  # the identical blocks still share
    x = torch.randn(3, 8)
    assert torch.equal(model(x), ref(x))


def test_a_value_reaching_the_graph_as_a_number_is_lifted_and_read_per_block(monkeypatch):
    calls = count_traces(monkeypatch)
    model, ref = transformed_and_eager(lambda: Opaque([Scaled(1.0), Scaled(2.0), Scaled(3.0), Scaled(2.0)]), ["fc1"])
    assert calls.count("Scaled") == 1 and calls.count("Scaled lifted") == 1  # the first block, then one lifted trace
    graphs = [next(iter(model.get_submodule(f"blocks.{i}").forward.variants.values())).graph for i in range(4)]
    assert all(g is graphs[0] for g in graphs)  # the first block adopted the lifted graph too: one build for all
    assert "self.scale" in model.get_submodule("blocks.2").forward.graph_code()
    x = torch.randn(3, 8)
    assert torch.equal(model(x), ref(x))
    model.get_submodule("blocks.3").scale = 5.0  # read when the code runs (and its guard retraces anyway)
    ref.get_submodule("blocks.3").scale = 5.0
    assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("make", [lambda i: Branching(i), lambda i: Looping(i + 1)], ids=["if", "range"])
def test_a_value_deciding_control_flow_is_not_shared(monkeypatch, make):
    calls = count_traces(monkeypatch)
    name = type(make(0)).__name__
    model, ref = transformed_and_eager(lambda: Opaque([make(i) for i in range(4)]), ["fc1"])
    assert calls.count(name + " lifted") == 1  # tried once for the family, refused
    assert calls.count(name) == 4  # then every block on its own
    x = torch.randn(3, 8)
    assert torch.equal(model(x), ref(x))
    outs = [model.get_submodule(f"blocks.{i}")(x) for i in range(2)]
    refs = [ref.get_submodule(f"blocks.{i}")(x) for i in range(2)]
    assert all(torch.equal(o, r) for o, r in zip(outs, refs))


def test_a_slice_bound_is_lifted_and_each_block_keeps_its_window(monkeypatch):
    calls = count_traces(monkeypatch)
    model, ref = transformed_and_eager(lambda: Opaque([Windowed(w) for w in (6, 5, 4)]), ["fc1"])
    assert calls.count("Windowed lifted") == 1
    x = torch.randn(2, 8, 8)
    out = model(x)
    assert out.shape == (2, 4, 8)
    assert torch.equal(out, ref(x))


def test_values_of_another_type_are_never_lifted(monkeypatch):
    calls = count_traces(monkeypatch)
    model, ref = transformed_and_eager(lambda: Opaque([Scaled(1.0), Scaled(2), Scaled(True)]), ["fc1"])
    assert not any(c.endswith("lifted") for c in calls)
    x = torch.randn(3, 8)
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


def test_tiny_llama_blocks_share_lifted_traces_and_equal_peft(monkeypatch):
    """Attention blocks differ in ``layer_idx`` (handed to the KV cache): one trace for the first
    block and one lifted trace per call pattern, the rest reuse them; logits and a cached decoding
    step equal peft's (a wrong layer index would mix the layers' caches)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    calls = count_traces(monkeypatch)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    base = transformers.LlamaForCausalLM(config).eval()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear", init_lora_weights=False)).eval()
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules="all-linear")).eval()
    copy_peft_adapter_weights(reference, ours)
    patterns = calls.count("LlamaAttention")
    assert patterns >= 1 and calls.count("LlamaAttention lifted") == patterns  # not 4 traces per pattern
    graphs = [v.graph for v in ours.get_submodule("model.layers.3.self_attn").forward.variants.values()]
    assert any(n.op == "get_attr" and n.target == "layer_idx" for g in graphs for n in g.nodes)  # read when run
    assert_same_cached_decoding(ours, reference, 96)


def test_blocks_differing_in_held_objects_or_tuples_are_traced_apart(monkeypatch):
    calls = count_traces(monkeypatch)
    blocks = lambda: Opaque([Tabled(1.0, (3, 8)), Tabled(2.0, (3, 8)), Tabled(1.0, (24,))])  # noqa: E731
    model, ref = transformed_and_eager(blocks, ["fc1"])
    assert calls.count("Tabled") == 3  # each dict is its own object; the tuples differ
    x = torch.randn(3, 8)
    for i in range(3):
        assert torch.equal(model.get_submodule(f"blocks.{i}")(x), ref.get_submodule(f"blocks.{i}")(x))


class Wrapping(nn.Module):
    """A root tracing through a custom child (whose forward its graph inlines)."""

    def __init__(self):
        super().__init__()
        self.inner = Block()

    def forward(self, x):
        return self.inner(x)


def test_a_roots_own_instance_forward_is_not_in_its_fingerprint_but_a_childs_is():
    """A root's trace follows its class's ``forward`` (its instance ``forward`` is fxlora's once
    adapted: blocks must still match); a child traced through runs its instance ``forward``."""
    a, b = Wrapping(), Wrapping()
    key = canonical_key(a, True)

    def fp(root):
        return reuse.fingerprint(root, trace_through_ids(root, [root.inner.fc1]), key)

    assert id(a.inner) in trace_through_ids(a, [a.inner.fc1])
    b.forward = lambda x: x  # noqa: E731
    assert fp(a) == fp(b)
    b.inner.forward = lambda x: x  # noqa: E731
    assert fp(a) != fp(b)
