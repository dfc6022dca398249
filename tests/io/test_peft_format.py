"""PEFT's file format mapped to fxlora: config JSON <-> LoraConfig, tensor names and shapes."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import CheckpointError, LoraConfig
from fxlora.io.peft_format import (
    config_from_json,
    config_to_json,
    layout_of_adapter,
    layout_of_plan,
    peft_strip_adapter_name,
)
from fxlora.planning.plan import make_plan
from models import MLP, ConvNet1d, ConvNet2d, ConvNet3d, EmbeddingModel

peft = pytest.importorskip("peft")

RICH = LoraConfig(
    r=4,
    lora_alpha=12,
    lora_dropout=0.1,
    target_modules=["seq.0", "seq.2"],
    exclude_modules=["seq.3"],
    modules_to_save=["seq.4"],
    bias="lora_only",
    use_rslora=True,
    init_lora_weights=False,
    layers_to_transform=[0, 2],
    layers_pattern="seq",
    rank_pattern={"seq.2": 2},
    alpha_pattern={r"seq\.0": 3.5},
    lora_bias=True,
)


def test_config_round_trips_through_json():
    data = json.loads(json.dumps(config_to_json(RICH, "org/model")))
    assert data["peft_type"] == "LORA" and data["base_model_name_or_path"] == "org/model"
    assert list(data) == sorted(data)
    config, notes = config_from_json(data, "x.json")
    assert config == RICH.replace(base_model_name_or_path="org/model") and notes == []  # bookkeeping is kept


def test_regex_target_modules_stay_a_string():
    data = config_to_json(LoraConfig(target_modules=r".*\.fc\d"))
    assert data["target_modules"] == r".*\.fc\d"


@pytest.mark.parametrize("target_modules", [["q", "v"], r".*\.(q|v)"])
def test_every_field_peft_writes_is_understood(tmp_path, target_modules):
    """The JSON peft 0.21.2 writes reads back with no warning and the same settings."""
    kwargs = dict(r=4, lora_alpha=7, target_modules=target_modules, modules_to_save=["head"], bias="all", lora_bias=True, rank_pattern={"q": 2}, alpha_pattern={"v": 5}, use_rslora=True)
    peft.LoraConfig(**kwargs).save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    config, notes = config_from_json(data, "adapter_config.json")
    assert notes == []
    expected = LoraConfig(**kwargs)
    if isinstance(target_modules, list):
        assert sorted(config.target_modules) == sorted(expected.target_modules)  # peft writes a set as a list
        config.target_modules = expected.target_modules
    assert config == expected


def test_fxlora_config_json_is_read_by_peft(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config_to_json(RICH)))
    loaded = peft.LoraConfig.from_pretrained(str(tmp_path))
    for key, value in RICH.to_dict().items():
        if key in ("peft_version", "inference_mode", "runtime_config"):  # set by the save, as PEFT's
            continue
        got = getattr(loaded, key)
        got = sorted(got) if isinstance(got, set) else got
        assert got == (sorted(value) if key == "target_modules" else value), key
    assert loaded.peft_type == peft.PeftType.LORA and loaded.use_dora is False


@pytest.mark.parametrize(
    "field, value, what",
    [
        ("layer_replication", [[0, 2]], "layer replication"),
        ("trainable_token_indices", [1, 2], "trainable tokens"),
        ("alora_invocation_tokens", [5], "aLoRA"),
        ("use_qalora", True, "QA-LoRA"),
        ("megatron_config", {"tp": 2}, "Megatron"),
    ],
)
def test_unsupported_peft_features_are_errors(field, value, what):
    data = {**config_to_json(RICH), field: value}
    with pytest.raises(CheckpointError, match=rf"cfg\.json: {field}=.*{what}.*fxlora does not support"):
        config_from_json(data, "cfg.json")
    off = {**config_to_json(RICH), field: None if not isinstance(value, bool) else False}
    assert config_from_json(off, "cfg.json")[0] == RICH


def test_target_parameters_are_read():
    data = {**config_to_json(RICH), "target_parameters": ["experts.gate_up_proj", "gate.weight"]}
    assert config_from_json(data, "cfg.json")[0].target_parameters == ["experts.gate_up_proj", "gate.weight"]


def test_unknown_fields():
    data = {**config_to_json(RICH), "new_feature": None, "new_flag": False}
    config, notes = config_from_json(data, "cfg.json")
    assert config == RICH and len(notes) == 1 and "new_feature, new_flag" in notes[0]
    with pytest.raises(CheckpointError, match=r"cfg\.json: unknown config field new_scale=0\.5"):
        config_from_json({**data, "new_scale": 0.5}, "cfg.json")


@pytest.mark.parametrize("data", [[1, 2], {"r": 8}, {"peft_type": "LOHA", "r": 8}])
def test_not_a_lora_config(data):
    with pytest.raises(CheckpointError, match=r"cfg\.json: "):
        config_from_json(data, "cfg.json")


@pytest.mark.parametrize(
    "key, expected",
    [
        ("a.q.lora_A.default.weight", "a.q.lora_A.weight"),
        ("emb.lora_embedding_A.default", "emb.lora_embedding_A"),
        ("head.modules_to_save.default.bias", "head.modules_to_save.bias"),
        ("head.modules_to_save.default.sub.bias", "head.modules_to_save.default.sub.bias"),  # peft keeps it
        ("default.lora_A.default.weight", "default.lora_A.weight"),
        ("bias", "bias"),
    ],
)
def test_adapter_name_is_dropped_where_peft_drops_it(key, expected):
    assert peft_strip_adapter_name(key, "default") == expected


CASES = [
    (lambda: MLP(16), dict(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], rank_pattern={"seq.2": 3})),
    (ConvNet1d, dict(target_modules=["conv1", "conv2", "head"], lora_bias=True)),
    (lambda: ConvNet2d(groups=2), dict(target_modules=["conv1", "conv2", "conv3"], r=4, bias="all", modules_to_save=["head"])),
    (ConvNet3d, dict(target_modules=["conv1", "conv2"], bias="lora_only")),
    (EmbeddingModel, dict(target_modules=["emb", "proj"], modules_to_save=["classifier"], bias="all")),
]


@pytest.mark.parametrize("make, kwargs", CASES, ids=["mlp", "conv1d", "conv2d-groups", "conv3d", "embedding"])
def test_layout_planned_before_loading_is_the_layout_after(make, kwargs):
    """The shapes checked before a load (from the plan) are those of the tensors then created."""
    base = make()
    config = LoraConfig(**kwargs)
    planned = layout_of_plan(base, make_plan(base, config, "default", trace="eager"))
    model = fxlora.transform(copy.deepcopy(base), config)
    attached = layout_of_adapter(model.model, "default", config.bias)
    assert planned == attached
    state = model.state_dict()
    for file_key, slot in attached.slots.items():
        assert tuple(state[slot.key].shape) == slot.shape, file_key
    adapter_numbers = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n or ".modules_to_save." in n)
    assert sum(math.prod(s.shape) for s in attached.slots.values() if s.role == "adapter") == adapter_numbers


def test_layout_of_one_adapter_ignores_the_others():
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"], bias="all"))
    model.add_adapter("other", LoraConfig(target_modules=["seq.0", "seq.2"], r=2, lora_bias=True, modules_to_save=["seq.4"]))
    default = layout_of_adapter(model.model, "default", "all")
    assert sorted(default.slots) == [
        "seq.0.base_layer.bias",
        "seq.0.lora_A.weight",
        "seq.0.lora_B.weight",
        "seq.2.bias",
        "seq.4.bias",
    ]
    assert all(".other" not in s.key for s in default.slots.values())
    other = layout_of_adapter(model.model, "other", "none")
    assert other.slots["seq.2.lora_B.bias"].key == "seq.2.lora_B.other.bias"
    assert other.slots["seq.4.weight"].key == "seq.4.modules_to_save.other.weight"
