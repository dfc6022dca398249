"""Differential tests: fxlora and peft with the same adapter weights give the same outputs.

Where peft is wrong (dilated or reflect-padded convolutions), the reference is the base layer run on
``weight + delta`` instead.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxlora
from models import MLP, ConvNet1d, ConvNet2d, ConvNet3d, EmbeddingModel, copy_peft_adapter_weights

peft = pytest.importorskip("peft")

CASES = [
    ("mlp", lambda: MLP(32), ["seq.0", "seq.2"], ["seq.4"], lambda: torch.randn(5, 20)),
    ("conv1d", ConvNet1d, ["conv1", "conv2"], ["head"], lambda: torch.randn(2, 3, 17)),
    ("conv2d", ConvNet2d, ["conv1", "conv2", "conv3"], None, lambda: torch.randn(2, 3, 11, 11)),
    ("conv2d-groups", lambda: ConvNet2d(groups=2), ["conv2"], None, lambda: torch.randn(2, 3, 11, 11)),
    ("conv3d", ConvNet3d, ["conv1", "conv2", "conv3"], ["head"], lambda: torch.randn(2, 2, 5, 6, 7)),
    ("embedding", EmbeddingModel, ["emb", "proj"], ["classifier"], lambda: torch.randint(0, 50, (3, 7))),
]


@pytest.mark.parametrize("policy", ["auto", "eager"])
@pytest.mark.parametrize("name, make, targets, saved, make_input", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("extra", [{}, {"use_rslora": True, "lora_alpha": 12, "r": 4}, {"lora_bias": True}, {"bias": "all"}])
def test_same_weights_same_outputs(policy, name, make, targets, saved, make_input, extra):
    if name == "embedding" and extra.get("lora_bias"):
        pytest.skip("lora_bias is not defined for embeddings (peft refuses it too)")
    torch.manual_seed(0)
    base = make()
    kwargs = dict(target_modules=targets, modules_to_save=saved, init_lora_weights=False, **extra)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    fm = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(**kwargs), trace=policy)
    with torch.no_grad():  # make the copies differ from the originals
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    copy_peft_adapter_weights(pm, fm)
    pm.eval(), fm.eval()
    x = make_input()
    torch.testing.assert_close(fm(x), pm(x), rtol=1e-5, atol=1e-5)
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    with fm.disable_adapter(), pm.disable_adapter():
        torch.testing.assert_close(fm(x), pm(x), rtol=1e-5, atol=1e-5)
    expected = "graph" if policy == "auto" else "eager"
    assert set(fm.target_paths.values()) == {expected}


def test_same_seed_same_initial_weights_as_peft():
    """fxlora draws random numbers in peft's order, so a seeded run starts from peft's weights."""
    for make, targets in [(lambda: MLP(16), ["seq.0", "seq.2"]), (ConvNet2d, ["conv1", "conv3"]), (EmbeddingModel, ["emb", "proj"])]:
        for init in (True, False, "gaussian"):
            torch.manual_seed(0)
            base = make()
            a, b = copy.deepcopy(base), copy.deepcopy(base)
            torch.manual_seed(1)
            pm = peft.get_peft_model(a, peft.LoraConfig(target_modules=targets, init_lora_weights=init))
            torch.manual_seed(1)
            fm = fxlora.transform(b, fxlora.LoraConfig(target_modules=targets, init_lora_weights=init))
            ours = fm.state_dict()
            for k, v in pm.state_dict().items():
                if ".lora_" in k:
                    assert torch.equal(ours[k.removeprefix("base_model.model.")], v), (k, init)


def merged_reference(conv: nn.Conv2d, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> nn.Conv2d:
    delta = torch.einsum("or,rikl->oikl", lora_b[:, :, 0, 0], lora_a) * scaling
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight.add_(delta)
    return ref


@pytest.mark.parametrize("policy", ["auto", "eager"])
@pytest.mark.parametrize("dilation, padding_mode", [(2, "zeros"), (1, "reflect"), (3, "circular"), (2, "replicate")])
def test_conv_geometry_where_peft_is_wrong(policy, dilation, padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=dilation, dilation=dilation, padding_mode=padding_mode, stride=2)
    holder = nn.Sequential(conv)
    fm = fxlora.transform(copy.deepcopy(holder), fxlora.LoraConfig(target_modules=["0"], r=4, lora_alpha=6, init_lora_weights=False), trace=policy)
    layer = fm.get_submodule("0")
    ref = merged_reference(conv, layer.lora_A.default.weight, layer.lora_B.default.weight, 6 / 4)
    x = torch.randn(2, 3, 12, 13)
    torch.testing.assert_close(fm(x), ref(x), rtol=1e-5, atol=1e-5)


def test_peft_really_is_wrong_on_reflect_padding():
    """Guards the claim above: peft's A ignores the padding mode, so its output differs from the
    merged reference while fxlora's matches it."""
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"))
    pm = peft.get_peft_model(copy.deepcopy(holder), peft.LoraConfig(target_modules=["0"], r=4, init_lora_weights=False))
    layer = pm.base_model.model[0]
    ref = merged_reference(holder[0], layer.lora_A.default.weight, layer.lora_B.default.weight, layer.scaling["default"])
    x = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(pm(x), ref(x), atol=1e-4)
