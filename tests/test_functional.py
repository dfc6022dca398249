"""torch.func use: adapter tensors passed in instead of stored (evaluation sweeps, per-example grads)."""

import pytest
import torch
from torch.func import functional_call, grad, vmap

import fxlora
from fxlora import LoraConfig
from models import ConvNet2d, EmbeddingModel, MLP, tiny_llama

CASES = [
    (lambda: MLP(16), ["seq.0", "seq.2"], ["seq.4"], lambda: torch.randn(5, 20)),
    (ConvNet2d, ["conv1", "conv2"], None, lambda: torch.randn(3, 3, 8, 8)),
    (EmbeddingModel, ["emb", "proj"], None, lambda: torch.randint(0, 50, (3, 5))),
    ("eager", lambda: MLP(16), ["seq.0", "seq.2"], ["seq.4"], lambda: torch.randn(5, 20)),
]


@pytest.mark.parametrize("case", CASES, ids=["mlp", "conv", "embedding", "mlp-eager-path"])
def test_vmap_over_a_stack_of_adapters(case):
    policy, (make, targets, saved, make_x) = ("eager", case[1:]) if case[0] == "eager" else ("auto", case)
    torch.manual_seed(0)
    config = LoraConfig(target_modules=targets, modules_to_save=saved, init_lora_weights=False)
    model = fxlora.transform(make(), config, trace=policy).eval()
    x = make_x()
    stored = model.adapter_tensors()
    assert set(stored) == {n for n, p in model.named_parameters() if ".lora_" in n or ".modules_to_save." in n}
    torch.testing.assert_close(functional_call(model, stored, (x,)), model(x))
    k = 3
    stack = {n: torch.stack([v + 0.2 * i * torch.randn_like(v) for i in range(k)]) for n, v in stored.items()}
    before = {n: v.clone() for n, v in stored.items()}
    swept = vmap(lambda p: functional_call(model, p, (x,)))(stack)
    assert swept.shape[0] == k
    for i in range(k):
        one = functional_call(model, {n: v[i] for n, v in stack.items()}, (x,))
        torch.testing.assert_close(swept[i], one, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(swept[0], swept[2])
    assert all(torch.equal(before[n], v) for n, v in model.adapter_tensors().items())  # nothing stored changed


def test_functional_call_as_the_first_call_computes_with_the_tensors_passed(monkeypatch):
    """The code of a state is built on its first call; when that call is a functional_call, the
    parameter slots hold the caller's tensors (not parameters): the code reads them as the
    parameters they stand for, computes with them and with the stored ones afterwards."""
    import importlib

    monkeypatch.setattr(importlib.import_module("fxlora.passes.insert_lora"), "_TEMPLATES", {})  # no branch traced before in this process
    torch.manual_seed(0)
    model = fxlora.transform(MLP(16), LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False)).eval()
    x = torch.randn(5, 20)
    zeros = {n: torch.zeros_like(v) for n, v in model.adapter_tensors().items()}
    with torch.no_grad():
        got = functional_call(model, zeros, (x,))
        with model.disable_adapter():
            plain = model(x)
        torch.testing.assert_close(got, plain, rtol=0, atol=0)
        assert not torch.equal(model(x), plain)  # the stored adapters, read by the same code


def test_functional_call_on_a_causal_lm_uses_the_model_inside(monkeypatch):
    """A transformers ``*ForCausalLM`` has a child called ``model``, which the attribute
    ``lora_model.model`` shadows for torch.func's name lookup: pass ``lora_model.model`` (same
    names, same adapters); its first call may be a functional_call too."""
    import importlib

    monkeypatch.setattr(importlib.import_module("fxlora.passes.insert_lora"), "_TEMPLATES", {})
    model = fxlora.transform(tiny_llama(), LoraConfig(target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 96, (2, 6))
    params = model.adapter_tensors()
    zeros = {n: torch.zeros_like(v) for n, v in params.items()}
    with torch.no_grad():
        got = functional_call(model.model, zeros, (), {"input_ids": ids}).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        torch.testing.assert_close(got, plain, rtol=0, atol=0)
        torch.testing.assert_close(functional_call(model.model, params, (), {"input_ids": ids}).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_per_example_adapter_gradients():
    torch.manual_seed(0)
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False)).eval()
    params = {n: v.detach() for n, v in model.adapter_tensors().items()}
    x = torch.randn(4, 20)

    def loss(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).square().sum()

    per_example = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(4):
        single = grad(loss)(params, x[i])
        for n in params:
            torch.testing.assert_close(per_example[n][i], single[n], rtol=1e-5, atol=1e-6)


def test_adapter_tensors_of_a_named_adapter():
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]))
    model.add_adapter("b", LoraConfig(target_modules=["seq.2"], modules_to_save=["seq.4"]))
    assert set(model.adapter_tensors("b")) == {
        "seq.2.lora_A.b.weight", "seq.2.lora_B.b.weight", "seq.4.modules_to_save.b.weight", "seq.4.modules_to_save.b.bias",
    }
    with pytest.raises(ValueError, match="unknown adapter"):
        model.adapter_tensors("zzz")
