"""Stacked adapter weights kept for serving mixed batches (`fxlora.core.stacks`)."""

import copy

import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.core.stacks import layer_stack
from models import row_by_row

SCALINGS = (2.0, 1.0)  # alpha / r of the adapters a and b of `two_adapters`


def two_adapters():
    torch.manual_seed(0)
    model = fxlora.transform(nn.Sequential(nn.Linear(6, 5)), LoraConfig(target_modules=["0"], r=2, lora_alpha=4, init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=["0"], r=3, lora_alpha=3, init_lora_weights=False))
    return model, model.get_submodule("0")


def test_a_stack_holds_the_scaled_weights_with_ranks_padded():
    _, layer = two_adapters()
    stack = layer_stack(layer, ("a", "b"), SCALINGS)
    assert stack.a.shape == (2, 6, 3) and stack.b.shape == (2, 3, 5)
    for i, (name, scaling) in enumerate((("a", 2.0), ("b", 1.0))):
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        r = a.shape[0]
        torch.testing.assert_close(stack.a[i, :, :r], a.T)
        torch.testing.assert_close(stack.b[i, :r], b.T * scaling)
        assert not stack.a[i, :, r:].any() and not stack.b[i, r:].any()
    assert layer_stack(layer, ("b",), SCALINGS[1:]).a.shape == (1, 6, 3)


def test_a_stack_is_kept_until_a_source_changes_or_is_replaced():
    _, layer = two_adapters()
    stack = layer_stack(layer, ("a", "b"), SCALINGS)
    assert layer_stack(layer, ("a", "b"), SCALINGS) is stack  # nothing changed: no copy
    with torch.no_grad():
        layer.lora_A["b"].weight.mul_(2)  # in place
    changed = layer_stack(layer, ("a", "b"), SCALINGS)
    assert changed is not stack
    torch.testing.assert_close(changed.a[1], layer.lora_A["b"].weight.T)
    layer.lora_B["a"].weight = nn.Parameter(torch.randn(5, 2))  # replaced
    torch.testing.assert_close(layer_stack(layer, ("a", "b"), SCALINGS).b[0, :2], layer.lora_B["a"].weight.T * 2.0)
    # another scaling (the stack is kept per scalings too)
    torch.testing.assert_close(layer_stack(layer, ("a", "b"), (2.0, 5.0)).b[1], layer.lora_B["b"].weight.T * 5.0)


def test_weights_made_in_inference_mode_are_stacked_on_every_call():
    with torch.inference_mode():
        _, layer = two_adapters()
        layer_stack(layer, ("a", "b"), SCALINGS)
        layer.lora_A["a"].weight.mul_(3)
    torch.testing.assert_close(layer_stack(layer, ("a", "b"), SCALINGS).a[0, :, :2], layer.lora_A["a"].weight.T)


def test_stacks_stay_out_of_state_dict_and_copies_rebuild_theirs():
    model, layer = two_adapters()
    keys = set(model.state_dict())
    layer_stack(layer, ("a", "b"), SCALINGS)
    assert set(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    twin_layer = twin.get_submodule("0")
    with torch.no_grad():
        twin_layer.lora_A["a"].weight.zero_()
    assert not layer_stack(twin_layer, ("a", "b"), SCALINGS).a[0].any()
    assert layer_stack(layer, ("a", "b"), SCALINGS).a[0].any()


def test_served_mixed_batches_follow_weight_changes():
    """The stacks kept between serving calls are rebuilt when a weight changes in place or is
    replaced."""
    torch.manual_seed(0)
    model = fxlora.transform(nn.Sequential(nn.Linear(4, 4)), LoraConfig(target_modules=["0"], init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=["0"], r=2, init_lora_weights=False))
    model.eval()
    x, names = torch.randn(3, 4), ["a", "b", "__base__"]
    with torch.no_grad():
        before = model(x, adapter_names=names)
        model.get_submodule("0.lora_B.b").weight.mul_(-3)  # in place
        torch.testing.assert_close(model(x, adapter_names=names), row_by_row(model, x, names))
        model.get_submodule("0.lora_A.a").weight = nn.Parameter(torch.randn(8, 4))  # replaced
        torch.testing.assert_close(model(x, adapter_names=names), row_by_row(model, x, names))
    assert not torch.allclose(before, row_by_row(model, x, names))
