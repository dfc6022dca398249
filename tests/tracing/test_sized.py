"""Sized call patterns: code deciding on sizes 0 or 1 of its arguments (RWKV's ``x.size(1) == 1``)
traces, each graph holding for every call of its pattern, and never for another; item assignment
on traced tensors; RWKV wholly in a graph, equal to peft."""

import operator

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from fxlora.errors import TraceFailure
from fxlora.passes.share_lora_a import _groups
from fxlora.tracing.call_keys import MANY, call_key, erase_sizes, key_is_sized, size_class
from fxlora.tracing.proxies import DimInfo, SizesInfo, TensorInfo, decide_comparison, infer
from fxlora.tracing.traced import trace_through_ids, trace_variant

_OPS = [operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge]


def _sizes_of(cls: int) -> range:
    return range(cls, cls + 1) if cls < MANY else range(MANY, 12)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([0, 1, MANY]), st.sampled_from(_OPS), st.integers(-3, 6), st.booleans())
def test_a_decided_comparison_holds_for_every_size_of_the_class(cls, op, number, mirrored):
    args = (number, _Sized(cls)) if mirrored else (_Sized(cls), number)
    decided = decide_comparison(op, args)
    expected = {op(*((number, n) if mirrored else (n, number))) for n in _sizes_of(cls)}
    if cls < MANY:
        assert decided is not None  # an exact size: every comparison with a number is known
    if decided is not None:
        assert expected == {decided}
    else:
        assert len(expected) == 2  # undecided only where sizes of the class disagree


class _Sized:
    """Stands for a traced size carrying `DimInfo` (what `info_of` reads)."""

    def __init__(self, cls: int) -> None:
        self.info = DimInfo(cls)


@pytest.fixture(autouse=True)
def _sized_stands_in_for_a_proxy(monkeypatch):
    import fxlora.tracing.proxies as proxies

    original = proxies.info_of
    monkeypatch.setattr(proxies, "info_of", lambda v: v.info if isinstance(v, _Sized) else original(v))


def test_size_classes_are_part_of_a_sized_key_only():
    one, many = torch.zeros(2, 1, 4), torch.zeros(2, 5, 4)
    assert call_key(False, (one,), {}, ranked=True) == call_key(False, (many,), {}, ranked=True)
    sized = call_key(False, (one,), {}, ranked=True, sized=True)
    assert sized != call_key(False, (many,), {}, ranked=True, sized=True)
    assert sized.positional == (("T", 3, (MANY, 1, MANY)),) and key_is_sized(sized)
    assert erase_sizes(sized) == call_key(False, (one,), {}, ranked=True)
    assert [size_class(n) for n in (0, 1, 2, 7)] == [0, 1, MANY, MANY]


def test_size_rules_carry_classes_only_from_arguments():
    x = TensorInfo(3, (MANY, 1, MANY))
    proxy = _Sized(0)
    proxy.info = x
    assert infer("call_method", "size", (proxy, 1), {}, None, ()) == DimInfo(1)
    assert infer("call_method", "size", (proxy,), {}, None, ()) == SizesInfo(3, (MANY, 1, MANY))
    assert infer("call_function", getattr, (proxy, "shape"), {}, None, ()) == SizesInfo(3, (MANY, 1, MANY))
    assert infer("call_method", "transpose", (proxy, 0, 1), {}, None, ()) == TensorInfo(3)  # results: rank only


class OneStep(nn.Module):
    """A recurrent step: a one-token call reads the state, a longer one shifts the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.key = nn.Linear(4, 4)

    def forward(self, x, state):
        if x.size(1) == 1:
            shifted = state
        else:
            shifted = torch.cat([state, x[:, :-1]], dim=1)
            shifted[:, 0] = 0.5 * shifted[:, 0]  # item assignment on a traced tensor
        return self.key(x + shifted)


def test_sized_patterns_trace_a_branch_on_size_one_exactly():
    model = OneStep()
    through = trace_through_ids(model, [model.key])
    state = torch.randn(2, 1, 4)
    for steps in (1, 5):
        x = torch.randn(2, steps, 4)
        key = call_key(False, (x, state), {}, ranked=True, sized=True)
        with pytest.raises(TraceFailure, match="control flow"):
            trace_variant(model, through, erase_sizes(key))
        variant = trace_variant(model, through, key)
        assert variant.key == key
        module = torch.fx.GraphModule(model, variant.graph)
        for other in (x, torch.randn(3, steps, 4)):  # another batch, same classes: the graph holds
            torch.testing.assert_close(module(other, state[:1].expand(other.shape[0], 1, 4)), model(other, state[:1].expand(other.shape[0], 1, 4)))
        assert any(n.target is operator.setitem for n in variant.graph.nodes) == (steps > 1)


def test_ranked_graphs_are_kept_when_sizes_are_not_needed():
    model = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(1, 4)
    variant = trace_variant(model, trace_through_ids(model, [model[0]]), call_key(False, (x,), {}, ranked=True, sized=True))
    assert not key_is_sized(variant.key)  # holds for any size class: no retrace on batch size changes


class Mutating(nn.Module):
    """q, then an in-place write to the shared input, then k: k must see the written input."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)

    def forward(self, x):
        x = x * 1.0
        q = self.q(x)
        x[:, 0] = 0.0
        return q + self.k(x)


class ReluInPlace(Mutating):
    """The same with ``F.relu(x, inplace=True)`` as the write."""

    def forward(self, x):
        x = x * 1.0
        q = self.q(x)
        torch.nn.functional.relu(x, inplace=True)
        return q + self.k(x)


@pytest.mark.parametrize("model", [Mutating, ReluInPlace])
def test_a_products_are_not_shared_across_an_in_place_write(model):
    pytest.importorskip("peft")
    from models import paired

    torch.manual_seed(0)
    reference, ours = paired(model(), ["q", "k"])
    assert ours.target_paths == {"q": "graph", "k": "graph"}
    x = torch.randn(3, 4)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)  # the gated code, where A products are shared
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x))
        torch.testing.assert_close(ours(x), reference(x))


def test_share_groups_split_at_in_place_writes():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(operator.setitem, (x, 0, 0.0))
    graph.call_method("add_", (x, 1.0))
    assert list(_groups(graph, nn.Module())) == []  # no A calls: nothing grouped, writes only counted


# ------------------------------------------------------------------ RWKV
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from models import paired  # noqa: E402
from zoo_sweep import SWEEP, build, sweep_inputs  # noqa: E402


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_rwkv_is_wholly_in_a_graph_and_equal_to_peft(targets, eager_fallbacks):
    base = build("rwkv")
    reference, ours = paired(base, SWEEP["rwkv"].targets if targets is None else targets)
    assert set(ours.target_paths.values()) == {"graph"} and len(ours.target_paths) == 14
    inputs = sweep_inputs(base)
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, reference(**inputs).logits)
        # one-token steps with the recurrent state: the `size(1) == 1` branch, traced as its own pattern
        out = ours.generate(inputs["input_ids"], max_new_tokens=4, do_sample=False)
        assert torch.equal(out, reference.generate(inputs["input_ids"], max_new_tokens=4, do_sample=False))
    ours.train(), reference.train()
    ours(**inputs, labels=inputs["input_ids"]).loss.backward()
    reference(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(grads) == 28
    for name, grad in grads.items():
        assert torch.equal(grad, reference.get_parameter("base_model.model." + name).grad), name
    assert eager_fallbacks == []
