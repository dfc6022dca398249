import dataclasses
import math

import pytest

from fxlora import LoraConfig


def test_defaults_match_peft():
    c = LoraConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout) == (8, 8, 0.0)
    assert c.target_modules is None and c.exclude_modules is None and c.modules_to_save is None
    assert c.bias == "none" and c.use_rslora is False and c.init_lora_weights is True
    assert c.fan_in_fan_out is False and c.layers_to_transform is None and c.layers_pattern is None
    assert c.rank_pattern == {} and c.alpha_pattern == {} and c.lora_bias is False


def test_field_names_are_peft_names():
    peft = pytest.importorskip("peft")
    names = {f.name for f in dataclasses.fields(LoraConfig)}
    assert names == {f.name for f in dataclasses.fields(peft.LoraConfig)}


def test_scaling_and_patterns():
    c = LoraConfig(r=4, lora_alpha=16, rank_pattern={"fc1": 2, r"layers\.1\..*": 6}, alpha_pattern={"fc1": 3})
    assert c.scaling_for("x.fc2") == 16 / 4
    assert c.rank_for("model.fc1") == 2 and c.rank_for("fc1") == 2
    assert c.rank_for("model.xfc1") == 4  # dot boundary
    assert c.rank_for("layers.1.q") == 6
    assert c.alpha_for("a.fc1") == 3 and c.scaling_for("a.fc1") == 3 / 2
    rs = LoraConfig(r=16, lora_alpha=8, use_rslora=True)
    assert rs.scaling_for("x") == pytest.approx(8 / math.sqrt(16))


def test_normalisation():
    c = LoraConfig(target_modules=("a", "b", "a"), modules_to_save="head", init_lora_weights="Gaussian")
    assert c.target_modules == ["a", "b"]
    assert c.modules_to_save == ["head"]
    assert c.init_lora_weights == "gaussian"
    assert LoraConfig(target_modules={"b", "a"}).target_modules == ["a", "b"]
    assert LoraConfig(target_modules="ALL-LINEAR").is_all_linear


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"r": 0}, ValueError, ["r", "positive"]),
        ({"r": -3}, ValueError, ["r", "positive"]),
        ({"r": 2.5}, TypeError, ["r", "positive int"]),
        ({"r": True}, TypeError, ["r"]),
        ({"lora_alpha": 0}, ValueError, ["lora_alpha", "positive"]),
        ({"lora_alpha": float("nan")}, ValueError, ["lora_alpha"]),
        ({"lora_alpha": "8"}, TypeError, ["lora_alpha"]),
        ({"lora_dropout": 1.0}, ValueError, ["lora_dropout", "[0, 1)"]),
        ({"lora_dropout": -0.1}, ValueError, ["lora_dropout"]),
        ({"bias": "some"}, ValueError, ["bias", "'none'", "'all'", "'lora_only'"]),
        ({"init_lora_weights": "lora_ga"}, ValueError, ["init_lora_weights", "gaussian"]),
        ({"init_lora_weights": 1}, ValueError, ["init_lora_weights"]),
        ({"target_modules": 3}, TypeError, ["target_modules"]),
        ({"target_modules": []}, ValueError, ["target_modules", "empty"]),
        ({"target_modules": ["a", 1]}, TypeError, ["target_modules"]),
        ({"target_modules": "("}, ValueError, ["target_modules", "regular expression"]),
        ({"exclude_modules": "[x"}, ValueError, ["exclude_modules"]),
        ({"modules_to_save": 5}, TypeError, ["modules_to_save"]),
        ({"target_modules": "q", "layers_to_transform": 1}, ValueError, ["layers_to_transform", "list"]),
        ({"target_modules": ["q"], "layers_to_transform": [-1]}, TypeError, ["layers_to_transform"]),
        ({"target_modules": ["q"], "layers_to_transform": "1"}, TypeError, ["layers_to_transform"]),
        ({"target_modules": ["q"], "layers_pattern": "layers"}, ValueError, ["layers_pattern", "layers_to_transform"]),
        ({"rank_pattern": {"a": 0}}, ValueError, ["rank_pattern"]),
        ({"rank_pattern": {"(": 2}}, ValueError, ["rank_pattern", "regular expression"]),
        ({"alpha_pattern": {"a": -1}}, ValueError, ["alpha_pattern"]),
        ({"rank_pattern": ["a"]}, TypeError, ["rank_pattern"]),
        ({"lora_bias": True, "init_lora_weights": "gaussian"}, ValueError, ["lora_bias"]),
        ({"use_rslora": 1}, TypeError, ["use_rslora"]),
        ({"fan_in_fan_out": "yes"}, TypeError, ["fan_in_fan_out"]),
    ],
)
def test_invalid_values_fail_at_construction(kwargs, exc, words):
    with pytest.raises(exc) as info:
        LoraConfig(**kwargs)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize(
    "field, value, exc, words",
    [
        ("r", 0, ValueError, ["r must be a positive int"]),
        ("modules_to_save", 5, TypeError, ["modules_to_save must be a list of names"]),
        ("target_modules", [], ValueError, ["target_modules is an empty list"]),
        ("target_modules", "(", ValueError, ["not a valid regular expression"]),
        ("lora_dropout", 1.5, ValueError, ["lora_dropout must be in [0, 1)"]),
        ("bias", "some", ValueError, ["bias must be one of"]),
        ("init_lora_weights", "lora_ga", ValueError, ["not supported"]),
        ("rank_pattern", {"x": 0}, ValueError, ["rank_pattern['x']"]),
        ("layers_to_transform", [-1], TypeError, ["layers_to_transform"]),
    ],
)
def test_an_assignment_is_checked_and_a_bad_one_changes_nothing(field, value, exc, words):
    c = LoraConfig(target_modules=["q"], modules_to_save=["head"])
    before = c.to_dict()
    with pytest.raises(exc) as info:
        setattr(c, field, value)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert c.to_dict() == before


def test_an_assignment_is_normalised_as_construction_is():
    c = LoraConfig(target_modules=["q"])
    c.modules_to_save = "seq.4"  # one name, not the characters of one
    c.target_modules = ("a", "b", "a")
    c.layers_to_transform = (0, 2)
    c.init_lora_weights = "Gaussian"
    c.rank_pattern = None
    assert c == LoraConfig(target_modules=["a", "b"], modules_to_save=["seq.4"], layers_to_transform=[0, 2], init_lora_weights="gaussian")
    assert c.modules_to_save == ["seq.4"] and c.rank_pattern == {}


def test_assigning_an_unknown_field_is_refused_with_the_closest_one():
    c = LoraConfig()
    with pytest.raises(AttributeError, match="LoraConfig has no field 'target_module'; did you mean 'target_modules'"):
        c.target_module = ["q"]
    with pytest.raises(AttributeError, match="its fields: r, lora_alpha"):
        c.zzz = 1
    assert c == LoraConfig()


def test_checked_assignment_keeps_copy_pickle_and_equality():
    import copy
    import dataclasses
    import pickle

    c = LoraConfig(target_modules=["q"], rank_pattern={"q": 2}, layers_to_transform=1)
    for other in (copy.copy(c), copy.deepcopy(c), pickle.loads(pickle.dumps(c)), dataclasses.replace(c)):
        assert other == c and other is not c
        other.r = 3  # still checked after copying
        with pytest.raises(ValueError):
            other.r = -1
        assert other.r == 3 and c.r == 8


def test_validate_catches_changes_made_in_place():
    c = LoraConfig()
    c.rank_pattern["x"] = 0  # a dict changed in place is not an assignment
    with pytest.raises(ValueError, match="positive"):
        c.validate()


def test_replace_returns_validated_copy():
    c = LoraConfig(r=4)
    d = c.replace(r=2)
    assert c.r == 4 and d.r == 2
    with pytest.raises(ValueError):
        c.replace(r=0)
