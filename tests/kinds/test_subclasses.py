"""Linear / Conv subclasses with their own forward, over every such class timm.layers exports and
transformers' Conv1D, against peft with identical tensors.

For each class and a few geometries (stride, 1x1, groups, dilation) a one-layer model is adapted
by peft and by fxlora. fxlora either refuses at transform with `UnsupportedTargetError` naming the
class (the model left as it was), or its output equals peft's with peft's adapter weights copied in
by name, its adapter files are peft's both ways (same keys, same outputs) and its parameter counts
are peft's. Merging is then exact (merged output, merged file loaded into the unmodified class) or
refused with `MergeError`, model unchanged: refused exactly for the classes whose forward is not
linear in the weight (the standardised convolutions) and for grouped convolutions.
"""

import copy
import importlib
import inspect
import pkgutil
import warnings

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig, LoraModel
from fxlora.errors import MergeError, UnsupportedTargetError
from fxlora.kinds.subclasses import declare_linear_forward, has_own_forward, is_declared_linear
from models import assert_same_state, copy_peft_adapter_weights, state_snapshot

peft = pytest.importorskip("peft")
timm_layers = pytest.importorskip("timm.layers")
pytorch_utils = pytest.importorskip("transformers.pytorch_utils")

KNOWN = {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d}
#: the classes whose forward is not linear in the weight: merges must be refused
STANDARDISED = {"StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"}


def _subclasses() -> list[type]:
    """Every nn.Linear / nn.ConvNd subclass defined in timm.layers (all its submodules), and
    transformers' Conv1D."""
    found = {}
    for info in pkgutil.walk_packages(timm_layers.__path__, "timm.layers."):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # an optional dependency of one submodule: its classes are not exported
            continue
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, (nn.Linear, nn.modules.conv._ConvNd))
                and obj.__module__.startswith("timm.")
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [*sorted(found.values(), key=lambda c: c.__name__), pytorch_utils.Conv1D]


SUBCLASSES = _subclasses()


def test_the_enumeration_finds_the_classes_users_hit():
    names = {c.__name__ for c in SUBCLASSES}
    assert {"Conv2dSame", "StdConv2d", "ScaledStdConv2d", "StdConv2dSame", "ScaledStdConv2dSame", "Linear", "Conv1D"} <= names
    assert all(has_own_forward(c.__new__(c), KNOWN) for c in SUBCLASSES if c is not pytorch_utils.Conv1D)


CONV_GEOMETRIES = {
    "k3": dict(kernel_size=3),
    "k3-stride2": dict(kernel_size=3, stride=2),
    "k1": dict(kernel_size=1),
    "k3-groups2": dict(kernel_size=3, groups=2),
    "k3-dilation2": dict(kernel_size=3, dilation=2),
}


def _cases():
    for cls in SUBCLASSES:
        if issubclass(cls, nn.modules.conv._ConvNd):
            for name, geometry in CONV_GEOMETRIES.items():
                yield pytest.param(cls, geometry, id=f"{cls.__name__}-{name}")
        else:
            yield pytest.param(cls, {}, id=cls.__name__)


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _build(cls: type, geometry: dict):
    """(model, input) for a tiny instance of `cls`, or a skip reason if it cannot be built standalone."""
    try:
        if cls is pytorch_utils.Conv1D:
            return OneLayer(cls(6, 8)), torch.randn(3, 8), None
        if issubclass(cls, nn.Linear):
            return OneLayer(cls(8, 6)), torch.randn(3, 8), None
        kernel = geometry["kernel_size"]
        rest = {k: v for k, v in geometry.items() if k != "kernel_size"}
        return OneLayer(cls(4, 6, kernel, **rest)), torch.randn(2, 4, 9, 9), None
    except Exception as exc:  # recorded as the skip reason
        return None, None, f"{cls.__name__}({geometry}) cannot be built standalone: {type(exc).__name__}: {exc}"


def _config(**extra) -> dict:
    return dict(target_modules=["layer"], r=2, lora_alpha=3, init_lora_weights=False, **extra)


def _peft_output(base: nn.Module, x: torch.Tensor, kwargs: dict):
    """(peft model, its output), or (None, None) where peft fails (dilated or dynamically padded A)."""
    try:
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        pm.eval()
        return pm, pm(x)
    except Exception:
        return None, None


def _reference(fm, x: torch.Tensor) -> torch.Tensor:
    """base(x) + B(A(x)) * scaling, from fxlora's own factor modules (for geometries peft cannot run)."""
    layer = fm.model.layer
    with fm.disable_adapter():
        base = fm(x)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    return base + b(a(x)) * fm.peft_config["default"].lora_alpha / fm.peft_config["default"].r


@pytest.mark.parametrize("lora_bias", [False, True], ids=["plain", "lora_bias"])
@pytest.mark.parametrize("cls, geometry", list(_cases()))
def test_subclass_is_peft_or_refused(cls, geometry, lora_bias, tmp_path):
    base, x, reason = _build(cls, geometry)
    if reason:
        pytest.skip(reason)
    base.eval()
    kwargs = _config(lora_bias=lora_bias)
    pm, expected = _peft_output(base, x, kwargs)

    model = copy.deepcopy(base)
    before = state_snapshot(model)
    try:
        fm = fxlora.transform(model, LoraConfig(**kwargs))
    except UnsupportedTargetError as exc:
        assert cls.__name__ in str(exc) and "exclude" in str(exc)
        assert type(model.layer) is cls and "forward" not in vars(model.layer)
        assert_same_state(model, before)
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
        # refused where peft fails, or where peft's A drops the layer's dilation (its adapters would
        # mean another update than fxlora's, and no merge could fold them in)
        assert pm is None or geometry.get("dilation", 1) > 1, f"fxlora refused {cls.__name__} where peft works"
        return
    fm.eval()

    if pm is not None:  # same tensors, same outputs, same parameter counts, same files both ways
        copy_peft_adapter_weights(pm, fm)
        torch.testing.assert_close(fm(x), expected, rtol=1e-5, atol=1e-5)
        assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
        fm.save_pretrained(tmp_path / "fx")
        pm.save_pretrained(str(tmp_path / "peft"))
        from safetensors.torch import load_file

        fx_keys = set(load_file(tmp_path / "fx" / "adapter_model.safetensors"))
        assert fx_keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
        from_peft = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
        torch.testing.assert_close(from_peft(x), expected, rtol=1e-5, atol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from_fx = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fx")).eval()
        torch.testing.assert_close(from_fx(x), expected, rtol=1e-5, atol=1e-5)
    else:  # peft cannot run it: only plain-forward geometries get here (none among these classes)
        expected = _reference(fm, x)
        torch.testing.assert_close(fm(x), expected, rtol=1e-5, atol=1e-5)

    _check_merge(fm, cls, geometry, base, x, expected, tmp_path)


def _check_merge(fm, cls, geometry, base, x, expected, tmp_path):
    """Merging is exact, or refused with MergeError and the model unchanged; which one is decided
    by the class (standardised: refused) and the geometry (grouped: refused)."""
    refused = cls.__name__ in STANDARDISED or geometry.get("groups", 1) > 1
    if fm.model.layer.bias is None and fm.peft_config["default"].lora_bias:
        refused = True  # a lora_bias needs a bias to fold into
    before = state_snapshot(fm)
    if refused:
        for merge in (fm.merge_adapter, lambda: fm.save_merged(tmp_path / "m.safetensors"), fm.merged_state_dict, fm.merge_and_unload):
            with pytest.raises(MergeError, match="keep this adapter unmerged"):
                merge()
            assert_same_state(fm, before)
            torch.testing.assert_close(fm(x), expected, rtol=0, atol=0)
        assert not (tmp_path / "m.safetensors").exists()
        return
    fm.save_merged(tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    reloaded = copy.deepcopy(base)
    reloaded.load_state_dict(load_file(tmp_path / "m.safetensors"))
    torch.testing.assert_close(reloaded(x), expected, rtol=1e-4, atol=1e-5)
    fm.merge_adapter()
    torch.testing.assert_close(fm(x), expected, rtol=1e-4, atol=1e-5)
    fm.unmerge_adapter()
    assert_same_state(fm, before)


@pytest.mark.parametrize("cls", [c for c in SUBCLASSES if c.__name__ in {"ScaledStdConv2d", "StdConv2d", "Conv2dSame"}], ids=lambda c: c.__name__)
@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_same_seed_same_initial_factors_as_peft(cls, init):
    """Factors of the layer's own class draw random numbers in peft's order: a seeded run starts
    from peft's weights (ScaledStdConv2d's gain included)."""
    base = OneLayer(cls(4, 6, 3))
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["layer"], init_lora_weights=init))
    torch.manual_seed(1)
    fm = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["layer"], init_lora_weights=init))
    ours = fm.state_dict()
    theirs = {k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items() if ".lora_" in k}
    assert theirs and {k for k in ours if ".lora_" in k} == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


def test_refusal_names_what_differs():
    """StdConv2dSame with a dynamic 'same' padding (stride 2): an A built as peft builds it pads
    statically and would not line up (peft crashes in forward); fxlora says so at transform."""
    layer = timm_layers.StdConv2dSame(4, 6, 3, stride=2)
    with pytest.raises(UnsupportedTargetError, match=r"'layer' \(StdConv2dSame\).*same_pad: layer/expected True, factor False"):
        fxlora.transform(OneLayer(layer), LoraConfig(target_modules=["layer"]))


def test_weighted_combination_of_standardised_factors_is_refused():
    fm = fxlora.transform(OneLayer(timm_layers.StdConv2d(4, 6, 3)), LoraConfig(target_modules=["layer"], init_lora_weights=False))
    fm.add_adapter("other", LoraConfig(target_modules=["layer"], init_lora_weights=False))
    before = state_snapshot(fm)
    with pytest.raises(ValueError, match="not linear in their weights"):
        fm.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="linear")
    assert "mix" not in fm.peft_config
    assert_same_state(fm, before)


def test_combination_of_declared_linear_factors_is_the_combined_update():
    """Conv2dSame's factors are linear in their weights: a 'cat' combination computes the sum of the
    scaled updates."""
    fm = fxlora.transform(OneLayer(timm_layers.Conv2dSame(4, 6, 3, stride=2)), LoraConfig(target_modules=["layer"], init_lora_weights=False))
    fm.add_adapter("other", LoraConfig(target_modules=["layer"], init_lora_weights=False))
    x = torch.randn(2, 4, 9, 9)
    with fm.disable_adapter():
        base = fm(x)
    updates = []
    for name in ("default", "other"):
        fm.set_adapter(name)
        updates.append(fm(x) - base)
    fm.add_weighted_adapter(["default", "other"], [0.5, 2.0], "mix", combination_type="cat")
    fm.set_adapter("mix")
    torch.testing.assert_close(fm(x) - base, 0.5 * updates[0] + 2.0 * updates[1], rtol=1e-4, atol=1e-5)


def test_declare_linear_forward_lets_a_subclass_merge():
    class CastingLinear(nn.Linear):  # F.linear on the weight cast to the input's dtype: linear in the weight
        def forward(self, x):
            return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)

    x = torch.randn(3, 8)
    fm = fxlora.transform(OneLayer(CastingLinear(8, 6)), LoraConfig(target_modules=["layer"], init_lora_weights=False))
    with pytest.raises(MergeError, match="CastingLinear computes its output with its own forward"):
        fm.merge_adapter()
    assert not is_declared_linear(CastingLinear)
    assert declare_linear_forward(CastingLinear) is CastingLinear and is_declared_linear(CastingLinear)
    expected = fm(x)
    fm.merge_adapter()
    torch.testing.assert_close(fm(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        declare_linear_forward(len)


@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "nf_resnet26"])
def test_timm_models_with_subclass_convs_give_peft_outputs(name):
    """tf_* models (Conv2dSame) and NF-ResNets (ScaledStdConv2d): every ungrouped conv adapted,
    outputs equal to peft's with identical tensors; merging the standardised convs is refused."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, num_classes=3).eval()
    targets = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    kwargs = dict(target_modules=targets, r=4, lora_alpha=3, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**kwargs)).eval()
    copy_peft_adapter_weights(pm, fm)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fm(x), pm(x), rtol=1e-5, atol=1e-5)
    if name == "nf_resnet26":
        with pytest.raises(MergeError, match="ScaledStdConv2d computes its output with its own forward"):
            fm.merge_adapter()


def test_dm_nfnet_dynamic_same_padding_is_refused_naming_the_layer():
    """dm_nfnet's stride-2 ScaledStdConv2dSame layers pad dynamically: refused (peft crashes in
    forward), the model untouched; excluding them, the rest adapts."""
    timm = pytest.importorskip("timm")
    base = timm.create_model("dm_nfnet_f0", pretrained=False, num_classes=3).eval()
    targets = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    dynamic = [n for n in targets if getattr(base.get_submodule(n), "same_pad", False)]
    assert dynamic
    before = state_snapshot(base)
    with pytest.raises(UnsupportedTargetError, match=rf"'{dynamic[0]}' \(ScaledStdConv2dSame\).*same_pad"):
        fxlora.transform(base, LoraConfig(target_modules=targets))
    assert_same_state(base, before)
    fm = fxlora.transform(base, LoraConfig(target_modules=targets, exclude_modules=dynamic))
    assert len(fm.targeted_module_names) == len(targets) - len(dynamic)


def test_falcon_linear_merges_exactly():
    """transformers' FalconLinear (x @ W.T + b, its own forward) is declared linear: merges are exact."""
    falcon = pytest.importorskip("transformers.models.falcon.modeling_falcon")
    x = torch.randn(3, 8)
    fm = fxlora.transform(OneLayer(falcon.FalconLinear(8, 6)), LoraConfig(**_config(lora_bias=True)))
    expected = fm(x)
    fm.merge_adapter()
    torch.testing.assert_close(fm(x), expected, rtol=1e-5, atol=1e-6)
