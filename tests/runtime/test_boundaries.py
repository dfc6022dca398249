"""Module boundaries at run time: every hook fires once per call on every path, sees what the
module really returns, and its return value is honoured; `remove()` works; graph code comes
back once the hooks are gone (`fxlora.tracing.boundaries`)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxlora
from fxlora import LoraConfig
from fxlora.core.layers import target_meta
from fxlora.runtime.forwards import GraphForward, installed_forward
from models import Block, Blocks

PATHS = ["auto", "eager"]


def make(trace: str = "auto", before=None):
    torch.manual_seed(0)
    net = Blocks()
    handles = before(net) if before is not None else None
    torch.manual_seed(1)
    model = fxlora.transform(net, LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights=False), trace=trace)
    return (model, handles) if before is not None else model


X = torch.randn(3, 8)


def scaling(layer) -> float:
    return target_meta(layer).adapters["default"].scaling


def plain_output(model) -> torch.Tensor:
    """The output computed by hand from the model's tensors: base layers plus LoRA branches."""
    def layer(lin, x):
        a, b = lin.lora_A["default"].weight, lin.lora_B["default"].weight
        return F.linear(x, lin.weight, lin.bias) + F.linear(F.linear(x, a), b) * scaling(lin)

    x = X
    for block in model.model.blocks:
        x = x + layer(block.fc2, torch.relu(layer(block.fc1, block.norm(x))))
    return model.model.head(x)


@pytest.mark.parametrize("trace", PATHS)
@pytest.mark.parametrize("where", ["blocks.0", "blocks.1.fc1", "blocks.0.norm", ""])
def test_forward_and_pre_hooks_after_transform_fire_once_per_call(trace, where):
    model = make(trace)
    ref = model(X)
    module = model.model.get_submodule(where)
    seen = []
    h1 = module.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    h2 = module.register_forward_hook(lambda m, args, out: seen.append("post"))
    assert torch.equal(model(X), ref)
    assert seen == ["pre", "post"]
    model(X)
    assert seen == ["pre", "post"] * 2
    h1.remove(), h2.remove()
    assert torch.equal(model(X), ref) and len(seen) == 4


@pytest.mark.parametrize("trace", PATHS)
def test_hooks_registered_before_transform_fire_and_remove(trace):
    seen = []

    def register(net):
        return [
            net.blocks[1].register_forward_hook(lambda m, a, o: seen.append("block")),
            net.blocks[0].fc2.register_forward_hook(lambda m, a, o: seen.append("fc2")),
        ]

    (model, handles) = make(trace, register)
    out = model(X)
    assert sorted(seen) == ["block", "fc2"]
    for h in handles:
        h.remove()
    assert torch.equal(model(X), out) and len(seen) == 2
    torch.testing.assert_close(out, plain_output(model), rtol=0, atol=1e-6)


@pytest.mark.parametrize("trace", PATHS)
def test_hook_return_values_are_honoured(trace):
    model = make(trace)
    h = model.model.blocks[1].register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    head = model.model.head
    assert torch.equal(model(X), head(torch.zeros(3, 8)))
    h.remove()
    h = model.model.blocks[0].register_forward_pre_hook(lambda m, args: (torch.zeros_like(args[0]),))
    zeros = model(torch.zeros(3, 8))
    assert torch.equal(model(X), zeros)
    h.remove()
    assert not torch.equal(model(X), zeros)


@pytest.mark.parametrize("trace", PATHS)
def test_a_hook_on_an_adapted_layer_sees_the_adapted_output(trace):
    model = make(trace)
    fc1 = model.model.blocks[0].fc1
    got = {}
    h = fc1.register_forward_hook(lambda m, args, out: got.setdefault("out", out))
    model(X)
    h.remove()
    x = model.model.blocks[0].norm(X)
    lora = F.linear(F.linear(x, fc1.lora_A["default"].weight), fc1.lora_B["default"].weight) * scaling(fc1)
    torch.testing.assert_close(got["out"], F.linear(x, fc1.weight, fc1.bias) + lora, rtol=0, atol=1e-6)
    assert not torch.allclose(got["out"], F.linear(x, fc1.weight, fc1.bias))


@pytest.mark.parametrize("trace", PATHS)
def test_no_internal_keyword_reaches_a_with_kwargs_pre_hook(trace):
    model = make(trace)
    received = []
    names = {id(m): n for n, m in model.model.named_modules()}

    def strict(module, args, kwargs):
        assert kwargs == {}, kwargs
        received.append(names[id(module)])
        return None

    handles = [m.register_forward_pre_hook(strict, with_kwargs=True) for m in model.model.modules()]
    out = model(X)
    for h in handles:
        h.remove()
    for name in ["", "blocks.0", "blocks.1.norm", "blocks.0.fc1", "blocks.1.fc2", "head"]:
        assert received.count(name) == 1, (name, received)
    torch.testing.assert_close(out, plain_output(model), rtol=0, atol=1e-6)


@pytest.mark.parametrize("trace", PATHS)
def test_full_backward_hooks_fire_once_per_backward_with_unchanged_gradients(trace):
    ref = make(trace)
    ref(X).pow(2).sum().backward()
    model = make(trace)
    seen = []
    h = model.model.blocks[0].register_full_backward_hook(lambda m, gin, gout: seen.append(gout[0].shape))
    model(X).pow(2).sum().backward()
    assert seen == [torch.Size([3, 8])]
    h.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(torch.equal(g, dict(ref.named_parameters())[n].grad) for n, g in grads.items())


@pytest.mark.parametrize("trace", PATHS)
def test_global_module_hooks_see_every_module_call_once(trace):
    model = make(trace)
    ref = model(X)
    counts: dict[str, int] = {}
    names = {id(m): n for n, m in model.model.named_modules()}
    h = nn.modules.module.register_module_forward_hook(
        lambda m, a, o: counts.__setitem__(names.get(id(m), "?"), counts.get(names.get(id(m), "?"), 0) + 1)
    )
    try:
        out = model(X)
    finally:
        h.remove()
    assert torch.equal(out, ref)
    for name in ["", "blocks.0", "blocks.1", "blocks.0.norm", "blocks.0.fc1", "blocks.1.fc2", "head"]:
        assert counts.get(name) == 1, (name, counts)


def test_graph_code_serves_calls_again_once_hooks_are_removed(eager_fallbacks):
    model = make()
    h = model.model.blocks[0].fc1.register_forward_hook(lambda m, a, o: None)
    model(X)
    assert eager_fallbacks == ["Blocks"]  # a hook on a layer the graph calls for its base output only
    h.remove()
    model(X)
    assert eager_fallbacks == ["Blocks"]


def test_hooks_on_containers_that_are_never_called_keep_graph_code(eager_fallbacks):
    """A hook on an adapter's ``nn.ModuleDict`` (``lora_A``: indexed, never called) never runs, in
    the model run eagerly as in the graph, so it leaves the graph code serving calls; one on the
    adapter module inside it (``lora_A.default``: called) makes the call eager and runs."""
    model = make()
    reference = make(trace="eager")
    layer, reference_layer = model.model.blocks[0].fc1, reference.model.blocks[0].fc1
    seen = []
    for container in (layer.lora_A, reference_layer.lora_A):
        container.register_forward_hook(lambda m, a, o: seen.append("container"))
    assert torch.equal(model(X), reference(X))
    assert seen == [] and eager_fallbacks == []
    layer.lora_A["default"].register_forward_hook(lambda m, a, o: seen.append("module"))
    assert torch.equal(model(X), reference(X))
    assert seen == ["module"] and eager_fallbacks == ["Blocks"]


def test_a_block_with_hooks_becomes_a_graph_root_of_its_own(eager_fallbacks):
    model = make()
    assert model.graph_roots == [""]
    h = model.model.blocks[1].register_forward_hook(lambda m, a, o: None)
    out = model(X)
    assert model.graph_roots == ["", "blocks.1"]
    assert isinstance(installed_forward(model.model.blocks[1]), GraphForward)
    assert eager_fallbacks == []
    h.remove()
    assert torch.equal(model(X), out)
    assert model.graph_roots == ["", "blocks.1"]  # kept: a hook registered again costs no trace


def test_replacing_a_traced_through_child_is_followed():
    model = make()
    model(X)
    fresh = Block()
    model.model.blocks[0] = fresh  # no adapter on it: plain Linear layers
    x = fresh(X)
    x = model.model.blocks[1](x)
    assert torch.equal(model(X), model.model.head(x))


def test_a_hook_added_mid_training_does_not_change_gradients():
    ref = make()
    model = make()
    for step in range(2):
        if step == 1:
            model.model.blocks[0].register_forward_hook(lambda m, a, o: None)
        for m in (ref, model):
            m.zero_grad()
            m(X).sum().backward()
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            if p.requires_grad:
                assert torch.equal(p.grad, q.grad), n


def test_hooks_and_a_deep_copy():
    model = make()
    seen = []
    model.model.blocks[0].register_forward_hook(lambda m, a, o: seen.append(1))
    clone = copy.deepcopy(model)
    clone(X)
    assert seen == [1]
    assert torch.equal(clone(X), model(X))


# ---------------------------------------------------------------------- under torch.compile
def compiled_hook_runs(model, compiled, where: str, add_after_compile: bool) -> list[bool]:
    """Whether a forward hook on `where` ran in each of two compiled calls, the hook added before
    the first compiled call or after it."""
    seen = []
    module = model.model.get_submodule(where)
    if not add_after_compile:
        handle = module.register_forward_hook(lambda m, args, out: seen.append(1))
    with torch.no_grad():
        compiled(X)
        runs = [bool(seen)]
        if add_after_compile:
            handle = module.register_forward_hook(lambda m, args, out: seen.append(1))
        seen.clear()
        compiled(X)
        runs.append(bool(seen))
    handle.remove()
    return runs


@pytest.mark.parametrize("where", ["blocks.0.fc1", "blocks.0.fc1.lora_A.default", "blocks.0.norm"])
def test_compiled_calls_run_hooks(where, cond_kept):
    """Under torch.compile (eval, no grad: the code that skips idle branches with torch.cond), a
    hook with a side effect present when the call is compiled runs in every call (never inside a
    torch.cond branch, where it would fail). A hook added afterwards recompiles the call and
    runs: on an adapted layer or its adapter modules, which the graph bypasses, and on a module
    the graph calls (dynamo guards the tables fxlora reads)."""
    model = make().eval()
    reference = copy.deepcopy(model)
    torch._dynamo.reset()
    assert compiled_hook_runs(model, torch.compile(model), where, add_after_compile=False) == [True, True]
    torch._dynamo.reset()
    assert compiled_hook_runs(model, torch.compile(model), where, add_after_compile=True) == [False, True]
    torch._dynamo.reset()
    with torch.no_grad():  # and the outputs are those of the model run eagerly
        assert torch.allclose(torch.compile(model)(X), reference(X), atol=1e-6)
