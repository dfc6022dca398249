"""fxlora.kinds (the LayerKind protocol and its registry) and fxlora.variants: the contracts every
kind keeps, checked kind by kind, and a new kind plugged in from outside fxlora."""

import copy
import dataclasses
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxlora
import fxlora.kinds.registry as registry
from fxlora import LoraConfig, UnsupportedTargetError
from fxlora.core.branch import stackable
from fxlora.errors import MergeError
from fxlora.core.delta import delta_weight
from fxlora.kinds import LayerKind, kind_named, kind_of, register_kind, registered_kinds, supported_types
from fxlora.kinds.low_rank import ModulePairKind
from fxlora.core.layers import AdapterSpec, target_meta
from fxlora.variants import PLAIN, LoraVariant, branch_gate, register_variant, variant_named
from fxlora.errors import VariantError

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


class One(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


LAYERS = [
    ("linear", lambda: nn.Linear(7, 5), lambda: torch.randn(3, 7), "linear"),
    ("hf-conv1d", lambda: Conv1D(5, 7), lambda: torch.randn(2, 3, 7), "linear"),
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), lambda: torch.randn(2, 4, 9), "conv"),
    ("conv2d-dilated", lambda: nn.Conv2d(3, 5, 3, padding=2, dilation=2), lambda: torch.randn(2, 3, 7, 7), "conv"),
    ("conv3d", lambda: nn.Conv3d(2, 4, (1, 2, 3)), lambda: torch.randn(1, 2, 3, 4, 5), "conv"),
    ("embedding", lambda: nn.Embedding(11, 6, padding_idx=0), lambda: torch.randint(0, 11, (3, 4)), "embedding"),
    ("conv-transpose1d", lambda: nn.ConvTranspose1d(4, 3, 3, stride=2), lambda: torch.randn(2, 4, 6), "conv_transpose"),
    ("conv-transpose2d", lambda: nn.ConvTranspose2d(3, 4, (2, 3), stride=(2, 1), padding=(0, 1)), lambda: torch.randn(2, 3, 4, 5), "conv_transpose"),
    ("conv-transpose3d", lambda: nn.ConvTranspose3d(2, 3, 2, dilation=2, output_padding=1, stride=2), lambda: torch.randn(1, 2, 3, 3, 2), "conv_transpose"),
]
IDS = [c[0] for c in LAYERS]


def adapted(layer, **config):
    config = {"target_modules": ["layer"], "r": 3, "lora_alpha": 5, "init_lora_weights": False, "fan_in_fan_out": isinstance(layer, Conv1D), **config}
    model = fxlora.transform(One(layer), LoraConfig(**config))
    return model.eval(), model.model.layer


# ---------------------------------------------------------------- registry
@pytest.mark.parametrize("name, make, make_input, kind", LAYERS, ids=IDS)
def test_each_supported_layer_has_its_kind(name, make, make_input, kind):
    found = kind_of(make())
    assert found is kind_named(kind) and isinstance(found, LayerKind)


def test_subclasses_count_and_other_modules_have_no_kind():
    assert kind_of(nn.modules.linear.NonDynamicallyQuantizableLinear(3, 4)) is kind_named("linear")
    for module in (nn.ReLU(), nn.LayerNorm(4), nn.Bilinear(2, 2, 2), nn.Sequential()):
        assert kind_of(module) is None


def test_registering_a_taken_name_or_a_non_kind_is_refused():
    with pytest.raises(ValueError, match="'conv' is already registered"):
        register_kind(kind_named("conv"))
    with pytest.raises(TypeError, match=r"is not a LayerKind: it lacks \[.*'factor_shapes'.*\]"):
        register_kind(object())
    with pytest.raises(KeyError, match="no layer kind named 'lstm'; registered: \\['linear'"):
        kind_named("lstm")


def test_unsupported_target_error_lists_every_registered_kind():
    with pytest.raises(UnsupportedTargetError) as info:
        fxlora.transform(nn.Sequential(nn.ReLU()), LoraConfig(target_modules=["0"]))
    message = str(info.value)
    assert supported_types() in message
    for kind in registered_kinds():
        assert kind.layer_types in message
    assert "nn.ConvTranspose2d" in message


def test_a_layers_record_holds_the_registered_kind_through_copies():
    model, layer = adapted(nn.ConvTranspose1d(4, 3, 3))
    assert target_meta(layer).kind is kind_named("conv_transpose")
    twin = copy.deepcopy(model)
    assert target_meta(twin.model.layer).kind is kind_named("conv_transpose")
    assert pickle.loads(pickle.dumps(kind_named("embedding"))) is kind_named("embedding")


# ---------------------------------------------------------------- contracts, kind by kind
@pytest.mark.parametrize("lora_bias", [False, True], ids=["plain", "lora_bias"])
@pytest.mark.parametrize("name, make, make_input, kind", LAYERS, ids=IDS)
def test_factor_shapes_are_the_stored_tensors_and_the_planned_count(name, make, make_input, kind, lora_bias):
    if kind == "embedding" and lora_bias:
        with pytest.raises(ValueError, match="lora_bias=True is not supported for the Embedding 'layer'"):
            adapted(make(), lora_bias=True)
        return
    model, layer = adapted(make(), lora_bias=lora_bias)
    spec = target_meta(layer).adapters["default"]
    shapes = kind_named(kind).factor_shapes(layer, spec)
    stored = {k.removeprefix("layer."): tuple(v.shape) for k, v in model.state_dict().items() if ".lora_" in k}
    assert stored == {key.replace(".", ".default.", 1) if "." in key else f"{key}.default": s for key, s in shapes.items()}
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert model.reports["default"].trainable_params == lora


@pytest.mark.parametrize("name, make, make_input, kind", LAYERS, ids=IDS)
def test_the_base_layer_with_the_delta_as_weight_computes_the_update(name, make, make_input, kind):
    """`weight_from_matrix(B @ A)` is laid out like the weight: the layer's own op on it (no bias)
    gives `update`, for every kind."""
    layer = make()
    plain = copy.deepcopy(layer)
    _, layer = adapted(layer)
    x = make_input()
    found = kind_named(kind)
    a, b = found.as_matrices(layer, "default")
    delta = found.weight_from_matrix(layer, b @ a, target_meta(layer).fan_in_fan_out)
    params = {"weight": delta}
    if getattr(plain, "bias", None) is not None:
        params["bias"] = torch.zeros_like(plain.bias)
    expected = torch.func.functional_call(plain, params, (x,))
    with torch.no_grad():
        got = found.update(layer, "default", x, plain(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, make, make_input, kind", LAYERS, ids=IDS)
def test_written_matrices_read_back_as_the_same_factors(name, make, make_input, kind):
    model, layer = adapted(make())
    model.add_adapter("twin", LoraConfig(target_modules=["layer"], r=3, lora_alpha=5, fan_in_fan_out=isinstance(layer, Conv1D)))
    found = kind_named(kind)
    with torch.no_grad():
        found.write_matrices(layer, "twin", found.as_matrices(layer, "default"), None)
    for mine, theirs in zip(found.as_matrices(layer, "twin"), found.as_matrices(layer, "default")):
        assert torch.equal(mine, theirs)
    x = make_input()
    model.set_adapter("twin")
    via_copy = model(x)
    model.set_adapter("default")
    assert torch.equal(via_copy, model(x))


def test_adapter_names_that_clash_with_a_kinds_holders_are_refused_up_front():
    model, layer = adapted(nn.Embedding(5, 3))  # its factors live in nn.ParameterDicts
    with pytest.raises(ValueError, match="invalid adapter name 'copy': it clashes with an nn.Module attribute"):
        model.add_adapter("copy", LoraConfig(target_modules=["layer"]))
    assert list(model.peft_config) == ["default"] and list(layer.lora_embedding_A) == ["default"]


@pytest.mark.parametrize(
    "layer, combination, message",
    [
        (nn.Conv2d(4, 4, 3, groups=2), "cat", r"combination 'cat' cannot combine adapters of a grouped convolution \(groups=2\)"),
        (nn.ConvTranspose2d(4, 4, 3, groups=2), "svd", r"combination 'svd' cannot combine adapters of a grouped convolution"),
    ],
)
def test_kinds_refuse_combinations_their_layout_cannot_hold(layer, combination, message):
    model, _ = adapted(layer, r=2)
    model.add_adapter("b", LoraConfig(target_modules=["layer"], r=2, init_lora_weights=False))
    with pytest.raises(ValueError, match=message):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type=combination)
    assert "mix" not in model.peft_config
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="linear")  # B stays grouped


# ---------------------------------------------------------------- a kind from outside fxlora
class RowLinear(nn.Module):
    """A linear layer fxlora has never heard of: weight (out, in), no bias."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)

    def forward(self, x):
        return F.linear(x, self.weight)


class RowLinearKind(ModulePairKind):
    name = "row_linear"
    layer_types = "tests' RowLinear"

    def matches(self, module):
        return isinstance(module, RowLinear)

    def factor_shapes(self, module, spec):
        n_out, n_in = module.weight.shape
        return {"lora_A.weight": (spec.r, n_in), "lora_B.weight": (n_out, spec.r)}

    def factor_modules(self, module, spec):
        n_out, n_in = module.weight.shape
        return nn.Linear(n_in, spec.r, bias=False), nn.Linear(spec.r, n_out, bias=False)

    def weight_from_matrix(self, module, matrix, fan_in_fan_out):
        return matrix


@pytest.fixture
def row_linear_kind(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registrations end with the test
    return register_kind(RowLinearKind())


def test_a_registered_kind_gets_every_feature_without_core_changes(row_linear_kind, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(RowLinear(6, 5), nn.ReLU(), RowLinear(5, 3))
    x = torch.randn(4, 6)
    with pytest.raises(UnsupportedTargetError, match="tests' RowLinear"):
        fxlora.transform(nn.Sequential(nn.Tanh()), LoraConfig(target_modules=["0"]))
    model = fxlora.transform(net, LoraConfig(target_modules=["0", "2"], r=2, lora_alpha=4, init_lora_weights=False)).eval()
    assert set(model.target_paths.values()) == {"graph"}
    first = net[0]
    update = first.lora_B["default"].weight @ first.lora_A["default"].weight * 2.0
    torch.testing.assert_close(first(x), F.linear(x, first.weight + update), rtol=1e-5, atol=1e-6)
    expected = model(x)
    weights = {n: p.detach().clone() for n, p in net.named_parameters() if "lora" not in n}
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in net.named_parameters() if n in weights)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    again = fxlora.LoraModel.from_pretrained(nn.Sequential(RowLinear(6, 5), nn.ReLU(), RowLinear(5, 3)), tmp_path)
    assert torch.equal(again(x), expected)


# ---------------------------------------------------------------- variants
def test_plain_lora_is_the_registered_variant_every_adapter_names():
    assert variant_named("lora") is PLAIN and PLAIN.additive_update and PLAIN.additive_delta
    assert AdapterSpec(r=2, alpha=2).variant is PLAIN
    _, layer = adapted(nn.Linear(4, 4))
    assert target_meta(layer).adapters["default"].variant is PLAIN
    with pytest.raises(ValueError, match="'lora' is already registered"):
        register_variant(LoraVariant("lora", additive_update=True, additive_delta=True))


def test_branch_gate_takes_the_merged_scale_back_only_for_additive_variants():
    assert branch_gate(PLAIN, 0.75, 0.0) == 0.75
    assert branch_gate(PLAIN, 0.0, 1.5) == -1.5
    rows = torch.tensor([1.0, 0.0, 2.0])
    assert torch.equal(branch_gate(PLAIN, rows, 0.5), rows - 0.5)
    other = LoraVariant("scaled-norm", additive_update=False, additive_delta=False)
    assert branch_gate(other, 0.3, 0.0) == 0.3  # nothing merged: nothing to take back
    with pytest.raises(VariantError, match="'scaled-norm' cannot be switched through its branch"):
        branch_gate(other, 0.3, 1.0)


def _with_variant(layer, adapter, variant):
    meta = target_meta(layer)
    meta.adapters[adapter] = dataclasses.replace(meta.adapters[adapter], variant=variant)


def test_fast_paths_and_folding_ask_the_variant():
    torch.manual_seed(0)
    model = fxlora.transform(nn.Sequential(nn.Linear(6, 6)), LoraConfig(target_modules=["0"], r=2, init_lora_weights=False), trace="eager")
    model.add_adapter("b", LoraConfig(target_modules=["0"], r=2, init_lora_weights=False))
    model.set_adapter(["default", "b"])
    model.eval()
    layer = model.model[0]
    x = torch.randn(3, 6)
    expected = model(x)
    assert stackable(layer, target_meta(layer), ["default", "b"])
    _with_variant(layer, "b", LoraVariant("not-additive", additive_update=False, additive_delta=False))
    assert not stackable(layer, target_meta(layer), ["default", "b"])
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)  # the general path, same math here
    weight = layer.weight.detach().clone()
    with pytest.raises(MergeError, match="variant 'not-additive' does not merge as weight \\+ delta"):
        model.merge_adapter()
    assert torch.equal(layer.weight, weight) and not model.merged
    assert delta_weight(layer, "default").shape == weight.shape  # the other adapter is untouched
