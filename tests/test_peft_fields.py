"""Every field of peft's own LoraConfig is a LoraConfig field here, and is implemented, bookkeeping
(kept, checked as PEFT checks it, written as PEFT writes it) or refused with a message naming it.
Driven by ``dataclasses.fields(peft.LoraConfig)``: a field a new PEFT adds fails these tests."""

import copy
import dataclasses
import json
import warnings

import pytest
import torch

import fxlora
from fxlora import LoraConfig
from fxlora.config import BOOKKEEPING_FIELDS, TASK_TYPES, UNIMPLEMENTED_FIELDS, field_status
from fxlora.errors import CheckpointError, UnsupportedFieldError
from models import MLP
from zoo import TRANSFORMERS

peft = pytest.importorskip("peft")

PEFT_FIELDS = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
IMPLEMENTED = {name for name in PEFT_FIELDS if field_status(name) == "implemented"}


def peft_default(name: str):
    f = PEFT_FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def switched_on(name: str):
    """A value of field `name` that is not PEFT's default."""
    default = peft_default(name)
    return True if default is False else {"enabled": 1} if isinstance(default, dict) or name.endswith("_config") else [1, 2]


def test_every_peft_field_has_a_status_and_the_tables_name_only_fields():
    assert set(PEFT_FIELDS) == set(LoraConfig.field_names())
    assert set(BOOKKEEPING_FIELDS) | set(UNIMPLEMENTED_FIELDS) <= set(PEFT_FIELDS)
    assert not set(BOOKKEEPING_FIELDS) & set(UNIMPLEMENTED_FIELDS)
    assert {"r", "lora_alpha", "target_modules", "modules_to_save", "rank_pattern", "lora_bias"} <= IMPLEMENTED
    assert {field_status(n) for n in PEFT_FIELDS} == {"implemented", "bookkeeping", "not implemented"}


@pytest.mark.parametrize("name", sorted(PEFT_FIELDS))
def test_peft_default_of_every_field_is_accepted(name):
    config = LoraConfig(**{name: peft_default(name)})
    assert config.validate() is None


@pytest.mark.parametrize("name", sorted(UNIMPLEMENTED_FIELDS))
def test_an_unimplemented_feature_switched_on_is_refused_naming_it(name):
    with pytest.raises(UnsupportedFieldError, match=rf"{name}=.*does not support") as info:
        LoraConfig(target_modules=["x"], **{name: switched_on(name)})
    assert isinstance(info.value, ValueError) and isinstance(info.value, NotImplementedError)
    config = LoraConfig(target_modules=["x"])
    with pytest.raises(UnsupportedFieldError, match=name):
        setattr(config, name, switched_on(name))
    assert getattr(config, name) == peft_default(name) or name == "runtime_config"  # unchanged


def test_off_values_of_unimplemented_features_mean_off():
    runtime = peft.tuners.lora.config.LoraRuntimeConfig()
    config = LoraConfig(use_qalora=None, loftq_config=None, target_parameters=[], runtime_config=runtime)
    assert (config.use_qalora, config.loftq_config, config.target_parameters, config.runtime_config) == (False, {}, None, None)
    with pytest.raises(UnsupportedFieldError, match="runtime_config"):
        LoraConfig(runtime_config=peft.tuners.lora.config.LoraRuntimeConfig(ephemeral_gpu_offload=True))


def test_the_tutorial_line_and_every_task_type_work_as_in_peft():
    assert LoraConfig(task_type="CAUSAL_LM").task_type == "CAUSAL_LM"
    for task in peft.TaskType:
        assert LoraConfig(task_type=task).task_type == task.value == peft.LoraConfig(task_type=task).task_type
    assert set(TASK_TYPES) == {t.value for t in peft.TaskType}
    for bad in ("causal_lm", "LM", 3):
        with pytest.raises(ValueError):
            peft.LoraConfig(task_type=bad)
        with pytest.raises(ValueError, match="task_type must be one of"):
            LoraConfig(task_type=bad)


def test_bookkeeping_fields_are_checked():
    assert LoraConfig().peft_type == "LORA" == LoraConfig(peft_type=peft.PeftType.LORA).peft_type
    for kwargs, exc, words in [
        (dict(peft_type="IA3"), ValueError, "peft_type"),
        (dict(inference_mode="yes"), TypeError, "inference_mode"),
        (dict(revision=3), TypeError, "revision"),
        (dict(auto_mapping="x"), TypeError, "auto_mapping"),
        (dict(qalora_group_size=0), ValueError, "qalora_group_size"),
    ]:
        with pytest.raises(exc, match=words):
            LoraConfig(**kwargs)


def save_both(tmp_path, base, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**kwargs))
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    fm.save_pretrained(tmp_path / "fx")
    pm.save_pretrained(str(tmp_path / "peft"))
    read = lambda which: json.loads((tmp_path / which / "adapter_config.json").read_text())
    return fm, pm, read("fx"), read("peft")


def test_bookkeeping_values_are_written_as_peft_writes_them(tmp_path):
    pytest.importorskip("transformers")
    base = TRANSFORMERS["llama"].build()
    kwargs = dict(task_type="CAUSAL_LM", base_model_name_or_path="me/tiny-llama", revision="v1", r=4)
    fm, pm, ours, theirs = save_both(tmp_path, base, **kwargs)
    # PEFT's get_peft_model replaces the config's base_model_name_or_path by the model's (None here,
    # with a warning); fxlora keeps the value the user set
    assert theirs.pop("base_model_name_or_path") is None
    assert ours.pop("base_model_name_or_path") == "me/tiny-llama"
    assert sorted(ours.pop("target_modules")) == sorted(theirs.pop("target_modules"))  # peft writes a set
    assert ours == theirs
    assert ours["task_type"] == "CAUSAL_LM" and ours["auto_mapping"] is None and ours["revision"] == "v1"
    assert fxlora.LoraModel.from_pretrained(TRANSFORMERS["llama"].build(), tmp_path / "peft").peft_config["default"].task_type == "CAUSAL_LM"


def test_a_classification_task_trains_the_head_in_full_as_peft_does(tmp_path):
    pytest.importorskip("transformers")
    base = TRANSFORMERS["bert"].build()  # BertForSequenceClassification: has `classifier`, no `score`
    fm, pm, ours, theirs = save_both(tmp_path, base, task_type="SEQ_CLS", target_modules=["query", "value"])
    assert fm.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    assert "classifier" in fm.modules_to_save_names
    assert ours["modules_to_save"] == theirs["modules_to_save"] == ["classifier", "score"]
    loaded = fxlora.LoraModel.from_pretrained(TRANSFORMERS["bert"].build(), tmp_path / "peft")
    assert "classifier" in loaded.modules_to_save_names


def test_inference_mode_freezes_the_adapter_as_in_peft():
    config = dict(target_modules=["seq.0"], inference_mode=True)
    fm = fxlora.transform(MLP(8), LoraConfig(**config))
    pm = peft.get_peft_model(MLP(8), peft.LoraConfig(**config))
    assert fm.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0] == 0
    fm.train()
    assert not any(p.requires_grad for p in fm.parameters())


def peft_saved(tmp_path):
    pm = peft.get_peft_model(MLP(8), peft.LoraConfig(target_modules=["seq.0"], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path))
    return tmp_path / "adapter_config.json"


def test_a_peft_file_with_every_field_at_its_default_loads(tmp_path):
    path = peft_saved(tmp_path)
    data = json.loads(path.read_text())
    assert set(data) == set(PEFT_FIELDS) - {"runtime_config"}
    torch.manual_seed(0)
    lm = fxlora.LoraModel.from_pretrained(MLP(8), tmp_path)
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(MLP(8), str(tmp_path))
    x = torch.randn(3, 20)
    torch.testing.assert_close(lm(x), pm(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(set(UNIMPLEMENTED_FIELDS) - {"runtime_config"}))
def test_a_peft_file_with_an_unimplemented_feature_on_is_refused_naming_it(tmp_path, name):
    path = peft_saved(tmp_path)
    data = json.loads(path.read_text())
    data[name] = switched_on(name)
    path.write_text(json.dumps(data))
    model = MLP(8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CheckpointError, match=rf"{name}=.*does not support"):
        fxlora.LoraModel.from_pretrained(model, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
