"""The README's "Coming from PEFT" tables name every field of peft's own LoraConfig and the PEFT
calls a LoRA user makes, and mark as "not yet" exactly the fields fxlora refuses."""

import dataclasses
import re
from pathlib import Path

import pytest

from fxlora.config import UNIMPLEMENTED_FIELDS

peft = pytest.importorskip("peft")

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
SECTION = README.split("## Coming from PEFT", 1)[1].split("\n## ", 1)[0]
CALLS = [
    "get_peft_model", "inject_adapter_in_model", "PeftModel.from_pretrained", "save_pretrained", "load_adapter", "add_adapter",
    "set_adapter", "disable_adapter", "enable_adapter_layers", "disable_adapter_layers", "merge_adapter", "unmerge_adapter",
    "merge_and_unload", "unload", "add_weighted_adapter", "delete_adapter", "print_trainable_parameters",
    "get_nb_trainable_parameters", "set_requires_grad", "rescale_adapter_scale", "get_peft_model_state_dict",
    "set_peft_model_state_dict", "hotswap_adapter", "get_model_status", "push_to_hub",
]


def field_rows() -> dict[str, str]:
    """{field: its row's second cell}, from the table whose header is ``| field | in fxlora |``."""
    table = SECTION.split("| field | in fxlora |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        names, what = line.strip("|").split("|", 1)
        for name in re.findall(r"`(\w+)`", names):
            rows[name] = what
    return rows


def test_every_peft_lora_config_field_is_in_the_table():
    rows = field_rows()
    missing = [f.name for f in dataclasses.fields(peft.LoraConfig) if f.name not in rows]
    assert not missing, f"README 'Coming from PEFT' lacks PEFT LoraConfig fields {missing}"
    assert set(rows) <= {f.name for f in dataclasses.fields(peft.LoraConfig)}


def test_refused_fields_say_not_yet_and_others_do_not():
    rows = field_rows()
    for name, what in rows.items():
        assert ("not yet" in what and name != "init_lora_weights") == (name in UNIMPLEMENTED_FIELDS), (name, what)


def test_every_peft_call_is_in_the_table():
    calls = SECTION.split("| PEFT | fxlora |", 1)[1].split("\n\n", 1)[0]
    assert [c for c in CALLS if c not in calls] == []
    for call in CALLS[2:]:  # PEFT's names exist, so the table speaks of real calls
        assert any(hasattr(obj, call.split(".")[-1]) for obj in (peft, peft.PeftModel, peft.tuners.lora.LoraModel, peft.helpers, __import__("peft.utils.hotswap", fromlist=["x"])))
