"""`dropped_linear`: the A product of a branch with dropout keeps the input, not the dropped copy,
and computes what ``F.linear(dropout(x), A)`` computes, bit for bit, gradients included, drawing
the same random numbers (so fxlora and PEFT drop the same entries under one seed)."""

import copy

import peft
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

import fxlora
from fxlora.core.dropped_linear import dropped_linear, keeps_input


def saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while `fn` runs its forward
    (the activations a training step holds at its peak)."""
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


def plain_and_ours(x, weight, p, seed=7):
    """(output, grads) of the reference ``F.linear(F.dropout(x))`` and of `dropped_linear`."""
    results = []
    for fn in (lambda a, w: F.linear(F.dropout(a, p, True), w), lambda a, w: dropped_linear(a, w, nn.Dropout(p))):
        a, w = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        torch.manual_seed(seed)
        out = fn(a, w)
        after = torch.rand(3)  # the generator stands where the reference left it
        out.square().sum().backward()
        results.append((out, a.grad, w.grad, after, torch.rand(3)))
    return results


@given(rows=st.integers(1, 9), width=st.integers(1, 17), rank=st.integers(1, 5), p=st.sampled_from([0.1, 0.5, 0.9]), relu=st.booleans())
def test_equals_linear_of_dropout_bit_for_bit(rows, width, rank, p, relu):
    x = torch.randn(rows, 2, width)
    x = x.relu() if relu else x  # exact zeros in the input must still get their gradient
    (ref, ours) = plain_and_ours(x, torch.randn(rank, width), p)
    for got, want in zip(ours, ref):
        assert torch.equal(got, want)


def test_backward_leaves_the_generator_where_it_was():
    x, w = torch.randn(4, 6, requires_grad=True), torch.randn(2, 6, requires_grad=True)
    out = dropped_linear(x, w, nn.Dropout(0.5))
    torch.manual_seed(3)
    expected = torch.rand(5)
    torch.manual_seed(3)
    out.sum().backward()
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize(
    "dropout, grad",
    [(nn.Dropout(0.5).eval(), True), (nn.Dropout(0.0), True), (nn.Identity(), True), (nn.Dropout(0.5), False), (nn.Dropout(0.5, inplace=True), True)],
    ids=["eval", "p0", "identity", "no-grad", "inplace"],
)
def test_other_cases_call_the_dropout_module_as_is(dropout, grad):
    x, w = torch.randn(4, 6, requires_grad=True), torch.randn(2, 6, requires_grad=True)
    if grad:
        assert not keeps_input(dropout, x, w)
    with torch.set_grad_enabled(grad):
        torch.manual_seed(0)
        got = dropped_linear(x.clone(), w, dropout)
        torch.manual_seed(0)
        assert torch.equal(got, F.linear(dropout(x.clone()), w))


def test_a_dropout_with_a_hook_is_called():
    dropout, calls = nn.Dropout(0.5), []
    dropout.register_forward_hook(lambda *a: calls.append(1))
    x, w = torch.randn(4, 6, requires_grad=True), torch.randn(2, 6)
    assert not keeps_input(dropout, x, w)
    dropped_linear(x, w, dropout)
    assert calls == [1]


def test_second_order_gradients_are_refused():
    x, w = torch.randn(4, 6, requires_grad=True), torch.randn(2, 6, requires_grad=True)
    (g,) = torch.autograd.grad(dropped_linear(x, w, nn.Dropout(0.5)).square().sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


class Attention(nn.Module):
    """q/k/v read one input (after a ReLU: exact zeros), o reads their mix."""

    def __init__(self, d=32):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        h = x.relu()
        return self.o(self.q(h) * self.k(h) + self.v(h))


def pair(**lora):
    torch.manual_seed(0)
    base = Attention()
    cfg = dict(r=4, target_modules=["q", "k", "v", "o"], init_lora_weights=False, **lora)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg)).train()
    ours = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(**cfg)).train()
    theirs_state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict({k: theirs_state[k] if "lora" in k else v for k, v in ours.state_dict().items()})
    return theirs, ours


def step(model, x, seed):
    """Output, input gradient and LoRA gradients of one forward and backward under `seed`."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out, kept = saved_bytes(lambda: model(x))
    out.square().sum().backward()
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out, x.grad, grads, kept


@pytest.mark.parametrize("shape", [(16, 32), (2, 8, 32)], ids=["2d", "3d"])
def test_training_with_dropout_equals_peft_and_keeps_less(shape):
    theirs, ours = pair(lora_dropout=0.3)
    x = torch.randn(*shape)
    ours(x), theirs(x)  # first calls (tracing) out of the way
    for seed in (1, 2):
        p_out, p_dx, p_grads, p_kept = step(theirs, x, seed)
        f_out, f_dx, f_grads, f_kept = step(ours, x, seed)
        assert torch.equal(f_out, p_out)
        assert torch.equal(f_dx, p_dx)
        assert f_grads.keys() == p_grads.keys()
        for name in p_grads:
            assert torch.equal(f_grads[name], p_grads[name]), name
        # per layer PEFT keeps the dropped copy and the noise; fxlora keeps the input, once for q/k/v
        assert f_kept <= 0.75 * p_kept, (f_kept, p_kept)


def test_two_calls_under_one_seed_drop_alike_and_other_seeds_differ():
    _, ours = pair(lora_dropout=0.5)
    x = torch.randn(16, 32)
    first, again, other = step(ours, x, 5), step(ours, x, 5), step(ours, x, 6)
    assert torch.equal(first[0], again[0]) and torch.equal(first[2]["q.lora_A.default.weight"], again[2]["q.lora_A.default.weight"])
    assert not torch.equal(first[0], other[0])
