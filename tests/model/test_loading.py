"""Adapter checkpoints: files written, round trips, several adapters, safety, bad input.

Exchange with peft itself is tested in test_checkpoint_vs_peft.py.
"""

import copy
import json
import os
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fxlora
import fxlora.io.adapter_files as adapter_files
import fxlora.model.loading as loading
from fxlora import CheckpointError, LoraConfig, LoraModel
from fxlora.io.peft_format import config_digest
from fxlora.runtime.install import fxlora_present
from models import MLP, ConvNet2d, EmbeddingModel

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SEED_CONFIG = dict(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])


def trained(model: LoraModel, scale: float = 0.5) -> LoraModel:
    """Give every trainable tensor (LoRA weights, copies, trained biases) distinct values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    return model


def small_adapter(tmp_path, name="adapter", **overrides):
    """A trained MLP(16) adapter saved in tmp_path/name; returns (base, trained model, directory)."""
    torch.manual_seed(0)
    base = MLP(16)
    config = LoraConfig(**{**SEED_CONFIG, "init_lora_weights": False, **overrides})
    model = trained(fxlora.transform(copy.deepcopy(base), config))
    directory = tmp_path / name
    model.save_pretrained(directory)
    return base, model, directory


def snapshot(model: nn.Module) -> dict:
    """Everything a failed load must leave unchanged."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": [n for n, _ in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "forwards": [n for n, m in model.named_modules() if "forward" in m.__dict__],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["grad"] == before["grad"]
    assert after["training"] == before["training"]
    assert after["forwards"] == before["forwards"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


# ====================================================================== what is written
def test_seed_mlp_file_holds_exactly_the_adapter(tmp_path):
    model = fxlora.transform(MLP(), LoraConfig(**SEED_CONFIG))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", CONFIG, WEIGHTS]  # the model card, as PEFT
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        metadata = f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {
        "base_model.model.seq.0.lora_A.weight": (8, 20),
        "base_model.model.seq.0.lora_B.weight": (2000, 8),
        "base_model.model.seq.2.lora_A.weight": (8, 2000),
        "base_model.model.seq.2.lora_B.weight": (2000, 8),
        "base_model.model.seq.4.weight": (2, 2000),
        "base_model.model.seq.4.bias": (2,),
    }
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 52_162
    tensors = load_file(str(tmp_path / WEIGHTS))
    state = model.state_dict()
    assert torch.equal(tensors["base_model.model.seq.4.weight"], state["seq.4.modules_to_save.default.weight"])
    assert torch.equal(tensors["base_model.model.seq.0.lora_A.weight"], state["seq.0.lora_A.default.weight"])

    data = json.loads((tmp_path / CONFIG).read_text())
    assert metadata == {"format": "pt", "fxlora_config_sha256": config_digest(data)}  # the config these weights go with
    assert data["peft_type"] == "LORA" and data["task_type"] is None and data["inference_mode"] is True
    assert data["base_model_name_or_path"] is None and data["use_dora"] is False
    assert data["target_modules"] == ["seq.0", "seq.2"] and data["modules_to_save"] == ["seq.4"]
    written_by_save = {"peft_version", "auto_mapping", "inference_mode", "runtime_config"}  # as PEFT's save sets them
    for key, value in model.peft_config["default"].to_dict().items():
        assert key in written_by_save or data[key] == value, key


def test_round_trip_gives_the_same_model_and_an_inference_model(tmp_path):
    base, model, directory = small_adapter(tmp_path, bias="all", lora_bias=True, rank_pattern={"seq.2": 2}, alpha_pattern={"seq.0": 5})
    loaded = LoraModel.from_pretrained(copy.deepcopy(base), directory)
    x = torch.randn(6, 20)
    model.eval()
    assert torch.equal(loaded(x), model(x))
    ours = model.state_dict()
    assert loaded.state_dict().keys() == ours.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ours[k]), k  # base biases trained with bias="all" came back too
    assert loaded.peft_config["default"] == model.peft_config["default"].replace(inference_mode=True)  # PEFT: not is_trainable
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.train()  # an inference adapter stays frozen in train mode too
    assert not any(p.requires_grad for p in loaded.parameters())


def test_is_trainable_loads_a_model_that_trains(tmp_path):
    base, model, directory = small_adapter(tmp_path)
    loaded = LoraModel.from_pretrained(copy.deepcopy(base).train(), directory, is_trainable=True)
    assert loaded.training
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert loaded.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_other_adapters_go_to_subdirectories_and_load_back(tmp_path):
    torch.manual_seed(0)
    base = ConvNet2d()
    model = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["conv1", "conv3"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(target_modules=["conv2", "conv3"], r=2, lora_alpha=6, modules_to_save=["head"], init_lora_weights=False))
    model.set_adapter(["default", "other"])
    trained(model)
    model.save_pretrained(tmp_path / "all")
    assert sorted(os.listdir(tmp_path / "all")) == ["README.md", CONFIG, WEIGHTS, "other"]
    assert sorted(os.listdir(tmp_path / "all" / "other")) == [CONFIG, WEIGHTS]  # one card, at the top (PEFT)
    model.save_pretrained(tmp_path / "sel", selected_adapters=["other"])
    assert sorted(os.listdir(tmp_path / "sel")) == ["README.md", "other"]

    loaded = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "all")
    loaded.load_adapter(tmp_path / "sel" / "other", "other")
    assert loaded.active_adapters == ["default"]  # a loaded adapter starts inactive, as added ones do
    x = torch.randn(2, 3, 9, 9)
    model.eval()
    for active in ["default", "other"]:
        model.set_adapter(active), loaded.set_adapter(active)
        assert torch.equal(loaded(x), model(x)), active
    with safe_open(str(tmp_path / "all" / "other" / WEIGHTS), "pt") as f:
        assert "base_model.model.head.weight" in f.keys()  # a modules_to_save copy, under the module's own name
        assert not any("conv1" in k for k in f.keys())


def test_load_adapter_trainable_flag(tmp_path):
    base, _, directory = small_adapter(tmp_path)
    model = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["seq.0"]))
    model.load_adapter(directory, "frozen")
    assert not model.training
    model.load_adapter(directory, "trains", is_trainable=True)
    model.train()
    for name, expect in [("frozen", False), ("trains", True)]:
        model.set_adapter(name)
        flags = [p.requires_grad for n, p in model.named_parameters() if f".{name}." in n or n.endswith(f".{name}")]
        assert flags and all(f == expect for f in flags), name


def test_save_refuses_unknown_adapter_and_writes_nothing(tmp_path):
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]))
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.save_pretrained(tmp_path / "out", selected_adapters=["nope"])
    assert not (tmp_path / "out").exists()


def test_files_without_peft_prefix_are_accepted(tmp_path):
    base, model, directory = small_adapter(tmp_path)
    tensors = load_file(str(directory / WEIGHTS))
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, str(directory / WEIGHTS))
    loaded = LoraModel.from_pretrained(copy.deepcopy(base), directory)
    x = torch.randn(3, 20)
    assert torch.equal(loaded(x), model.eval()(x))


def test_modules_to_save_entries_the_model_lacks_are_ignored_like_peft(tmp_path):
    """peft's task types list e.g. both 'classifier' and 'score'; a model has one of them."""
    base, model, directory = small_adapter(tmp_path)
    data = json.loads((directory / CONFIG).read_text())
    data["modules_to_save"] = ["seq.4", "score"]
    (directory / CONFIG).write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="'score'"):
        loaded = LoraModel.from_pretrained(copy.deepcopy(base), directory)
    assert loaded.peft_config["default"].modules_to_save == ["seq.4"]
    x = torch.randn(3, 20)
    assert torch.equal(loaded(x), model.eval()(x))


# ====================================================================== safety
def test_safetensors_load_never_unpickles(tmp_path, monkeypatch):
    base, model, directory = small_adapter(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = LoraModel.from_pretrained(copy.deepcopy(base), directory)
    assert torch.equal(loaded(torch.ones(1, 20)), model.eval()(torch.ones(1, 20)))


def test_legacy_bin_is_read_only_when_allowed(tmp_path):
    base, model, directory = small_adapter(tmp_path)
    torch.save(load_file(str(directory / WEIGHTS)), directory / "adapter_model.bin")
    (directory / WEIGHTS).unlink()
    fresh = copy.deepcopy(base)
    before = snapshot(fresh)
    with pytest.raises(FileNotFoundError, match="allow_bin=True"):
        LoraModel.from_pretrained(fresh, directory)
    assert_unchanged(fresh, before)
    loaded = LoraModel.from_pretrained(fresh, directory, allow_bin=True)
    assert torch.equal(loaded(torch.ones(2, 20)), model.eval()(torch.ones(2, 20)))


class _Payload:
    """Unpickling this object would create a file (a stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_legacy_bin_with_a_pickled_object_is_refused_without_running_it(tmp_path):
    base, _, directory = small_adapter(tmp_path)
    tensors = load_file(str(directory / WEIGHTS))
    marker = tmp_path / "pwned"
    torch.save({**tensors, "evil": _Payload(marker)}, directory / "adapter_model.bin")
    (directory / WEIGHTS).unlink()
    fresh = copy.deepcopy(base)
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin.*weights_only=True"):
        LoraModel.from_pretrained(fresh, directory, allow_bin=True)
    assert not marker.exists()
    assert_unchanged(fresh, before)


@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
def test_interrupted_save_leaves_the_previous_adapter_intact(tmp_path, monkeypatch, failure):
    base, model, directory = small_adapter(tmp_path)
    files_before = {name: (directory / name).read_bytes() for name in os.listdir(directory)}
    model.eval()
    x = torch.randn(4, 20)
    expected = model(x)
    trained(model)  # new weights, which the failed save must not half-write
    model.peft_config["default"].lora_alpha = 3

    def half_write(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) // 2)
        raise failure

    monkeypatch.setattr(adapter_files, "save_file", half_write)
    with pytest.raises(type(failure)):
        model.save_pretrained(directory)
    assert {name: (directory / name).read_bytes() for name in os.listdir(directory)} == files_before  # no temp files left
    loaded = LoraModel.from_pretrained(copy.deepcopy(base), directory)
    assert torch.equal(loaded(x), expected)


def test_save_replaces_a_previous_adapter_completely(tmp_path):
    base, model, directory = small_adapter(tmp_path)
    other = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["seq.2"], r=3, init_lora_weights=False))
    other.save_pretrained(directory)
    assert sorted(os.listdir(directory)) == ["README.md", CONFIG, WEIGHTS]
    loaded = LoraModel.from_pretrained(copy.deepcopy(base), directory)
    assert loaded.targeted_module_names == ["seq.2"]
    x = torch.randn(2, 20)
    assert torch.equal(loaded(x), other.eval()(x))


# ====================================================================== bad input
def _rewrite_config(directory, **changes):
    data = json.loads((directory / CONFIG).read_text())
    data.update(changes)
    (directory / CONFIG).write_text(json.dumps(data))


def _rewrite_tensors(directory, change):
    tensors = load_file(str(directory / WEIGHTS))
    change(tensors)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})


def _expect_failure(base, directory, error, pattern):
    """Both loaders fail with `error` matching `pattern`, leaving the model exactly as it was."""
    fresh = copy.deepcopy(base)
    before = snapshot(fresh)
    with pytest.raises(error, match=pattern):
        LoraModel.from_pretrained(fresh, directory)
    assert_unchanged(fresh, before)
    assert not fxlora_present(fresh)
    model = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["seq.0"], init_lora_weights=False))
    before = snapshot(model)
    adapters = dict(model.peft_config)
    with pytest.raises(error, match=pattern):
        model.load_adapter(directory, "loaded")
    assert_unchanged(model, before)
    assert model.peft_config == adapters and model.active_adapters == ["default"]


def test_missing_directory_and_files(tmp_path):
    base, _, directory = small_adapter(tmp_path)
    _expect_failure(base, tmp_path / "nowhere", FileNotFoundError, r"nowhere.*does not exist")
    (directory / WEIGHTS).rename(tmp_path / "kept.safetensors")
    _expect_failure(base, directory, FileNotFoundError, r"no adapter_model\.safetensors in adapter directory")
    (tmp_path / "kept.safetensors").rename(directory / WEIGHTS)
    (directory / CONFIG).unlink()
    _expect_failure(base, directory, FileNotFoundError, r"no adapter_config\.json")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupted_weights(tmp_path, damage):
    base, _, directory = small_adapter(tmp_path)
    path = directory / WEIGHTS
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) - 100], "garbage": os.urandom(len(data)), "empty": b""}[damage])
    _expect_failure(base, directory, CheckpointError, r"adapter_model\.safetensors is not a readable safetensors file")


def test_corrupted_config(tmp_path):
    base, _, directory = small_adapter(tmp_path)
    (directory / CONFIG).write_text('{"peft_type": "LORA", "r": ')
    _expect_failure(base, directory, CheckpointError, r"adapter_config\.json is not valid JSON")


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"peft_type": "IA3"}, r"adapter_config\.json: fxlora reads LoRA adapters only.*'IA3'"),
        ({"peft_type": None}, r"adapter_config\.json: fxlora reads LoRA adapters only.*peft_type=None"),
        ({"use_qalora": True}, r"adapter_config\.json: use_qalora=True asks for QA-LoRA"),
        ({"init_lora_weights": "loftq"}, r"adapter_config\.json: invalid LoRA config: init_lora_weights"),
        ({"r": 0}, r"adapter_config\.json: invalid LoRA config: r must be a positive int"),
        ({"lora_flux_capacitor": 2.0}, r"unknown config field lora_flux_capacitor=2\.0"),
        ({"target_modules": ["blocks.9"]}, r"adapter_config\.json does not fit this model.*blocks\.9"),
    ],
    ids=["other-peft-type", "no-peft-type", "qalora", "loftq", "bad-rank", "unknown-field", "other-targets"],
)
def test_bad_configs(tmp_path, changes, pattern):
    base, _, directory = small_adapter(tmp_path)
    _rewrite_config(directory, **changes)
    _expect_failure(base, directory, CheckpointError, pattern)


def test_harmless_unknown_fields_from_newer_peft_load_with_a_warning(tmp_path):
    base, model, directory = small_adapter(tmp_path)
    _rewrite_config(directory, some_future_feature=None, future_flag=False, future_options={})
    with pytest.warns(UserWarning, match="future_flag, future_options, some_future_feature"):
        loaded = LoraModel.from_pretrained(copy.deepcopy(base), directory)
    x = torch.randn(2, 20)
    assert torch.equal(loaded(x), model.eval()(x))


def test_missing_key(tmp_path):
    base, _, directory = small_adapter(tmp_path)
    _rewrite_tensors(directory, lambda t: t.pop("base_model.model.seq.2.lora_B.weight"))
    _expect_failure(
        base, directory, CheckpointError,
        r"(?s)adapter_model\.safetensors does not fit this model.*missing key 'base_model\.model\.seq\.2\.lora_B\.weight' \(expected shape \(16, 8\)\)",
    )


def test_extra_key(tmp_path):
    base, _, directory = small_adapter(tmp_path)
    _rewrite_tensors(directory, lambda t: t.update({"base_model.model.seq.1.lora_A.weight": torch.zeros(8, 16)}))
    _expect_failure(
        base, directory, CheckpointError,
        r"(?s)adapter_model\.safetensors does not fit.*unexpected key 'base_model\.model\.seq\.1\.lora_A\.weight' \(shape \(8, 16\)\)",
    )


def test_adapter_for_another_model_shape_mismatch(tmp_path):
    torch.manual_seed(0)
    wide = fxlora.transform(MLP(32), LoraConfig(**SEED_CONFIG, init_lora_weights=False))
    wide.save_pretrained(tmp_path / "wide")
    _expect_failure(
        MLP(16), tmp_path / "wide", CheckpointError,
        r"(?s)adapter_model\.safetensors does not fit.*key 'base_model\.model\.seq\.0\.lora_B\.weight': expected shape \(16, 8\), found \(32, 8\)",
    )


def test_integer_tensor_where_weights_belong(tmp_path):
    base, _, directory = small_adapter(tmp_path)
    _rewrite_tensors(directory, lambda t: t.update({"base_model.model.seq.0.lora_A.weight": torch.zeros(8, 20, dtype=torch.int64)}))
    _expect_failure(base, directory, CheckpointError, r"seq\.0\.lora_A\.weight': expected a floating point tensor, found dtype torch\.int64")


def test_unexpected_failure_while_copying_rolls_everything_back(tmp_path, monkeypatch):
    """bias="all" also overwrites base biases: those are restored too."""
    base, _, directory = small_adapter(tmp_path, bias="all")

    def fail_half_way(model, fitted):
        state = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, (tensor, _) in list(fitted.items())[: len(fitted) // 2 + 1]:
                state[key].copy_(tensor)
        raise RuntimeError("device lost")

    monkeypatch.setattr(loading, "copy_in", fail_half_way)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _expect_failure(base, directory, RuntimeError, "device lost")


def test_loading_onto_a_lora_model_or_an_existing_name_is_refused(tmp_path):
    base, model, directory = small_adapter(tmp_path)
    with pytest.raises(TypeError, match="load_adapter"):
        LoraModel.from_pretrained(model, directory)
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        model.load_adapter(directory, "default")


def test_embedding_adapter_round_trip(tmp_path):
    torch.manual_seed(0)
    base = EmbeddingModel()
    model = trained(fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["emb", "proj"], bias="lora_only", init_lora_weights=False)))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert keys == {
        "base_model.model.emb.lora_embedding_A",
        "base_model.model.emb.lora_embedding_B",
        "base_model.model.proj.lora_A.weight",
        "base_model.model.proj.lora_B.weight",
        "base_model.model.proj.base_layer.bias",
    }
    loaded = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(loaded(ids), model.eval()(ids))


def test_tensors_take_the_models_dtype(tmp_path):
    """A half-precision file loads into fxlora's float32 adapter weights (values rounded once)."""
    base, model, directory = small_adapter(tmp_path)
    _rewrite_tensors(directory, lambda t: t.update({k: v.half() for k, v in t.items()}))
    loaded = LoraModel.from_pretrained(copy.deepcopy(base), directory)
    state = loaded.state_dict()
    original = model.state_dict()
    for key in ("seq.0.lora_A.default.weight", "seq.4.modules_to_save.default.weight"):
        assert state[key].dtype == torch.float32
        assert torch.equal(state[key], original[key].half().float()), key


@pytest.mark.parametrize("nesting", ["deep-json", "config-in-field", "deep-unknown-field"])
def test_a_nested_config_is_a_checkpoint_error_naming_the_file(tmp_path, nesting):
    base, _, directory = small_adapter(tmp_path)
    path = directory / CONFIG
    text = path.read_text()
    data = json.loads(text)
    if nesting == "deep-json":  # beyond the JSON parser's recursion limit
        path.write_text(text.rstrip()[:-1] + ', "nested": ' + "[" * 100_000 + "]" * 100_000 + "}")
        words = ["nested too deeply to read"]
    elif nesting == "config-in-field":
        data["rank_pattern"] = {"seq.0": copy.deepcopy(data) | {"alpha_pattern": {"a": {"b": {"c": {"d": 1}}}}}}
        path.write_text(json.dumps(data))
        words = ["field 'rank_pattern'", "levels deep", "a config pasted inside the config?"]
    else:
        data["runtime_config"] = json.loads("[" * 500 + "]" * 500)
        path.write_text(json.dumps(data))
        words = ["field 'runtime_config'", "500 levels deep"]
    before = snapshot(base)
    with pytest.raises(CheckpointError) as info:
        LoraModel.from_pretrained(base, directory)
    assert str(path) in str(info.value) and all(w in str(info.value) for w in words), str(info.value)
    assert_unchanged(base, before)
