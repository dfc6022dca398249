"""``inspect.signature(lora_model.forward)``: the wrapped model's parameters plus ``adapter_names``
(`fxlora.model.signature`); calls, copies and compiles are the class forward's."""

import copy
import inspect

import torch
import torch.nn as nn

import fxlora


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.fc(x) * scale


class OwnAdapterNames(Two):
    def forward(self, x, adapter_names=None, **extra):
        return self.fc(x)


def _params(model):
    return [(p.name, p.kind, p.default) for p in inspect.signature(model.forward).parameters.values()]


def test_signature_is_the_models_with_adapter_names_keyword_only():
    model = fxlora.transform(Two(), fxlora.LoraConfig(target_modules=["fc"], init_lora_weights=False))
    P = inspect.Parameter
    assert _params(model) == [
        ("x", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("scale", P.POSITIONAL_OR_KEYWORD, 1.0),
        ("adapter_names", P.KEYWORD_ONLY, None),
    ]
    assert inspect.signature(model.forward).return_annotation is torch.Tensor
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = model.model(x, 2.0)
        assert torch.equal(model(x, scale=2.0), expected)
        assert torch.equal(model(x, 2.0, adapter_names=["default", "default"]), expected)
        with model.disable_adapter():
            base = model(x)
        assert not torch.equal(base, model(x))
        assert torch.equal(model(x, adapter_names=["__base__", "__base__"]), base)


def test_a_models_own_adapter_names_gives_way_and_kwargs_stay_last():
    model = fxlora.transform(OwnAdapterNames(), fxlora.LoraConfig(target_modules=["fc"]))
    names = [n for n, *_ in _params(model)]
    assert names == ["x", "adapter_names", "extra"]
    assert inspect.signature(model.forward).parameters["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY


def test_each_wrapper_shows_its_own_models_signature_and_copies_keep_theirs():
    two = fxlora.transform(Two(), fxlora.LoraConfig(target_modules=["fc"]))
    other = fxlora.transform(OwnAdapterNames(), fxlora.LoraConfig(target_modules=["fc"]))
    assert [n for n, *_ in _params(two)] == ["x", "scale", "adapter_names"]  # not the last one made
    clone = copy.deepcopy(two)
    assert _params(clone) == _params(two)
    assert clone.forward.args[0] is clone  # bound to the copy, not to the original
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(clone(x), two(x))
    assert other.forward.args[0] is other


def test_compiled_wrapper_computes_as_the_wrapper():
    model = fxlora.transform(Two(), fxlora.LoraConfig(target_modules=["fc"], init_lora_weights=False)).eval()
    x = torch.randn(2, 4)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    with torch.no_grad():
        assert torch.equal(compiled(x, 0.5), model(x, 0.5))
