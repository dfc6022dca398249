"""Any adapter name either works end to end (transform, forward, torch.compile, save/load, mixed
batch) exactly as the name 'default' does, or is refused at the API with a ValueError that names
it and says what a valid name is."""

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch.nn as nn
from hypothesis import given, strategies as st
from torch._dynamo.testing import CompileCounter

import fxlora
from fxlora import LoraConfig

SPECIAL = ['a"b', "if", "None", "a\nb", "\r", "a\\b", "a/b", "x'y", "º", "ﬁ", "\t", " ", "0", "é" * 128, "é" * 127 + "x",
           "default", "__base__", "forward", "training", "keys", "", "a.b", "a\0b", "\ud800", "x" * 256, "x" * 255]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(torch.relu(self.lin(self.emb(ids).mean(1))))


CONFIG = LoraConfig(target_modules=["emb", "lin"], modules_to_save=["head"], init_lora_weights=False)


def adapted(name: str) -> fxlora.LoraModel:
    torch.manual_seed(0)
    base = Net()
    torch.manual_seed(1)
    model = fxlora.transform(base, CONFIG, adapter_name=name)
    with torch.no_grad():
        model.model.head.modules_to_save[name].weight.add_(1.0)
    return model.eval()


def should_be_valid(name: str) -> bool:
    """The rule, stated independently of fxlora: any key nn.ModuleDict and nn.ParameterDict take
    that can also name a directory (no path separator or NUL, UTF-8, at most 255 bytes)."""
    try:
        nn.ModuleDict({name: nn.Identity()})
        nn.ParameterDict({name: nn.Parameter(torch.zeros(1))})
        encoded = name.encode("utf-8")
    except (KeyError, TypeError, UnicodeEncodeError):
        return False
    return name != "__base__" and not any(c in name for c in "/\\\0") and len(encoded) <= 255


def compiled_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch._dynamo.reset()
    counter = CompileCounter()
    out = torch.compile(model, backend=counter)(x)
    assert counter.frame_count >= 1  # the graph code was compiled, not skipped
    return out


def check_name(name: str) -> None:
    x = torch.randint(0, 10, (3, 4))
    if not should_be_valid(name):
        torch.manual_seed(0)
        base = Net()
        before = copy.deepcopy(base.state_dict())
        with pytest.raises(ValueError, match="invalid adapter name") as err:
            fxlora.transform(base, CONFIG, adapter_name=name)
        assert repr(name) in str(err.value) and "an adapter name is" in str(err.value)
        assert base.state_dict().keys() == before.keys()
        return
    model, ref = adapted(name), adapted("default")
    for key, value in ref.state_dict().items():  # the same adapter, under another name
        assert torch.equal(model.state_dict()[key.replace(".default", f".{name}")], value)
    expected = ref(x)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert "graph" in set(model.target_paths.values())
    torch.testing.assert_close(compiled_output(model, x), expected)
    torch._dynamo.reset()
    mixed = [name, "__base__", name]
    torch.testing.assert_close(model(x, adapter_names=mixed), ref(x, adapter_names=["default", "__base__", "default"]))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        where = Path(tmp) if name == "default" else Path(tmp) / name
        assert (where / "adapter_config.json").is_file()
        torch.manual_seed(0)
        loaded = fxlora.LoraModel.from_pretrained(Net(), where, adapter_name=name)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        if name != "default":
            ref.load_adapter(where, name)
            rows = [name, "default", "__base__"]
            base_row = ref(x, adapter_names=["__base__"] * 3)[2]
            got = ref(x, adapter_names=rows)
            torch.testing.assert_close(got[0], expected[0])
            torch.testing.assert_close(got[1], expected[1])
            torch.testing.assert_close(got[2], base_row)
            ref.set_adapter(name)
            torch.testing.assert_close(ref(x), expected)
            ref.delete_adapter(name)
            assert list(ref.peft_config) == ["default"]


@pytest.mark.parametrize("name", SPECIAL, ids=[ascii(n)[:20] for n in SPECIAL])
def test_special_names(name):
    check_name(name)


@given(st.text(max_size=12) | st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=6))
def test_any_text_name_works_or_is_refused_at_the_api(name):
    check_name(name)


def test_every_entry_point_refuses_an_invalid_name_with_the_rule():
    model = adapted("default")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        calls = {
            "add_adapter": lambda n: model.add_adapter(n, CONFIG),
            "load_adapter": lambda n: model.load_adapter(tmp, n),
            "from_pretrained": lambda n: fxlora.LoraModel.from_pretrained(Net(), tmp, adapter_name=n),
            "add_weighted_adapter": lambda n: model.add_weighted_adapter(["default"], [1.0], n),
        }
        for entry, call in calls.items():
            for bad in ["a.b", "a/b", "", None, "forward"]:
                with pytest.raises(ValueError, match="invalid adapter name") as err:
                    call(bad)
                assert "an adapter name is" in str(err.value), entry
    for entry, call in {
        "set_adapter": model.set_adapter,
        "delete_adapter": model.delete_adapter,
        "set_adapter_scale": lambda n: model.set_adapter_scale(n, 1.0),
    }.items():
        for bad in ["a.b", "nope"]:
            with pytest.raises(ValueError, match=rf"unknown adapter {bad!r}; existing adapters: \['default'\]"):
                call(bad)
        with pytest.raises(ValueError, match=r"give an adapter name or a list of them; existing adapters: \['default'\]"):
            call(None)
    with pytest.raises(ValueError, match="unknown adapter name"):
        model(torch.randint(0, 10, (1, 4)), adapter_names=["a.b"])
    assert list(model.peft_config) == ["default"]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
