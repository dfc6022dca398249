import torch
import torch.nn as nn

import pytest

from fxlora.errors import TraceFailure
from fxlora.tracing.call_keys import call_key, canonical_key
from fxlora.tracing.traced import trace_through_ids, trace_variant
from models import Branchy, MLP, OptionalArgs, Stateful


def test_call_key_distinguishes_patterns():
    t = torch.ones(1)
    assert call_key(True, (t,), {}) == (True, ("T",), ())
    assert call_key(True, (t, None), {}) != call_key(True, (t,), {})
    assert call_key(True, (t, 1), {}) != call_key(True, (t, True), {})  # 1 == True, but not the same pattern
    assert call_key(False, (t,), {"b": 2.0, "a": None}) == (False, ("T",), (("a", ("NoneType", None)), ("b", ("float", 2.0))))
    assert call_key(True, (t, [t]), {}) == (True, ("T", ("list", ("T",))), ())
    assert call_key(True, (t, object()), {}) is None
    assert call_key(True, (t,), {"x": float("nan")}) is None


def test_canonical_key_counts_required_parameters():
    assert canonical_key(OptionalArgs(), True) == (True, ("T",), ())
    assert canonical_key(MLP(4), False) == (False, ("T",), ())


def test_only_ancestors_of_interesting_modules_are_traced_through():
    model = MLP(4)
    through = trace_through_ids(model, [model.seq[2]])
    assert through == {id(model), id(model.seq)}
    graph = trace_variant(model, through, canonical_key(model, True)).graph
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    assert called == ["seq.0", "seq.1", "seq.2", "seq.3", "seq.4", "seq.5"]


def test_specialised_arguments_leave_no_placeholder_or_assert():
    model = OptionalArgs()
    through = trace_through_ids(model, [model.fc])
    key = call_key(True, (torch.ones(1),), {"scale": 2.0, "mask": torch.ones(1)})
    variant = trace_variant(model, through, key)
    placeholders = [n.target for n in variant.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", "mask"]
    assert variant.inputs == (0, "mask")
    assert not any("assert" in str(n.target) for n in variant.graph.nodes)


def test_training_flag_is_part_of_the_pattern_and_restored():
    model = OptionalArgs()
    model.eval()
    through = trace_through_ids(model, [model.fc])
    train = trace_variant(model, through, canonical_key(model, True)).graph
    evaluation = trace_variant(model, through, canonical_key(model, False)).graph
    assert any(n.target == "drop" for n in train.nodes) and not any(n.target == "drop" for n in evaluation.nodes)
    assert not model.training and not model.drop.training


def test_failures():
    model = Branchy()
    with pytest.raises(TraceFailure, match="TraceError|control flow"):
        trace_variant(model, trace_through_ids(model, [model.out]), canonical_key(model, True))
    stateful = Stateful()
    with pytest.raises(TraceFailure, match="changes the module's attributes"):
        trace_variant(stateful, trace_through_ids(stateful, [stateful.fc]), canonical_key(stateful, True))
    assert stateful.calls == 0
    with pytest.raises(TraceFailure, match="not a named parameter"):
        trace_variant(model, set(), (True, ("T",), (("bogus", "T"),)))


class WithConstants(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("shift", torch.ones(3))

    def forward(self, x):
        return self.fc(x) * torch.tensor([1.0, 2.0, 3.0]) + self.shift


def test_buffers_are_read_live_and_constants_kept_on_the_root():
    import fxlora

    model = WithConstants()
    x = torch.randn(2, 3)
    ref = model(x)
    lora = fxlora.transform(model, fxlora.LoraConfig(target_modules=["fc"]))
    assert lora.target_paths == {"fc": "graph"}
    torch.testing.assert_close(lora(x), ref)
    model.shift.fill_(5.0)  # a buffer changed after transform is seen by the graph code
    torch.testing.assert_close(lora(x), ref + 4.0)
    constants = [n for n, _ in model.named_buffers() if n.startswith("_fxlora_constant_")]
    assert len(constants) == 1 and constants[0] not in model.state_dict()
    assert not any(k.startswith("_tensor_constant") for k in model.__dict__)


# ------------------------------------------------------------------ richer call patterns
import functools

import fxlora
from fxlora.runtime.forwards import installed_forward
from fxlora.tracing.call_keys import SELF, gather_inputs


class TupleAndKeywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, pair=None, *extra, scale=1.0, **options):
        y = self.fc(x)
        if pair is not None:
            a, b = pair
            y = y * a + b
        for e in extra:
            y = y - e
        if options.get("double"):
            y = y * 2
        return y * scale


def test_tuples_varargs_and_extra_keywords_are_traced(eager_fallbacks):
    model = TupleAndKeywords()
    reference = TupleAndKeywords()
    reference.load_state_dict(model.state_dict())
    lora = fxlora.transform(model, fxlora.LoraConfig(target_modules=["fc"]))
    x, a, b, e = (torch.randn(2, 4) for _ in range(4))
    for args, kwargs in [((x,), {}), ((x, (a, b)), {"scale": 3.0}), ((x, [a, b], e, e), {"double": True})]:
        torch.testing.assert_close(lora(*args, **kwargs), reference(*args, **kwargs))
    assert eager_fallbacks == []
    variant = installed_forward(model).variants[call_key(True, (x, [a, b], e, e), {"double": True})]
    assert variant.inputs == (0, (1, 0), (1, 1), 2, 3)


def test_gather_inputs_follows_sources():
    root, t = nn.Linear(1, 1), torch.ones(1)
    assert gather_inputs((SELF, 1, "k", ("p", 1, 0)), root, (t, "arg1"), {"k": "kw", "p": (0, ("x", "y"))}) == [root, "arg1", "kw", "x"]


def unknown_decorator(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class Decorated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    @unknown_decorator
    def forward(self, x):
        return self.fc(x).relu()


def test_only_known_transparent_decorators_are_seen_through(monkeypatch):
    model = Decorated()
    through = trace_through_ids(model, [model.fc])
    with pytest.raises(TraceFailure, match="wrapped by .*wrapper"):
        trace_variant(model, through, canonical_key(model, True))
    import fxlora.tracing.integrations as integrations

    known = integrations.TraceHooks(unwrappers=(lambda fn, module: (fn.__wrapped__, frozenset({"legacy"})) if fn.__code__ is Decorated.forward.__code__ else None,))
    monkeypatch.setattr(integrations, "hooks_for", lambda module: known)
    monkeypatch.setattr("fxlora.tracing.traced.hooks_for", lambda module: known)
    variant = trace_variant(model, through, canonical_key(model, True))
    assert [n.target for n in variant.graph.nodes if n.op == "call_module"] == ["fc"]
    with pytest.raises(TraceFailure, match="legacy"):
        trace_variant(model, through, (True, ("T",), (("legacy", ("int", 1)),)))


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.double = False

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if self.double else y


def test_plain_attributes_read_at_trace_time_are_guarded():
    model = Flagged()
    lora = fxlora.transform(model, fxlora.LoraConfig(target_modules=["fc"], init_lora_weights=False))
    x = torch.randn(3, 4)
    once = lora(x)
    model.double = True
    torch.testing.assert_close(lora(x), once * 2)  # traced again with the new value
    model.double = False
    torch.testing.assert_close(lora(x), once)


class HasChildCalledSelf(nn.Module):
    """transformers' BertAttention has a child named ``self``; the generated code must not shadow
    its own ``self``."""

    def __init__(self):
        super().__init__()
        self.self = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        return self.out(torch.nn.functional.gelu(self.self(x)))


def test_a_child_named_self():
    model = HasChildCalledSelf()
    reference = HasChildCalledSelf()
    reference.load_state_dict(model.state_dict())
    lora = fxlora.transform(model, fxlora.LoraConfig(target_modules=["out"]))
    assert lora.target_paths == {"out": "graph"}
    x = torch.randn(2, 4)
    torch.testing.assert_close(lora(x), reference(x))
