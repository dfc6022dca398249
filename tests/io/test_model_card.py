"""The model card (``README.md``) `save_pretrained` writes beside the adapter (`fxlora.io.model_card`):
what it says, how it updates a card already there (the user's text kept), and that it is part of the
save's transaction (a failed save puts the old card back, a kill leaves the old or the new card
whole)."""

import copy
import errno
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxlora
from fxlora import LoraConfig, LoraModel
from fxlora.io.adapter_files import read_adapter_dir
from fxlora.io.model_card import BEGIN, END, card_text
from adapter_writer import FS_CALLS, USER_CARD, Version, hook_fs_calls
from models import MLP
from zoo import TRANSFORMERS

CARD = "README.md"
PAIR = ["adapter_config.json", "adapter_model.safetensors"]
WRITER = Path(__file__).with_name("adapter_writer.py")


def _front_and_body(text: str) -> tuple[str, str]:
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return front, body


def _section(text: str) -> str:
    return text[text.index(BEGIN): text.index(END) + len(END)]


# ====================================================================== what the card says
def test_a_new_card_names_the_base_model_and_each_adapter(tmp_path):
    base = TRANSFORMERS["llama"].build()
    base.config._name_or_path = "tiny/llama"
    model = fxlora.transform(base, LoraConfig(r=4))
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj"]))
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CARD, *PAIR, "other"]
    assert CARD not in os.listdir(tmp_path / "other")  # one card, in the save directory (as PEFT)
    front, body = _front_and_body((tmp_path / CARD).read_text())
    assert front.splitlines() == [
        "library_name: fxlora",
        "base_model: 'tiny/llama'",
        "tags:",
        "- 'base_model:adapter:tiny/llama'",
        "- 'fxlora'",
        "- 'lora'",
        "- 'transformers'",
    ]
    section = _section(body)
    assert "`transformers.models.llama.modeling_llama.LlamaForCausalLM` (`tiny/llama`)" in section
    assert "| `default` | `.` | 4 | 8 | 0.0 | the model type's default | 4: `q_proj`, `v_proj` | none |" in section
    assert "| `other` | `other` | 2 | 6 | 0.0 | `k_proj` | 2: `k_proj` | none |" in section
    assert f"- fxlora {fxlora.__version__}" in section and "- PyTorch " in section


def test_a_model_without_a_name_gets_no_base_model_key(tmp_path):
    model = fxlora.transform(MLP(8), LoraConfig(target_modules="seq\\.(0|2)", modules_to_save=["seq.4"]))
    model.save_pretrained(tmp_path)
    text = (tmp_path / CARD).read_text()
    front, _ = _front_and_body(text)
    assert "base_model" not in front  # PEFT writes base_model: '' and a tag 'base_model:adapter:'
    assert "`models.MLP`" in text
    assert "regex `seq\\.(0\\|2)`" in text  # a | inside a table cell is escaped
    assert "| 2: `0`, `2` | `seq.4` |" in text


def test_saving_only_other_adapters_writes_the_card_at_the_top(tmp_path):
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]))
    model.add_adapter("other", LoraConfig(target_modules=["seq.2"], r=2))
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert sorted(os.listdir(tmp_path)) == [CARD, "other"]
    section = _section((tmp_path / CARD).read_text())
    assert "| `other` | `other` | 2 |" in section and "`default`" not in section


# ====================================================================== updating a card
def test_the_users_card_is_kept_and_the_section_replaced_on_each_save(tmp_path):
    (tmp_path / CARD).write_text(USER_CARD)
    base = MLP(8)
    for r in (2, 3):
        fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["seq.0"], r=r)).save_pretrained(tmp_path)
        text = (tmp_path / CARD).read_text()
        front, body = _front_and_body(text)
        assert body.startswith(USER_CARD)  # the user's text, untouched, then fxlora's section
        assert body.count(BEGIN) == 1 and body.count(END) == 1
        assert f"| `default` | `.` | {r} |" in body
    assert front.splitlines()[0] == "library_name: fxlora"


def test_keys_already_in_the_front_matter_are_kept():
    existing = "---\nlibrary_name: peft\nlicense: mit\ntags:\n- mine\n---\n# Card\n"
    facts = Version(0).card
    updated = card_text(existing, facts)
    front, body = _front_and_body(updated)
    assert front == "library_name: peft\nlicense: mit\ntags:\n- mine"  # nothing changed, nothing added
    assert body.startswith("# Card\n") and BEGIN in body


def test_a_card_peft_wrote_keeps_all_of_its_text(tmp_path):
    peft = pytest.importorskip("peft")
    base = MLP(8)
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["seq.0"])).save_pretrained(tmp_path)
    theirs = (tmp_path / CARD).read_text()
    fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["seq.0"])).save_pretrained(tmp_path)
    ours = (tmp_path / CARD).read_text()
    assert ours.startswith(theirs.rstrip("\n"))  # PEFT's front matter and text, then our section
    assert "library_name: peft" in ours and "- PEFT " in ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))  # the directory still loads in PEFT


def test_a_card_that_is_not_utf8_is_left_as_it_is(tmp_path):
    raw = b"# Carte\n\xe9t\xe9\n"  # latin-1
    (tmp_path / CARD).write_bytes(raw)
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]))
    with pytest.warns(UserWarning, match="not UTF-8"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / CARD).read_bytes() == raw
    assert sorted(os.listdir(tmp_path)) == [CARD, *PAIR]
    LoraModel.from_pretrained(MLP(8), tmp_path)  # the adapter itself was saved


_user_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200).filter(lambda t: "fxlora:" not in t)


_FACTS, _OTHER = Version(0, rank=4).card, Version(1, rank=4).card


@given(body=_user_text, front=st.sampled_from(["", "---\nlicense: mit\n---\n", "---\n---\n"]))
def test_updating_keeps_the_users_text_and_twice_is_once(body, front):
    facts, other = _FACTS, _OTHER
    once = card_text(front + body, facts)
    assert card_text(once, facts) == once
    again = card_text(once, other)  # another adapter: only the section changes
    assert again.replace(_section(again), _section(once)) == once
    if front.startswith("---\nlicense"):
        assert "license: mit" in _front_and_body(once)[0]
    if body.strip():
        assert body.rstrip("\n") in once


# ====================================================================== the card in the save's transaction
def test_a_failure_at_each_step_leaves_the_old_card_or_the_new_one(tmp_path, monkeypatch):
    a, b = Version(0, rank=4), Version(1, rank=4)
    old_card = card_text(USER_CARD, a.card)
    new_card = card_text(old_card, b.card)
    calls = []
    with monkeypatch.context() as patch:
        for name in FS_CALLS:
            patch.setattr(os, name, getattr(os, name))
        hook_fs_calls(lambda count, name: calls.append(name))
        b.save(_user_dir(tmp_path / "counted", a), card=True)
    outcomes = []
    for k in range(1, len(calls) + 1):
        directory = _user_dir(tmp_path / f"fail-{k:03d}", a)
        assert (directory / CARD).read_text() == old_card
        with monkeypatch.context() as patch:
            for name in FS_CALLS:
                patch.setattr(os, name, getattr(os, name))
            hook_fs_calls(lambda count, name, k=k: _raise_at(count, k))
            try:
                b.save(directory, card=True)
                outcomes.append("saved")
            except OSError as exc:
                assert exc.errno == errno.EIO
                outcomes.append("failed")
        assert sorted(os.listdir(directory)) == [CARD, *PAIR], (k, os.listdir(directory))
        saved = outcomes[-1] == "saved"
        assert (directory / CARD).read_text() == (new_card if saved else old_card), (k, outcomes[-1])
        assert (b if saved else a).is_in(read_adapter_dir(directory))
    print(f"{len(calls)} calls, outcomes: {outcomes}")
    assert outcomes.count("failed") >= 8 and outcomes[-1] == "saved", outcomes


def _user_dir(directory: Path, version: Version) -> Path:
    """`directory` with the user's card and `version` saved over it (with its card)."""
    directory.mkdir(parents=True)
    (directory / CARD).write_text(USER_CARD)
    version.save(directory, card=True)
    return directory


def _raise_at(count: int, k: int) -> None:
    if count == k:
        raise OSError(errno.EIO, "injected")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the writer process forks its trials (POSIX)")
def test_sigkill_at_each_step_leaves_a_whole_card_old_or_new(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fxlora.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(WRITER), "card-steps", str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    calls = int(done.stdout)
    a, b = Version(0), Version(1)
    old_card = card_text(USER_CARD, a.card)
    new_card = card_text(old_card, b.card)
    cards = [(tmp_path / f"step-{k:03d}" / CARD).read_text() for k in range(1, calls + 1)]
    switch = cards.index(new_card)
    assert 0 < switch < calls
    assert cards == [old_card] * switch + [new_card] * (calls - switch)  # never missing, never part of one
    for k in range(1, calls + 1):
        directory = tmp_path / f"step-{k:03d}"
        Version(2, rank=4).save(directory, card=True)  # the next save clears what the kill left
        assert sorted(os.listdir(directory)) == [CARD, *PAIR]
        assert USER_CARD in (directory / CARD).read_text()
