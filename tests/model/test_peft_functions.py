"""PEFT's module-level functions against peft's own on the same model: the same keys and tensors
from get_peft_model_state_dict, peft's outputs after setting peft's dict into fxlora, and
inject_adapter_in_model returning the model itself, adapted in place."""

import copy

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.errors import CheckpointError, MergeError
from models import MLP

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(self.lin(h)))


CONFIGS = {
    "mlp": (lambda: MLP(16), dict(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]), lambda: torch.randn(3, 20)),
    "kinds": (Net, dict(target_modules=["emb", "conv", "lin"], bias="all"), lambda: torch.randint(0, 10, (2, 5))),
    "lora_bias": (lambda: MLP(16), dict(target_modules=["seq.0"], lora_bias=True), lambda: torch.randn(3, 20)),
    "rank_pattern": (lambda: MLP(16), dict(target_modules=["seq.0", "seq.2"], rank_pattern={"seq.2": 2}, bias="lora_only"), lambda: torch.randn(3, 20)),
}


def both(name, **extra):
    build, config, inputs = CONFIGS[name]
    torch.manual_seed(0)
    base = build()
    config = {**config, "init_lora_weights": False, **extra}
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    torch.manual_seed(2)
    fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**config))
    return fm, pm, inputs()


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dicts_have_peft_keys_and_setting_peft_dict_gives_peft_outputs(name):
    fm, pm, x = both(name)
    perturb(pm)
    theirs = peft.get_peft_model_state_dict(pm)
    assert sorted(fxlora.get_peft_model_state_dict(fm)) == sorted(theirs)
    assert fxlora.set_peft_model_state_dict(fm, theirs) == ([], [])
    ours = fxlora.get_peft_model_state_dict(fm)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    fm.eval(), pm.eval()
    torch.testing.assert_close(fm(x), pm(x), rtol=0, atol=0)
    # and back: fxlora's dict into peft gives fxlora's outputs
    perturb(fm)
    peft.set_peft_model_state_dict(pm, fxlora.get_peft_model_state_dict(fm))
    torch.testing.assert_close(fm(x), pm(x), rtol=0, atol=0)


def test_a_second_adapter_by_name_and_keys_without_the_prefix():
    fm, pm, x = both("mlp")
    pm.add_adapter("other", peft.LoraConfig(target_modules=["seq.0"], r=2, init_lora_weights=False))
    fm.add_adapter("other", LoraConfig(target_modules=["seq.0"], r=2, init_lora_weights=False))
    theirs = peft.get_peft_model_state_dict(pm, adapter_name="other")
    assert sorted(fxlora.get_peft_model_state_dict(fm, adapter_name="other")) == sorted(theirs)
    bare = {k.removeprefix("base_model.model."): v for k, v in theirs.items()}
    fxlora.set_peft_model_state_dict(fm, bare, adapter_name="other")
    fm.set_adapter("other"), pm.set_adapter("other")
    torch.testing.assert_close(fm(x), pm(x), rtol=0, atol=0)


def test_set_reports_missing_and_unexpected_keys_and_refuses_bad_shapes_changing_nothing():
    fm, pm, x = both("mlp")
    theirs = dict(peft.get_peft_model_state_dict(pm))
    dropped = "base_model.model.seq.4.bias"
    del theirs[dropped]
    theirs["base_model.model.seq.1.weight"] = torch.zeros(1)
    result = fxlora.set_peft_model_state_dict(fm, theirs)
    assert result.missing_keys == [dropped] and result.unexpected_keys == ["base_model.model.seq.1.weight"]
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    bad = {"base_model.model.seq.0.lora_A.weight": torch.zeros(3, 20), "base_model.model.seq.2.lora_A.weight": torch.zeros(8, 16)}
    with pytest.raises(CheckpointError, match=r"seq\.0\.lora_A\.weight.*\(3, 20\).*\(8, 20\)"):
        fxlora.set_peft_model_state_dict(fm, bad)
    assert all(torch.equal(v, fm.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        fxlora.set_peft_model_state_dict(fm, theirs, ignore_mismatched_sizes=True)


def test_setting_a_merged_adapter_is_refused():
    fm, pm, x = both("mlp")
    fm.merge_adapter()
    with pytest.raises(MergeError, match="unmerge"):
        fxlora.set_peft_model_state_dict(fm, peft.get_peft_model_state_dict(pm))


def test_inject_adapter_in_model_returns_the_model_adapted_in_place_as_peft():
    torch.manual_seed(0)
    base = MLP(16)
    config = dict(target_modules=["seq.0", "seq.2"], init_lora_weights=False)
    ours = copy.deepcopy(base)
    assert fxlora.inject_adapter_in_model(LoraConfig(**config), ours) is ours
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), copy.deepcopy(base))
    assert sorted(fxlora.get_peft_model_state_dict(ours)) == sorted(peft.get_peft_model_state_dict(theirs))
    fxlora.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    x = torch.randn(4, 20)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    # a peft.LoraConfig is taken too, with the same checks
    other = fxlora.inject_adapter_in_model(peft.LoraConfig(**config, task_type="CAUSAL_LM"), copy.deepcopy(base))
    assert sorted(fxlora.get_peft_model_state_dict(other)) == sorted(peft.get_peft_model_state_dict(theirs))
    with pytest.raises(fxlora.UnsupportedFieldError, match="use_qalora"):
        fxlora.inject_adapter_in_model(peft.LoraConfig(**config, use_qalora=True), copy.deepcopy(base))
    with pytest.raises(ValueError, match="no fxlora adapter"):
        fxlora.get_peft_model_state_dict(copy.deepcopy(base))


def test_a_compiled_model_gives_the_same_state_dict():
    fm, pm, x = both("mlp")
    compiled = torch.compile(fm)
    assert sorted(fxlora.get_peft_model_state_dict(compiled)) == sorted(fxlora.get_peft_model_state_dict(fm))
