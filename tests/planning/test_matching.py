import pytest
import torch.nn as nn
from hypothesis import given, strategies as st

from fxlora import LoraConfig, NoTargetFoundError, UnsupportedTargetError
from fxlora.planning.matching import closest_names, matches_name_list, select_modules
from models import MLP, EmbeddingModel, WithMHA


def names_model():
    m = nn.Module()
    m.seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    m.seq00 = nn.Linear(2, 2)
    m.xseq = nn.Sequential(nn.Linear(2, 2))
    m.inner = nn.Module()
    m.inner.seq = nn.Sequential(nn.Linear(2, 2))
    m.head = nn.Linear(2, 2)
    m.subhead = nn.Linear(2, 2)
    return m


def test_list_entries_match_exact_or_dot_suffix():
    m = names_model()
    sel = select_modules(m, LoraConfig(target_modules=["seq.0"]))
    assert sel.targets == ("seq.0", "inner.seq.0")  # not seq00 / xseq.0


def test_str_is_full_regex():
    m = names_model()
    assert select_modules(m, LoraConfig(target_modules="head")).targets == ("head",)
    assert select_modules(m, LoraConfig(target_modules=r".*head")).targets == ("head", "subhead")
    assert select_modules(m, LoraConfig(target_modules=r"seq\.[02]")).targets == ("seq.0", "seq.2")


def test_all_linear_any_case():
    m = names_model()
    sel = select_modules(m, LoraConfig(target_modules="All-Linear"))
    assert set(sel.targets) == {n for n, x in m.named_modules() if isinstance(x, nn.Linear)}


def test_exclude_modules_first():
    m = names_model()
    sel = select_modules(m, LoraConfig(target_modules="all-linear", exclude_modules=["seq.0", "head"]))
    assert "seq.0" not in sel.targets and "inner.seq.0" not in sel.targets and "head" not in sel.targets
    assert "subhead" in sel.targets
    sel = select_modules(m, LoraConfig(target_modules="all-linear", exclude_modules=r".*head"))
    assert "subhead" not in sel.targets and "head" not in sel.targets


def test_modules_to_save_dot_boundary_and_never_targets():
    m = names_model()
    sel = select_modules(m, LoraConfig(target_modules="all-linear", modules_to_save=["head", "seq"]))
    assert sel.modules_to_save == ("seq", "inner.seq", "head")  # not subhead (PEFT's endswith would pick it)
    assert not any(t.startswith("seq.") or t.startswith("inner.seq") or t == "head" for t in sel.targets)
    assert "subhead" in sel.targets


def test_modules_to_save_keeps_outermost():
    m = names_model()
    sel = select_modules(m, LoraConfig(target_modules=["head"], modules_to_save=["seq", "seq.0"]))
    assert sel.modules_to_save == ("seq", "inner.seq")


def layered():
    m = nn.Module()
    m.model = nn.Module()
    m.model.layers = nn.ModuleList([nn.Module() for _ in range(3)])
    for layer in m.model.layers:
        layer.q = nn.Linear(2, 2)
        layer.v = nn.Linear(2, 2)
        layer.experts = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
    m.h = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
    return m


def test_layers_to_transform_and_pattern():
    m = layered()
    sel = select_modules(m, LoraConfig(target_modules=["q", "v"], layers_to_transform=[0, 2]))
    assert sel.targets == ("model.layers.0.q", "model.layers.0.v", "model.layers.2.q", "model.layers.2.v")
    sel = select_modules(m, LoraConfig(target_modules=["q"], layers_to_transform=1, layers_pattern="layers"))
    assert sel.targets == ("model.layers.1.q",)
    # the first numbered segment is the layer, not the expert index
    sel = select_modules(m, LoraConfig(target_modules=["experts.1"], layers_to_transform=[2]))
    assert sel.targets == ("model.layers.2.experts.1",)


def test_exact_name_does_not_bypass_layers_filter():
    m = layered()
    with pytest.raises(NoTargetFoundError):
        select_modules(m, LoraConfig(target_modules=["model.layers.0.q"], layers_to_transform=[1]))


def test_no_match_error_names_targets_and_closest():
    with pytest.raises(NoTargetFoundError) as info:
        select_modules(MLP(8), LoraConfig(target_modules=["seq.7", "sequ.2"]))
    msg = str(info.value)
    assert "['seq.7', 'sequ.2']" in msg and "'seq.2'" in msg and "Adaptable modules: seq.0 (Linear)" in msg


def test_no_match_error_for_regex():
    with pytest.raises(NoTargetFoundError) as info:
        select_modules(MLP(8), LoraConfig(target_modules=r"seq\.9"))
    assert "re.fullmatch" in str(info.value)


def test_modules_to_save_without_match_is_an_error():
    with pytest.raises(NoTargetFoundError) as info:
        select_modules(MLP(8), LoraConfig(target_modules=["seq.0"], modules_to_save=["haed"]))
    assert "modules_to_save" in str(info.value) and "'haed'" in str(info.value)


def test_unsupported_type_error_names_module_type_and_supported():
    with pytest.raises(UnsupportedTargetError) as info:
        select_modules(MLP(8), LoraConfig(target_modules=["seq.1", "seq.0"]))
    msg = str(info.value)
    assert "'seq.1'" in msg and "ReLU" in msg and "nn.Linear" in msg and "nn.Conv2d" in msg and "nn.Embedding" in msg


def test_unsupported_container_suggests_layers_inside():
    with pytest.raises(UnsupportedTargetError) as info:
        select_modules(MLP(8), LoraConfig(target_modules=["seq"]))
    assert "seq.0 (Linear)" in str(info.value)


def test_mha_out_proj_is_refused():
    with pytest.raises(UnsupportedTargetError, match="out_proj"):
        select_modules(WithMHA(), LoraConfig(target_modules="all-linear"))
    sel = select_modules(WithMHA(), LoraConfig(target_modules="all-linear", exclude_modules=["out_proj"]))
    assert sel.targets == ("fc",)


def test_default_targets_need_transformers_model():
    with pytest.raises(ValueError, match="target_modules"):
        select_modules(EmbeddingModel(), LoraConfig())


def test_closest_names():
    names = ["", "encoder.layer.0.attention.query", "encoder.layer.0.attention.value", "pooler.dense"]
    assert "encoder.layer.0.attention.query" in closest_names(["querry"], names)


# ---------------------------------------------------------------- differential vs peft
peft_utils = pytest.importorskip("peft.tuners.tuners_utils")

segment = st.sampled_from(["a", "b", "q", "v", "seq", "0", "1", "10", "mlp", "fc1"])
name_st = st.lists(segment, min_size=1, max_size=4).map(".".join)


@given(names=st.lists(name_st, min_size=1, max_size=12, unique=True), targets=st.lists(segment | name_st, min_size=1, max_size=3))
def test_list_rule_equals_peft(names, targets):
    cfg = LoraConfig(target_modules=targets)

    class C:  # peft's matcher only reads these attributes
        target_modules = set(targets)
        exclude_modules = None
        modules_to_save = None
        target_parameters = None
        layers_to_transform = None
        layers_pattern = None

    for key in names:
        assert matches_name_list(cfg.target_modules, key) == bool(peft_utils.check_target_module_exists(C, key))


@given(names=st.lists(name_st, min_size=1, max_size=12, unique=True), layers=st.lists(st.integers(0, 11), min_size=1, max_size=3))
def test_layers_filter_equals_peft_for_suffix_entries(names, layers):
    from fxlora.planning.matching import _in_layers

    cfg = LoraConfig(target_modules=["q"], layers_to_transform=layers)

    class C:
        target_modules = {"q"}
        exclude_modules = None
        modules_to_save = None
        target_parameters = None
        layers_to_transform = layers
        layers_pattern = None

    for key in names:
        if key.endswith(".q"):
            ours = _in_layers(cfg, key)
            assert ours == bool(peft_utils.check_target_module_exists(C, key))


def test_a_target_that_is_also_in_modules_to_save_is_named_with_the_rule():
    with pytest.raises(NoTargetFoundError) as info:
        select_modules(MLP(8), LoraConfig(target_modules=["seq.4"], modules_to_save=["seq.4"]))
    msg = str(info.value)
    assert "matched no module" not in msg
    assert "'seq.4' also in modules_to_save" in msg and "never gets LoRA" in msg
    assert "Adaptable modules: seq.0 (Linear), seq.2 (Linear)." in msg  # seq.4 is the saved one


def test_targets_all_excluded_are_named():
    with pytest.raises(NoTargetFoundError, match=r"matched only modules set aside: 'seq.0', 'seq.2' in exclude_modules"):
        select_modules(MLP(8), LoraConfig(target_modules=["seq.0", "seq.2"], exclude_modules=["seq.0", "seq.2"]))


def test_no_default_targets_lists_the_real_linear_layers():
    with pytest.raises(ValueError) as info:
        select_modules(MLP(8), LoraConfig())
    msg = str(info.value)
    assert "Likely candidates: ['seq.0', 'seq.2', 'seq.4'] (or target_modules='all-linear')" in msg
    assert "[]" not in msg
    assert select_modules(MLP(8), LoraConfig(target_modules=["seq.0", "seq.2", "seq.4"])).targets == ("seq.0", "seq.2", "seq.4")
    with pytest.raises(ValueError, match=r"Likely candidates: \(none: the model has no nn.Linear"):
        select_modules(nn.Sequential(nn.Conv2d(1, 1, 1)), LoraConfig())


def test_mha_is_a_target_and_its_out_proj_alone_is_refused():
    assert select_modules(WithMHA(), LoraConfig(target_modules=["attn"])).targets == ("attn",)
    with pytest.raises(UnsupportedTargetError, match="module 'attn.out_proj' cannot carry LoRA: it is the out_proj") as info:
        select_modules(WithMHA(), LoraConfig(target_modules=["attn.out_proj"]))
    assert "Target the attention itself ('attn'" in str(info.value)
    with pytest.raises(NoTargetFoundError) as info:
        select_modules(WithMHA(), LoraConfig(target_modules=["nope"]))
    adaptable = str(info.value).split("Adaptable modules:")[1]
    assert "out_proj" not in adaptable and "attn (MultiheadAttention)" in adaptable  # the attention is offered, not its out_proj
