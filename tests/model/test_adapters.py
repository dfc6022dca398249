"""Several adapters on one model: add, activate (one or several), delete, disable, scale."""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import fxlora
from fxlora import LoraConfig
from models import MLP, ConvNet2d, EmbeddingModel, Mixed, copy_peft_adapter_weights

peft = pytest.importorskip("peft")


def two_adapter_pair(make, cfg_a, cfg_b, policy="auto"):
    torch.manual_seed(0)
    base = make()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg_a, init_lora_weights=False))
    pm.add_adapter("b", peft.LoraConfig(**cfg_b, init_lora_weights=False))
    fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**cfg_a, init_lora_weights=False), trace=policy)
    fm.add_adapter("b", LoraConfig(**cfg_b, init_lora_weights=False))
    copy_peft_adapter_weights(pm, fm)
    pm.eval(), fm.eval()
    return base, pm, fm


@pytest.mark.parametrize("policy", ["auto", "eager"])
@pytest.mark.parametrize(
    "make, cfg_a, cfg_b, make_x",
    [
        (Mixed, dict(target_modules=["stem", "blocks.1.0"]), dict(target_modules=["blocks.0.fc1", "head", "stem"], r=4, lora_alpha=16), lambda: torch.randn(4, 6)),
        (ConvNet2d, dict(target_modules=["conv1", "conv3"], modules_to_save=["head"]), dict(target_modules=["conv1", "conv2"], r=2, lora_alpha=3, modules_to_save=["head"]), lambda: torch.randn(2, 3, 9, 9)),
        (EmbeddingModel, dict(target_modules=["emb"]), dict(target_modules=["emb", "proj"], r=2), lambda: torch.randint(0, 50, (2, 5))),
    ],
    ids=["mixed-model", "conv-with-saved", "embedding"],
)
def test_switching_matches_peft(policy, make, cfg_a, cfg_b, make_x):
    base, pm, fm = two_adapter_pair(make, cfg_a, cfg_b, policy)
    x = make_x()
    with torch.no_grad():  # give the copies distinct weights
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p))
    copy_peft_adapter_weights(pm, fm)
    for active in ["default", "b", ["default", "b"], "default"]:
        if isinstance(active, list) and cfg_a.get("modules_to_save"):
            continue  # peft cannot activate two adapters that both save the same module
        pm.base_model.set_adapter(active)
        fm.set_adapter(active)
        torch.testing.assert_close(fm(x), pm(x), rtol=1e-5, atol=1e-6)
        assert fm.active_adapters == ([active] if isinstance(active, str) else active)


def test_new_adapter_is_inactive_and_frozen_until_set():
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]))
    x = torch.randn(2, 20)
    before = model(x)
    model.add_adapter("other", LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False))
    assert model.active_adapters == ["default"]
    assert torch.equal(model(x), before)
    flags = {n: p.requires_grad for n, p in model.named_parameters() if ".lora_" in n}
    assert all(v == (".default." in n) for n, v in flags.items())
    model.set_adapter("other")
    flags = {n: p.requires_grad for n, p in model.named_parameters() if ".lora_" in n}
    assert all(v == (".other." in n) for n, v in flags.items())
    assert not torch.equal(model(x), before)
    assert model.targeted_module_names == ["seq.0", "seq.2"]


def test_delete_adapter():
    model = fxlora.transform(Mixed(), LoraConfig(target_modules=["stem"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["blocks.1.0", "head"], init_lora_weights=False))
    model.set_adapter(["default", "b"])
    model.delete_adapter("default")
    assert model.active_adapters == ["b"] and list(model.peft_config) == ["b"]
    assert model.targeted_module_names == ["blocks.1.0", "head"]
    assert not any(".default." in k for k in model.state_dict())
    assert "default" not in model.adapter_state.published.index
    x = torch.randn(3, 6)
    reference = fxlora.transform(Mixed(), LoraConfig(target_modules=["blocks.1.0", "head"], init_lora_weights=False), adapter_name="b")
    reference.load_state_dict({k: v for k, v in model.state_dict().items()}, strict=False)
    reference.model.load_state_dict(model.model.state_dict(), strict=False)
    torch.testing.assert_close(model(x), reference(x))


def test_errors_change_nothing():
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]))
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="unknown adapter 'nope'; existing adapters: \\['default'\\]"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapter(["default", "nope"])
    with pytest.raises(ValueError, match=r"give an adapter name or a list of them; existing adapters: \['default'\]"):
        model.set_adapter(None)  # not "'NoneType' object is not iterable"
    with pytest.raises(TypeError, match="adapter names must be a str or a list of str, got int"):
        model.set_adapter(3)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", LoraConfig(target_modules=["seq.2"]))
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("default")
    with pytest.raises(ValueError, match="unknown adapter"):
        model.delete_adapter("nope")
    with pytest.raises(fxlora.NoTargetFoundError):
        model.add_adapter("b", LoraConfig(target_modules=["nothing"]))
    with pytest.raises(ValueError, match="finite"):
        model.set_adapter_scale("default", float("inf"))
    assert list(model.state_dict()) == keys and model.active_adapters == ["default"] and list(model.peft_config) == ["default"]


def test_adapters_may_differ_in_rank_alpha_and_targets():
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"], r=2))
    model.add_adapter("wide", LoraConfig(target_modules=["seq.0", "seq.2"], r=6, lora_alpha=3, rank_pattern={"seq.2": 1}))
    assert model.get_submodule("seq.0.lora_A.default").weight.shape == (2, 20)
    assert model.get_submodule("seq.0.lora_A.wide").weight.shape == (6, 20)
    assert model.get_submodule("seq.2.lora_A.wide").weight.shape == (1, 8)
    assert model.get_submodule("seq.2")._fxlora.adapters["wide"].scaling == 3.0


def test_scale_and_layer_toggles():
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False))
    model.eval()
    x = torch.randn(4, 20)
    with model.disable_adapter():
        base = model(x)
    full = model(x)
    model.set_adapter_scale("default", 0.0)
    assert torch.equal(model(x), base)
    model.set_adapter_scale("default", 1.0)
    assert torch.equal(model(x), full)
    assert model.get_adapter_scale("default") == 1.0
    model.disable_adapter_layers()
    assert torch.equal(model(x), base)
    model.enable_adapter_layers()
    assert torch.equal(model(x), full)
    # half scale on a single layer stack equals half the update
    lin = fxlora.transform(nn.Sequential(nn.Linear(4, 4)), LoraConfig(target_modules=["0"], init_lora_weights=False))
    z = torch.randn(2, 4)
    with lin.disable_adapter():
        b = lin(z)
    u = lin(z) - b
    lin.set_adapter_scale("default", 0.5)
    torch.testing.assert_close(lin(z) - b, 0.5 * u)


@pytest.mark.parametrize("training", [False, True])
def test_switching_walks_no_module_tree(monkeypatch, training):
    """A switch writes the gate tensors and, in train mode, the flags of the adapters switched on or
    off, from lists kept between switches: no walk over the model's modules, whatever its size."""
    stack = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    model = fxlora.transform(stack, LoraConfig(target_modules="all-linear"))
    model.add_adapter("other", LoraConfig(target_modules="all-linear", bias="lora_only"))
    model.train(training)
    model.set_adapter("other"), model.set_adapter("default")  # lists built once

    def no_walk(*args, **kwargs):
        raise AssertionError("a switch walked the module tree")

    for method in ("modules", "named_modules", "parameters", "named_parameters", "children"):
        monkeypatch.setattr(nn.Module, method, no_walk)
    model.set_adapter("other")
    model.set_adapter(["default", "other"])
    model.set_adapter("default")
    monkeypatch.undo()
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n and ".default." in n}


@st.composite
def switch_sequences(draw):
    biases = [draw(st.sampled_from(["none", "all", "lora_only"])) for _ in range(3)]
    saved = draw(st.booleans())
    steps = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("set"), st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True)),
                st.tuples(st.just("trainable"), st.sampled_from(["a", "b", "c"]), st.booleans()),
                st.tuples(st.just("mode"), st.booleans()),
                st.tuples(st.just("assign"), st.sampled_from(["a", "b", "c"])),
            ),
            min_size=1,
            max_size=8,
        )
    )
    return biases, saved, steps


@given(setup=switch_sequences())
def test_trainable_flags_equal_a_full_recomputation_after_any_switches(setup):
    """However adapters are switched, made (un)trainable, or have weights replaced in their modules
    (``load_state_dict(assign=True)``), in train mode exactly the active trainable adapters' weights
    and copies, and the biases their ``bias`` settings name, require grad."""
    from fxlora.core.trainable import set_trainable

    biases, saved, steps = setup
    torch.manual_seed(0)
    model = fxlora.transform(Mixed(), LoraConfig(target_modules=["stem", "blocks.1.0"], bias=biases[0]), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=["stem", "blocks.0.fc1"], bias=biases[1], modules_to_save=["head"] if saved else None))
    model.add_adapter("c", LoraConfig(target_modules=["blocks.0.fc2"], bias=biases[2]))
    model.train()
    for step in steps:
        if step[0] == "set":
            model.set_adapter(step[1])
        elif step[0] == "trainable":
            model.set_trainable_adapter(step[1], step[2])
        elif step[0] == "mode":
            model.train(step[1])
        else:
            weights = {n: torch.randn_like(p) for n, p in model.named_parameters() if f".{step[1]}." in n}
            model.load_state_dict(weights, strict=False, assign=True)
    model.train()
    got = {n: p.requires_grad for n, p in model.named_parameters()}
    wanted = {a: model.peft_config[a].bias for a in model.active_adapters if model.adapter_state.trainable[a]}
    set_trainable(model.model, wanted)  # the rule, recomputed from scratch
    assert got == {n: p.requires_grad for n, p in model.named_parameters()}


def test_trainable_flags_follow_active_adapters_after_eval_switches():
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]))
    model.add_adapter("b", LoraConfig(target_modules=["seq.2"]))
    model.eval()
    model.set_adapter("b")
    assert model.get_nb_trainable_parameters()[0] == 8 * (8 + 8)  # reports see the switch
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"seq.2.lora_A.b.weight", "seq.2.lora_B.b.weight"}


def test_lora_and_saved_copies_never_share_a_module():
    model = fxlora.transform(ConvNet2d(), LoraConfig(target_modules=["conv1", "conv3"]))
    with pytest.raises(ValueError, match="carries another adapter's LoRA"):
        model.add_adapter("b", LoraConfig(target_modules=["conv2"], modules_to_save=["conv3"]))
    assert model.targeted_module_names == ["conv1", "conv3"] and list(model.peft_config) == ["default"]
    saved = fxlora.transform(ConvNet2d(), LoraConfig(target_modules=["conv1"], modules_to_save=["conv3"]))
    with pytest.raises(ValueError, match="trains 'conv3' in full"):
        saved.add_adapter("b", LoraConfig(target_modules=["conv3"]))
    saved.add_adapter("c", LoraConfig(target_modules=["conv2"], modules_to_save=["conv3"]))  # two copies are fine
    assert saved.modules_to_save_names == ["conv3"]
