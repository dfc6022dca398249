"""Adapter modules take the mode (train or eval) of the layer they are attached to: an adapter
added to an eval model runs no dropout until the model is put in train mode."""

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from models import ConvNet2d, EmbeddingModel, Mixed

CASES = [
    (Mixed, dict(target_modules=["stem", "blocks.0.fc1", "blocks.1.0"]), dict(target_modules=["stem", "head"]), lambda: torch.randn(4, 6)),
    (ConvNet2d, dict(target_modules=["conv1", "conv3"], modules_to_save=["head"]), dict(target_modules=["conv2"], modules_to_save=["head"]), lambda: torch.randn(4, 3, 8, 8)),
    (EmbeddingModel, dict(target_modules=["emb", "proj"]), dict(target_modules=["proj"], modules_to_save=["classifier"]), lambda: torch.randint(0, 50, (4, 5))),
]
IDS = ["mixed", "conv-saved", "embedding"]


def config(targets: dict) -> LoraConfig:
    return LoraConfig(**targets, lora_dropout=0.5, init_lora_weights=False)


def fxlora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules fxlora added (adapter modules, their holders, `modules_to_save` copies)."""
    return {n: m for n, m in model.named_modules() if any(part in n.split(".") for part in ("lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B", "modules_to_save"))}


def calls_agree(model: nn.Module, x: torch.Tensor) -> bool:
    """Do two calls of `model` on `x` give the same output (no dropout acting)?"""
    with torch.no_grad():
        return torch.equal(model(x), model(x))


@pytest.mark.parametrize("make, cfg_a, cfg_b, make_x", CASES, ids=IDS)
def test_adapters_added_to_an_eval_model_are_in_eval_mode(make, cfg_a, cfg_b, make_x):
    model = fxlora.transform(make().eval(), config(cfg_a))
    x = make_x()
    assert not model.training and all(not m.training for m in model.modules())
    assert calls_agree(model, x)
    model.add_adapter("b", config(cfg_b))
    model.set_adapter("b")
    assert all(not m.training for m in model.modules())
    assert calls_agree(model, x)
    with torch.no_grad():
        mixed = ["b", "default", "__base__", "b"]
        assert torch.equal(model(x, adapter_names=mixed), model(x, adapter_names=mixed))
    model.train()  # now dropout acts
    assert all(m.training for m in fxlora_modules(model).values())
    assert not calls_agree(model, x)
    model.eval()
    assert calls_agree(model, x)


@pytest.mark.parametrize("make, cfg_a, cfg_b, make_x", CASES, ids=IDS)
def test_adapters_added_to_a_train_model_train(make, cfg_a, cfg_b, make_x):
    model = fxlora.transform(make().train(), config(cfg_a))
    model.add_adapter("b", config(cfg_b))
    added = fxlora_modules(model)
    assert added and all(m.training for m in added.values())
    assert not calls_agree(model, make_x())


def test_adapter_modules_follow_their_own_layer_not_the_root():
    """A layer left in eval mode inside a training model gets eval adapter modules and an eval
    `modules_to_save` copy; the rest train."""
    base = ConvNet2d().train()
    base.conv1.eval(), base.head.eval()
    model = fxlora.transform(base, config(dict(target_modules=["conv1", "conv3"], modules_to_save=["head"])))
    added = fxlora_modules(model)
    for name, module in added.items():
        assert module.training == (name.split(".")[0] not in ("conv1", "head")), name
    assert not model.get_submodule("head.modules_to_save.default").training
    assert model.get_submodule("conv3.lora_dropout.default").training
