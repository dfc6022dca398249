import torch
import torch.nn as nn

import pytest

from fxlora.tracing import TraceFailure, call_key, canonical_key, trace_through_ids, trace_variant
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
