"""A mode switch prepares every graph root through one trace cache (`fxlora.runtime.install.prepare_all`):
identical blocks are traced once per call pattern, blocks differing in a number their graph
carries share one lifted trace, blocks whose values decide control flow are traced on their own,
and every block computes exactly what its eager forward computes in the new mode."""

import copy

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.runtime import forwards
from fxlora.tracing import reuse, traced
from models import Block, Opaque, Scaled, assert_same_cached_decoding, copy_peft_adapter_weights


class ModeBranching(Block):
    """Python control flow on the training flag and on a plain attribute: the two modes' graphs
    differ, and so do odd and even blocks."""

    def __init__(self, idx: int):
        super().__init__()
        self.idx = idx

    def forward(self, x):
        y = super().forward(x)
        if self.training:
            y = y + 1
        if self.idx % 2:
            y = y * 2
        return y


def count_traces(monkeypatch) -> list[str]:
    """Every trace of a graph root, shared (`TraceCache`) or on its own (`GraphForward.traced`)."""
    calls: list[str] = []

    def spying(module):
        original = module.trace_variant

        def spy(root, through, key, **options):
            calls.append(type(root).__name__ + (" lifted" if "tracer" in options else ""))
            return original(root, through, key, **options)

        monkeypatch.setattr(module, "trace_variant", spy)

    spying(reuse)  # every root's trace goes through a TraceCache
    return calls


def in_train_mode(make, targets=("fc1", "fc2")):
    """fxlora's graph model, transformed in training mode, and an eager reference with its weights."""
    torch.manual_seed(0)
    model = fxlora.transform(make().train(), LoraConfig(target_modules=list(targets), init_lora_weights=False))
    ref = fxlora.transform(make().train(), LoraConfig(target_modules=list(targets)), trace="eager")
    ref.load_state_dict(model.state_dict())
    return model, ref


def eval_functions(model, n):
    return [code.fn for i in range(n) for key, code in model.get_submodule(f"blocks.{i}").forward.gated_code().items() if not key[0]]


def test_identical_blocks_are_traced_once_when_the_mode_switches(monkeypatch):
    model, ref = in_train_mode(lambda: Opaque([Block() for _ in range(4)]))
    calls = count_traces(monkeypatch)
    model.eval(), ref.eval()
    assert calls == ["Block"]  # not once per block
    fns = eval_functions(model, 4)
    assert len(fns) == 4 and all(fn is fns[0] for fn in fns)  # and one build for all
    x = torch.randn(3, 8)
    assert torch.equal(model(x), ref(x))
    calls.clear()
    model.train(), ref.train()
    assert calls == []  # the training patterns were planned
    assert torch.equal(model(x), ref(x))


def test_blocks_differing_in_a_number_share_a_lifted_trace_after_a_switch(monkeypatch):
    model, ref = in_train_mode(lambda: Opaque([Scaled(s) for s in (1.0, 2.0, 3.0, 2.0)]), ["fc1"])
    calls = count_traces(monkeypatch)
    model.eval(), ref.eval()
    assert sorted(calls) == ["Scaled", "Scaled lifted"]
    x = torch.randn(3, 8)
    assert torch.equal(model(x), ref(x))
    for i in range(4):
        assert torch.equal(model.get_submodule(f"blocks.{i}")(x), ref.get_submodule(f"blocks.{i}")(x))


def test_blocks_whose_values_decide_control_flow_are_traced_apart_after_a_switch(monkeypatch):
    model, ref = in_train_mode(lambda: Opaque([ModeBranching(i) for i in range(4)]), ["fc1"])
    x = torch.randn(3, 8)
    assert torch.equal(model(x), ref(x))
    calls = count_traces(monkeypatch)
    model.eval(), ref.eval()
    assert calls.count("ModeBranching") == 4 and calls.count("ModeBranching lifted") == 1  # tried, refused
    for i in range(4):  # each block's own graph, for the new mode: no +1, odd blocks double
        assert torch.equal(model.get_submodule(f"blocks.{i}")(x), ref.get_submodule(f"blocks.{i}")(x))
    assert torch.equal(model(x), ref(x))
    model.train(), ref.train()
    assert torch.equal(model(x), ref(x))


def test_tiny_llama_transformed_in_training_mode_switches_to_eval_with_lifted_traces(monkeypatch):
    """The decoder layers' attention blocks differ in ``layer_idx`` (the KV cache's index): after
    the switch, one trace and one lifted trace per call pattern; logits and a cached decoding step
    equal peft's (a wrong index would mix the layers' caches)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    base = transformers.LlamaForCausalLM(config).train()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear", init_lora_weights=False))
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules="all-linear"))
    copy_peft_adapter_weights(reference, ours)
    calls = count_traces(monkeypatch)
    traces = []
    monkeypatch.setattr(traced, "_trace", lambda *a, _trace=traced._trace, **k: traces.append(1) or _trace(*a, **k))
    ours.eval(), reference.eval()
    patterns = calls.count("LlamaAttention")
    assert patterns >= 1 and calls.count("LlamaAttention lifted") == patterns  # not one trace per layer
    assert calls.count("LlamaMLP") == 1
    assert len(traces) == 2 * patterns + 1  # no rank-free attempt: the attention needed ranks when planned
    assert_same_cached_decoding(ours, reference, 96)


class OptionalScale(Block):
    """A block with an optional argument: planned for its plainest call (``x`` alone)."""

    def forward(self, x, scale=None):
        y = super().forward(x)
        return y if scale is None else y * scale


class LoopWithScale(nn.Module):
    """Blocks in a Python loop the model's graph cannot hold (data-dependent), each handed a scale."""

    def __init__(self, n: int):
        super().__init__()
        self.blocks = nn.ModuleList(OptionalScale() for _ in range(n))

    def forward(self, x, scale=None):
        for block in self.blocks:
            if x.sum() > 1e9:
                break
            x = block(x, scale=scale) if scale is not None else block(x)
        return x


def test_identical_blocks_meeting_a_new_pattern_in_one_call_trace_it_once(monkeypatch):
    """A pattern no plan covered, met by every block of one forward pass: the call's own trace
    cache traces it for the first block, the others reuse that trace (and its build); a later
    call starts with a cache of its own."""
    model, ref = in_train_mode(lambda: LoopWithScale(4))
    calls = count_traces(monkeypatch)
    x, scale = torch.randn(3, 8), torch.tensor(0.5)
    assert torch.equal(model(x, scale=scale), ref(x, scale=scale))
    assert calls == ["OptionalScale"]
    keyed = [f for f in (forwards.installed_forward(model.get_submodule(f"blocks.{i}")) for i in range(4))]
    graphs = {id(v.graph) for f in keyed for k, v in f.variants.items() if ("scale", "T") in k.named}
    assert len(graphs) == 1
    model.eval(), ref.eval()
    assert torch.equal(model(x, scale=scale), ref(x, scale=scale))
