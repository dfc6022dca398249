"""Alike blocks computed once per call in the probe (`fxlora.tracing.probe_blocks`): the calls it
records equal those of a probe that computes every block, in fewer forwards."""

import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from fxlora.tracing import probe
from fxlora.tracing.call_keys import call_key
from fxlora.tracing.probe import observe_calls
from fxlora.tracing.probe_blocks import AlikeBlocks
from zoo import TRANSFORMERS, tiny_timm

CALLS: Counter = Counter()


class Inner(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, scale=None):
        CALLS[id(self)] += 1
        return self.fc(x) if scale is None else self.fc(x) * scale


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.inner = Inner(d)
        self.out = nn.Linear(d, d)

    def forward(self, x, scale=None):
        return self.out(self.inner(x, scale=scale)) + x


class Stack(nn.Module):
    """Blocks of widths `widths` (alike where the widths are equal), each called with the running
    input, or with a scale from `scaled` (index -> whether it gets ``scale=``)."""

    def __init__(self, widths: list[int], scaled: frozenset = frozenset()):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for d in widths)
        self.scaled = scaled

    def forward(self, x):
        outs = []
        for i, block in enumerate(self.blocks):
            d = block.out.in_features
            outs.append(block(x[..., :d], scale=2.0 if i in self.scaled else None))
        return outs


def _recorded(model: nn.Module, x: torch.Tensor, share: bool) -> tuple[list, Counter]:
    """(module name, call pattern) for every module call a forward records, and how often each
    `Inner` computed."""
    records: list = []
    names = {id(m): n for n, m in model.named_modules()}

    def record(module, args, kwargs):
        records.append((id(module), call_key(False, args, kwargs, ranked=True, sized=True)))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()]
    CALLS.clear()
    try:
        with torch.no_grad():
            if share:
                with AlikeBlocks(model, records):
                    model(x)
            else:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return [(names[i], k) for i, k in records], Counter(CALLS)


@settings(max_examples=40, deadline=None)
@given(
    widths=st.lists(st.sampled_from([4, 6]), min_size=1, max_size=6),
    scaled=st.frozensets(st.integers(0, 5)),
    batch=st.integers(1, 3),
)
def test_records_the_calls_a_full_forward_records_and_computes_each_alike_call_once(widths, scaled, batch):
    model = Stack(widths, scaled)
    x = torch.randn(batch, 6)
    full, full_calls = _recorded(model, x, share=False)
    shared, shared_calls = _recorded(model, x, share=True)
    assert sorted(shared) == sorted(full)  # the same calls, each block's recorded as its own
    signatures = {(d, i in scaled) for i, d in enumerate(widths)}  # width and keyword: one computed call each
    assert sum(shared_calls.values()) == len(signatures) and sum(full_calls.values()) == len(widths)


def test_blocks_whose_tensors_differ_are_not_alike():
    model = Stack([4, 4])
    with torch.no_grad():
        model.blocks[1].out.weight = nn.Parameter(torch.randn(4, 4).double())
    assert not AlikeBlocks(model, [])
    assert AlikeBlocks(Stack([4, 4]), [])


def test_forwards_are_put_back_on_exit_also_after_an_error():
    model = Stack([4, 4])
    own = model.blocks[1].forward  # a bound method set on the instance (a wrapper would be alike)
    model.blocks[1].forward = own
    with pytest.raises(RuntimeError):
        with AlikeBlocks(model, []):
            model(torch.ones(2, 6, dtype=torch.long))  # no integer linear layers
    assert "forward" not in model.blocks[0].__dict__
    assert model.blocks[1].__dict__["forward"] is own


class _Hooks:
    def __init__(self, examples):
        self.example_inputs = lambda model: examples


class SameOutputRejected(nn.Module):
    """Rejects the example when its two blocks return the same object (as sharing makes them)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(4), Block(4)])

    def forward(self, x):
        a, b = self.blocks[0](x), self.blocks[1](x)
        if a is b:
            raise ValueError("a model whose code tells shared outputs apart")
        return a + b


def test_an_example_that_fails_with_blocks_shared_is_run_again_computing_every_block(monkeypatch):
    model = SameOutputRejected()
    monkeypatch.setattr(probe, "hooks_for", lambda m: _Hooks([((torch.randn(2, 4),), {})]))
    shared = observe_calls(model)
    full = observe_calls(model, share_blocks=False)
    assert shared == full and id(model.blocks[1].inner) in shared


@pytest.mark.parametrize("name", ["llama", "gemma", "gpt2", "bert", "bart"])
def test_transformers_models_are_observed_as_by_a_full_probe(name):
    pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TRANSFORMERS[name].build()
    assert AlikeBlocks(model, [])  # it has alike blocks to share
    assert observe_calls(model) == observe_calls(model, share_blocks=False)


def test_a_timm_vit_is_observed_as_by_a_full_probe_with_its_blocks_computed_once():
    pytest.importorskip("timm")
    model = tiny_timm("vit")[0]
    blocks = list(model.blocks)
    assert len(blocks) > 1
    computed = Counter()
    handles = [b.attn.register_forward_hook(lambda m, a, o: computed.update([id(m)])) for b in blocks]
    try:
        shared = observe_calls(model)
    finally:
        for h in handles:
            h.remove()
    assert shared == observe_calls(model, share_blocks=False)
    assert sum(computed.values()) == 1  # the other blocks' attention recorded, not computed
    assert all(id(b.attn) in shared for b in blocks)


@pytest.mark.parametrize("layer", [0, 1])
def test_observing_one_layer_records_it_and_what_contains_it_as_a_full_probe_does(layer):
    """Blocks are alike only where the probe records the same of them: observing a module of one
    layer records neither more nor less for that layer or its siblings."""
    model = TRANSFORMERS["llama"].build()
    picked = model.model.layers[layer].self_attn.q_proj
    assert observe_calls(model, [picked]) == observe_calls(model, [picked], share_blocks=False)
