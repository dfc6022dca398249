"""get_layer_status / get_model_status: PEFT's records, field for field, against peft on the same
adapters; fxlora's layer names are the model's own (PEFT's carry a ``model.`` prefix)."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from models import ConvNet2d, EmbeddingModel, MLP

peft = pytest.importorskip("peft")

TARGETS = dict(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])


def both(make=lambda: MLP(16), config=TARGETS, second=dict(target_modules=["seq.2"], r=4)):
    torch.manual_seed(0)
    base = make()
    ours = fxlora.transform(copy.deepcopy(base), LoraConfig(**config))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    if second is not None:
        ours.add_adapter("b", LoraConfig(**second))
        theirs.add_adapter("b", peft.LoraConfig(**second))
    return ours, theirs


def as_dicts(layers):
    return [dataclasses.asdict(layer) for layer in layers]


def peft_layers(theirs):
    return [dict(layer, name=layer["name"].removeprefix("model.")) for layer in as_dicts(theirs.get_layer_status())]


def assert_same_status(ours, theirs):
    assert as_dicts(ours.get_layer_status()) == peft_layers(theirs)
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(theirs.get_model_status())


def test_two_adapters_one_merged_report_what_peft_reports():
    ours, theirs = both()
    assert_same_status(ours, theirs)
    ours.merge_adapter(["b"]), theirs.merge_adapter(["b"])
    assert ours.get_model_status().merged_adapters == ["b"]
    assert_same_status(ours, theirs)
    with ours.disable_adapter(), theirs.disable_adapter():
        # PEFT also clears requires_grad while disabled (its trainable count drops); fxlora leaves the flags
        status = ours.get_model_status()
        assert status.enabled is False and status.requires_grad == {"default": True, "b": False}
        flags = ("requires_grad", "trainable_params")
        mine, peft_s = dataclasses.asdict(status), dataclasses.asdict(theirs.get_model_status())
        assert {k: v for k, v in mine.items() if k not in flags} == {k: v for k, v in peft_s.items() if k not in flags}


def test_a_parameter_frozen_by_hand_makes_its_adapter_irregular():
    ours, theirs = both(second=None)
    for model in (ours, theirs):
        next(p for n, p in model.named_parameters() if "seq.0.lora_A" in n).requires_grad_(False)
    assert ours.get_layer_status()[0].requires_grad == {"default": "irregular"}  # A frozen, B not
    assert ours.get_model_status().requires_grad == {"default": "irregular"}
    assert_same_status(ours, theirs)


@pytest.mark.parametrize("make, targets", [(ConvNet2d, ["conv1", "conv2"]), (EmbeddingModel, ["emb", "proj"])], ids=["conv", "embedding"])
def test_other_layer_kinds_are_named_as_peft_names_them(make, targets):
    ours, theirs = both(make, dict(target_modules=targets), second=None)
    assert {layer.module_type for layer in ours.get_layer_status()} <= {"lora.Conv2d", "lora.Embedding", "lora.Linear"}
    assert_same_status(ours, theirs)


def test_every_layer_reports_the_model_s_active_adapters():
    """Where PEFT lets a modules_to_save layer without a copy for the active adapter report no
    active adapter (and the model's active adapters 'irregular'), fxlora reports the model's."""
    ours, theirs = both()
    ours.set_adapter("b"), theirs.set_adapter("b")
    assert [layer.active_adapters for layer in ours.get_layer_status()] == [["b"]] * 3
    assert ours.get_model_status().active_adapters == ["b"]
    assert theirs.get_model_status().active_adapters == "irregular"
    assert ours.get_model_status().requires_grad == theirs.get_model_status().requires_grad == {"default": False, "b": True}


def test_the_module_functions_take_an_injected_model_and_refuse_a_plain_one():
    torch.manual_seed(0)
    injected = fxlora.inject_adapter_in_model(LoraConfig(**TARGETS), MLP(16))
    layers = fxlora.get_layer_status(injected)
    assert [layer.name for layer in layers] == ["seq.0", "seq.2", "seq.4"]
    assert fxlora.get_model_status(injected).num_adapter_layers == 3
    with pytest.raises(ValueError, match="carries no fxlora adapter"):
        fxlora.get_model_status(nn.Linear(2, 2))


def test_a_quantized_base_names_its_backend():
    tq = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    tq.quantize_(base, tq.Int8WeightOnlyConfig(), filter_fn=lambda m, n: n == "0")
    model = fxlora.transform(base, LoraConfig(target_modules=["0", "2"]))
    assert [layer.quantization_backend for layer in model.get_layer_status()] == ["torchao", None]
    assert model.get_model_status().quantization_backend == "irregular"


@pytest.mark.parametrize("options", [dict(use_dora=True), dict(lora_bias=True), dict(bias="all")], ids=["dora", "lora_bias", "bias_all"])
def test_variants_and_bias_settings_report_what_peft_reports(options):
    ours, theirs = both(config=dict(target_modules=["seq.0", "seq.2"], **options), second=None)
    assert_same_status(ours, theirs)
