"""What the tracer may know about traced values (ranks, lengths, handle types), and that it never
guesses: code whose structure depends on sizes runs eagerly instead."""

import operator

import pytest
import torch
import torch.nn as nn

import fxlora
import fxlora.tracing.integrations as integrations
from fxlora.runtime.forwards import installed_forward
from fxlora.tracing.proxies import InfoProxy, SeqInfo, SizesInfo, TensorInfo, infer
from fxlora.errors import TraceFailure
from fxlora.tracing.call_keys import call_key, erase_ranks
from fxlora.tracing.traced import trace_through_ids, trace_variant


class Heads(nn.Module):
    """``x.view(*x.shape[:-1], heads, -1)``: traceable only when the rank of x is known."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x).view(*x.shape[:-1], 2, -1)
        return y.transpose(-1, -2).reshape(*y.shape[:-2], -1)


class SizeDependent(nn.Module):
    """The number of chunks and the rank after squeeze() depend on sizes: never traced."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        parts = [p * (i + 1) for i, p in enumerate(self.fc(x).split(2, dim=0))]
        y = torch.cat(parts).squeeze()
        return y.reshape(*y.shape, 1)


def ranked_key(*args):
    return call_key(True, args, {}, ranked=True)


def test_ranked_patterns_trace_shape_unpacking_and_stay_correct():
    model = Heads()
    through = trace_through_ids(model, [model.fc])
    for x in (torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(2, 2, 2, 8)):
        key = ranked_key(x)
        with pytest.raises(TraceFailure):
            trace_variant(model, through, erase_ranks(key))
        variant = trace_variant(model, through, key)
        assert variant.key == key and variant.inputs == (0,)
        graph_module = torch.fx.GraphModule(model, variant.graph)
        torch.testing.assert_close(graph_module(x), model(x))
        other = torch.randn(3, 7, 8)  # another size, same rank: the graph holds for it too
        if x.dim() == 3:
            torch.testing.assert_close(graph_module(other), model(other))


def test_plain_modules_without_observed_calls_keep_the_eager_path():
    """Ranks come from observed calls (`fxlora.tracing.probe`); a plain module has none, so code that
    needs them runs eagerly, with the same results."""
    reference = fxlora.transform(Heads(), fxlora.LoraConfig(target_modules=["fc"], init_lora_weights=False), trace="eager")
    lora = fxlora.transform(Heads(), fxlora.LoraConfig(target_modules=["fc"], init_lora_weights=False))
    lora.load_state_dict(reference.state_dict())
    assert lora.target_paths == {"fc": "eager"}
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(lora(x), reference(x))


def test_size_dependent_structure_is_never_guessed():
    model = SizeDependent()
    through = trace_through_ids(model, [model.fc])
    with pytest.raises(TraceFailure):
        trace_variant(model, through, ranked_key(torch.randn(4, 4)))
    reference = SizeDependent()
    reference.load_state_dict(model.state_dict())
    lora = fxlora.transform(model, fxlora.LoraConfig(target_modules=["fc"]))
    assert lora.target_paths == {"fc": "eager"}
    for x in (torch.randn(4, 4), torch.randn(1, 4), torch.randn(6, 4)):
        torch.testing.assert_close(lora(x), reference(x))


def test_rules():
    t3, t1 = TensorInfo(3), TensorInfo(1)

    def proxy(info):
        p = InfoProxy.__new__(InfoProxy)
        p.info = info
        return p

    x, s = proxy(t3), proxy(SizesInfo(3))
    assert infer("call_function", operator.getitem, (s, slice(None, -1)), {}, None, ()) == SizesInfo(2)
    assert infer("call_method", "view", (x, (2, 3, 4, 5)), {}, None, ()) == TensorInfo(4)
    assert infer("call_method", "view", (x, 2, -1), {}, None, ()) == TensorInfo(2)
    assert infer("call_method", "view", (x, proxy(None)), {}, None, ()) is None  # a size or a tuple of sizes?
    assert infer("call_method", "squeeze", (x,), {}, None, ()) is None
    assert infer("call_method", "split", (x, 2), {}, None, ()) == SeqInfo(item=t3)
    assert infer("call_function", operator.add, (x, proxy(t1)), {}, None, ()) == t3
    assert infer("call_function", operator.add, (x, proxy(None)), {}, None, ()) is None
    assert infer("call_function", operator.getitem, (x, (Ellipsis, None, slice(0, 2))), {}, None, ()) == TensorInfo(4)
    assert infer("call_function", operator.getitem, (x, (0, slice(None))), {}, None, ()) == TensorInfo(2)
    assert infer("call_function", operator.matmul, (x, proxy(TensorInfo(2))), {}, None, ()) == t3
    assert infer("call_module", "fc", (x,), {}, nn.Linear(2, 2), ()) == t3
    assert infer("call_module", "emb", (proxy(TensorInfo(2)),), {}, nn.Embedding(3, 2), ()) == t3
    assert infer("call_module", "m", (x,), {}, nn.MultiheadAttention(2, 1), ()) is None


class Handle:
    def __init__(self):
        self.log = []

    def record(self, t):
        self.log.append(t.shape)
        return t * 2, t * 3


class SpecialHandle(Handle):
    pass


class UsesHandle(nn.Module):
    def __init__(self, peek=False):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.peek = peek

    def forward(self, x, handle):
        y = self.fc(x)
        if isinstance(handle, SpecialHandle):
            y = y + 1
        a, b = handle.record(y)
        if self.peek:
            return a + len(handle.log)
        return a - b


@pytest.fixture
def handles(monkeypatch):
    monkeypatch.setattr(integrations, "_object_kinds", [])
    monkeypatch.setattr(integrations, "_kind_of_type", {})
    integrations.register_object_type(Handle, ["record"])


def test_registered_handles_are_placeholders_with_exact_types(handles, eager_fallbacks):
    model = UsesHandle()
    reference = UsesHandle()
    reference.load_state_dict(model.state_dict())
    lora = fxlora.transform(model, fxlora.LoraConfig(target_modules=["fc"]))
    x = torch.randn(2, 4)
    for cls in (Handle, SpecialHandle, Handle):
        mine, theirs = cls(), cls()
        torch.testing.assert_close(lora(x, mine), reference(x, theirs))
        assert mine.log == theirs.log == [torch.Size([2, 4])]  # the method ran on the real object, once
    keys = installed_forward(model).variants
    assert eager_fallbacks == [] and {k[1][1][:2] for k in keys if k[1][1] != "T"} == {("obj", Handle), ("obj", SpecialHandle)}


def test_undeclared_handle_attributes_are_not_traced(handles):
    model = UsesHandle(peek=True)
    through = trace_through_ids(model, [model.fc])
    key = call_key(True, (torch.randn(2, 4), Handle()), {})
    with pytest.raises(TraceFailure, match="log"):
        trace_variant(model, through, key)
    reference = UsesHandle(peek=True)
    reference.load_state_dict(model.state_dict())
    lora = fxlora.transform(model, fxlora.LoraConfig(target_modules=["fc"]))
    x = torch.randn(2, 4)
    torch.testing.assert_close(lora(x, Handle()), reference(x, Handle()))


class Unpacks(nn.Module):
    """Unpacks the shape of a tensor of unknown rank (timm's attention: ``B, N, C = x.shape``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        b, n, c = x.shape
        return self.proj(x).reshape(b * n, c)


def test_unpacked_attributes_trace_as_in_torch_fx_reading_the_bytecode_once(monkeypatch):
    import dis

    from fxlora.tracing.tracer import LoraTracer

    model = Unpacks()
    ours = LoraTracer({id(model)}).trace(model)
    reads = []
    original = dis.get_instructions
    monkeypatch.setattr(dis, "get_instructions", lambda code, *a, **k: reads.append(code) or original(code, *a, **k))
    again = LoraTracer({id(model)}).trace(model)
    assert reads == []  # the unpacking sizes of forward's code are known already
    monkeypatch.undo()
    plain = torch.fx.Tracer().trace(model)
    assert ours.python_code("self").src == again.python_code("self").src == plain.python_code("self").src
    x = torch.randn(2, 3, 4)
    assert torch.equal(torch.fx.GraphModule(model, ours)(x), model(x))
