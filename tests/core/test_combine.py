"""add_weighted_adapter: 'cat' (exact), 'linear' (PEFT's), 'svd' (all layer kinds)."""

import copy

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from models import ConvNet1d, ConvNet2d, ConvNet3d, EmbeddingModel, MLP, copy_peft_adapter_weights

peft = pytest.importorskip("peft")

MODELS = [
    ("mlp", lambda: MLP(16), ["seq.0", "seq.2"], lambda: torch.randn(3, 20)),
    ("conv1d", ConvNet1d, ["conv1", "conv2"], lambda: torch.randn(2, 3, 12)),
    ("conv2d", ConvNet2d, ["conv1", "conv3"], lambda: torch.randn(2, 3, 9, 9)),
    ("conv3d", ConvNet3d, ["conv1", "conv2", "conv3"], lambda: torch.randn(2, 2, 4, 5, 6)),
    ("embedding", EmbeddingModel, ["emb", "proj"], lambda: torch.randint(0, 50, (2, 6))),
]


def two_adapters(make, targets):
    torch.manual_seed(0)
    model = fxlora.transform(make(), LoraConfig(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=targets[:1] + targets[-1:], r=2, lora_alpha=3, init_lora_weights=False))
    return model.eval()


def weighted_sum_output(model, x, weights):
    model.set_adapter(list(weights))
    for a, w in weights.items():
        model.set_adapter_scale(a, w)
    out = model(x)
    for a in weights:
        model.set_adapter_scale(a, 1.0)
    return out


@pytest.mark.parametrize("name, make, targets, make_x", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_cat_and_full_rank_svd_are_the_weighted_sum(name, make, targets, make_x, combination):
    model = two_adapters(make, targets)
    x = make_x()
    expected = weighted_sum_output(model, x, {"default": 0.7, "b": -1.3})
    model.add_weighted_adapter(["default", "b"], [0.7, -1.3], "mix", combination_type=combination, svd_rank=6)
    assert model.active_adapters == ["default", "b"]  # the new adapter is not activated
    model.set_adapter("mix")
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert model.peft_config["mix"].init_lora_weights is False


def test_low_rank_svd_is_the_best_approximation():
    model = two_adapters(lambda: MLP(16), ["seq.0", "seq.2"])
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "low", combination_type="svd", svd_rank=2)
    layer = model.get_submodule("seq.0")
    from fxlora.core.delta import delta_weight

    total = delta_weight(layer, "default") + delta_weight(layer, "b")
    s = torch.linalg.svdvals(total)
    got = delta_weight(layer, "low")
    assert got.shape == total.shape and torch.linalg.matrix_rank(got) == 2
    torch.testing.assert_close(torch.linalg.matrix_norm(total - got), s[2:].norm(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_same_outputs_as_peft(combination):
    torch.manual_seed(0)
    base = MLP(16)
    cfg_a = dict(target_modules=["seq.0", "seq.2"], r=4, lora_alpha=8, init_lora_weights=False)
    cfg_b = dict(target_modules=["seq.0", "seq.2"], r=4, lora_alpha=2, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg_a))
    pm.add_adapter("b", peft.LoraConfig(**cfg_b))
    fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**cfg_a))
    fm.add_adapter("b", LoraConfig(**cfg_b))
    copy_peft_adapter_weights(pm, fm)
    pm.add_weighted_adapter(["default", "b"], [0.6, 0.9], "mix", combination_type=combination)
    fm.add_weighted_adapter(["default", "b"], [0.6, 0.9], "mix", combination_type=combination)
    pm.set_adapter("mix"), fm.set_adapter("mix")
    pm.eval(), fm.eval()
    x = torch.randn(4, 20)
    torch.testing.assert_close(fm(x), pm(x), rtol=1e-4, atol=1e-5)


def test_modules_to_save_copy_and_lora_bias_carry_over():
    torch.manual_seed(0)
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"], modules_to_save=["seq.4"], lora_bias=True, init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False))
    with torch.no_grad():
        model.get_submodule("seq.4.modules_to_save.default").weight.add_(1.0)
        model.get_submodule("seq.0.lora_B.default").bias.normal_()
    model.eval()
    x = torch.randn(3, 20)
    expected = weighted_sum_output(model, x, {"default": 1.0, "b": 0.5})
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination_type="cat")
    model.set_adapter("mix")
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert model.modules_to_save_names == ["seq.4"]


def test_errors_change_nothing():
    model = two_adapters(lambda: MLP(8), ["seq.0", "seq.2"])
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "b")
    with pytest.raises(ValueError, match="unknown adapter"):
        model.add_weighted_adapter(["default", "zz"], [1, 1], "mix")
    with pytest.raises(ValueError, match="2 finite numbers"):
        model.add_weighted_adapter(["default", "b"], [1], "mix")
    with pytest.raises(ValueError, match="combination_type"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="bogus")
    with pytest.raises(ValueError, match="equal ranks"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="linear")
    with pytest.raises(ValueError, match="svd_rank"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "mix", svd_rank=0)
    assert list(model.state_dict()) == keys and list(model.peft_config) == ["default", "b"]
    saved = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"], modules_to_save=["seq.4"]))
    saved.add_adapter("b", LoraConfig(target_modules=["seq.0"], modules_to_save=["seq.4"]))
    with pytest.raises(ValueError, match="each train their own copy"):
        saved.add_weighted_adapter(["default", "b"], [1, 1], "mix", combination_type="cat")
