"""target_parameters matching and PEFT's resolution of transformers 5 MoE configs
(`fxlora.planning.parameters`), with peft 0.21.2's converted config and chosen parameters as the oracle."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch.nn as nn

from fxlora import LoraConfig
from fxlora.errors import NoTargetFoundError, UnsupportedTargetError
from fxlora.planning.parameters import moe_resolution, select_parameters
from fxlora.planning.plan import make_plan

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kinds"))
from test_target_parameters import mixtral, qwen3_moe  # noqa: E402

MODELS = {"mixtral": mixtral, "qwen3_moe": qwen3_moe}


def peft_converted(model: nn.Module, **options):
    """PEFT's config after adapting `model`, and the parameters it wrapped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**options))
    return adapted.peft_config["default"], list(adapted.base_model.targeted_parameter_names)


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


@pytest.mark.parametrize(
    "options",
    [
        dict(target_modules="all-linear"),
        dict(target_modules="all-linear", r=4, lora_alpha=16, rank_pattern={"down_proj": 2}),
        dict(target_modules=["q_proj", "gate"]),
        dict(target_modules=["v_proj"], target_parameters=["experts.down_proj"]),
    ],
)
@pytest.mark.parametrize("model", list(MODELS))
def test_resolution_is_peft_conversion(model, options):
    base = MODELS[model]()
    want, wrapped = peft_converted(base, **options)
    got = moe_resolution(base, LoraConfig(**options), linear_names(base))
    assert set(got.target_modules) == set(want.target_modules)
    assert set(got.target_parameters) == set(want.target_parameters)
    assert got.rank_pattern == want.rank_pattern and got.alpha_pattern == want.alpha_pattern
    plan = make_plan(base, LoraConfig(**options), trace="eager")
    chosen = {f"{t.name}.{p.name}" for t in plan.targets if hasattr(t.spec, "params") for p in t.spec.params}
    assert chosen == set(wrapped)


def test_old_names_of_a_fused_parameter_only_in_part_are_refused_as_in_peft():
    base = mixtral()
    with pytest.raises(ValueError, match="w3"):
        peft_converted(base, target_modules=["w1"])
    with pytest.raises(ValueError, match=r"but not \['w3'\].*fused into the parameter 'gate_up_proj'"):
        make_plan(base, LoraConfig(target_modules=["w1"]), trace="eager")


def test_no_resolution_for_other_models_and_regexes():
    assert moe_resolution(nn.Linear(2, 2), LoraConfig(target_modules="all-linear"), []) is None
    assert moe_resolution(mixtral(), LoraConfig(target_modules=r".*\.q_proj"), []) is None


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Module()
        self.block.w = nn.Parameter(nn.init.normal_(nn.Parameter(nn.Linear(3, 4).weight.detach().clone())))
        self.block.register_buffer("buf", nn.Linear(3, 4).weight.detach().clone())
        self.top = nn.Parameter(nn.Linear(3, 4).weight.detach().clone())
        self.lin = nn.Linear(3, 3)


def test_parameter_rule_is_peft_suffix_rule():
    net = Net()
    assert select_parameters(net, ["w"], [], []) == {"block": ("w",)}
    assert select_parameters(net, ["block.w"], [], []) == {"block": ("w",)}
    assert select_parameters(net, ["lin.weight"], [], []) == {"lin": ("weight",)}
    with pytest.raises(NoTargetFoundError, match=r"'block\.w'"):
        select_parameters(net, ["ck.w"], [], [])  # no dot boundary
    with pytest.raises(NoTargetFoundError, match="not a module or buffer"):
        select_parameters(net, ["block.buf"], [], [])
    with pytest.raises(UnsupportedTargetError, match="a parameter of the model itself"):
        select_parameters(net, ["top"], [], [])
    with pytest.raises(UnsupportedTargetError, match="inside the modules_to_save module"):
        select_parameters(net, ["block.w"], [], ["block"])


def test_config_field():
    assert LoraConfig(target_parameters={"b", "a"}).target_parameters == ["a", "b"]
    assert LoraConfig(target_parameters=[]).target_parameters is None
    with pytest.raises(ValueError, match="needs target_parameters"):
        LoraConfig(target_modules=[])
    assert LoraConfig(target_modules=[], target_parameters=["x"]).target_modules == []


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "olmoe", "llama", "gpt2", "not_a_model"])
def test_the_moe_family_is_peft_s_and_asks_for_a_mapping_only_for_moe_candidates(monkeypatch, model_type):
    """PEFT converts a config where transformers has a conversion mapping for the model type and
    the type's conversion pattern is an MoE family; transformers hands out a deep copy of the
    mapping on every call (2 ms for llama's), so it is asked for MoE candidates only."""
    from transformers import conversion_mapping

    from fxlora.planning import parameters

    expected = conversion_mapping.get_checkpoint_conversion_mapping(model_type) is not None and (
        "mixtral" if model_type == "mixtral" else conversion_mapping._MODEL_TO_CONVERSION_PATTERN.get(model_type)
    ) in parameters._MOE_NAMES
    asked = []
    original = conversion_mapping.get_checkpoint_conversion_mapping
    monkeypatch.setattr(conversion_mapping, "get_checkpoint_conversion_mapping", lambda t: asked.append(t) or original(t))
    model = nn.Linear(2, 2)
    model.config = type("Config", (), {"model_type": model_type})()
    family = parameters.moe_family(model)
    assert (family is not None) == expected
    assert family is None or family in parameters._MOE_NAMES
    assert family == {"mixtral": "mixtral", "qwen3_moe": "qwen2_moe", "olmoe": "qwen2_moe"}.get(model_type)
    if family is None:
        assert asked == []
