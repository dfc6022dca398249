"""The custom-model workflow end to end: transform, inspect, train, and the invariants around it."""

import contextlib
import copy
import io

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from models import MLP, Branchy, ConvNet2d, EmbeddingModel, Mixed, OptionalArgs, Stateful


def seed_mlp():
    torch.manual_seed(0)
    return MLP()


def test_seed_figures_and_names(capsys):
    model = fxlora.transform(seed_mlp(), LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]))
    model.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 52,162 || all params: 4,100,164 || trainable%: 1.2722\n"
    assert model.get_nb_trainable_parameters() == (52_162, 4_100_164)
    assert model.targeted_module_names == ["seq.0", "seq.2"]
    assert model.modules_to_save_names == ["seq.4"]
    assert isinstance(model, fxlora.LoraModel)


def test_identity_at_init_and_base_outputs_when_disabled():
    base = seed_mlp()
    x = torch.randn(6, 20)
    ref = base(x)
    model = fxlora.transform(base, LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]))
    assert torch.equal(model(x), ref)
    with torch.no_grad():
        model.get_submodule("seq.0.lora_B.default").weight.normal_()
        model.get_submodule("seq.4.modules_to_save.default").weight.normal_()
    assert not torch.allclose(model(x), ref)
    with model.disable_adapter():
        assert torch.equal(model(x), ref)
    assert not torch.allclose(model(x), ref)


def test_disable_adapter_restores_state_on_error():
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"], init_lora_weights=False))
    x = torch.randn(2, 20)
    before = model(x)
    with pytest.raises(RuntimeError):
        with model.disable_adapter():
            raise RuntimeError("boom")
    assert torch.equal(model(x), before)


def test_module_tree_types_names_and_base_keys_kept():
    for policy in ("auto", "eager"):
        original = Mixed()
        names_types = [(n, type(m)) for n, m in original.named_modules()]
        base_keys = list(original.state_dict())
        model = fxlora.transform(original, LoraConfig(target_modules="all-linear", modules_to_save=["head"]), trace=policy)
        now = dict(model.named_modules())
        for name, cls in names_types:
            if name:
                assert type(now[name]) is cls, (policy, name)
        keys = list(model.state_dict())
        assert [k for k in keys if k in base_keys] == base_keys
        extra = [k for k in keys if k not in base_keys]
        assert all(".lora_A.default." in k or ".lora_B.default." in k or ".modules_to_save.default." in k for k in extra)
        assert model.model is original and model.get_base_model() is original


def test_lora_naming_under_target():
    model = fxlora.transform(EmbeddingModel(), LoraConfig(target_modules=["emb", "proj"], r=4, lora_bias=False))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["emb.lora_embedding_A.default"] == (4, 50)
    assert shapes["emb.lora_embedding_B.default"] == (16, 4)
    assert shapes["proj.lora_A.default.weight"] == (4, 16)
    assert shapes["proj.lora_B.default.weight"] == (16, 4)
    conv = fxlora.transform(ConvNet2d(groups=2), LoraConfig(target_modules=["conv1", "conv2"], r=4))
    shapes = {k: tuple(v.shape) for k, v in conv.state_dict().items()}
    assert shapes["conv1.lora_A.default.weight"] == (4, 3, 3, 3)
    assert shapes["conv1.lora_B.default.weight"] == (8, 4, 1, 1)
    assert shapes["conv2.lora_B.default.weight"] == (8, 2, 1, 1)  # B carries the base's groups


def test_attributes_and_methods_reachable():
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]))
    assert model.describe() == "MLP with 6 layers"
    assert model.seq is model.model.seq
    with pytest.raises(AttributeError):
        model.does_not_exist


def test_only_adapter_copies_and_biases_train():
    for bias, expect_bias in (("none", set()), ("all", {"seq.0.bias", "seq.2.bias"}), ("lora_only", {"seq.0.bias"})):
        model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"], modules_to_save=["seq.4"], bias=bias))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        lora = {"seq.0.lora_A.default.weight", "seq.0.lora_B.default.weight"}
        copies = {"seq.4.modules_to_save.default.weight", "seq.4.modules_to_save.default.bias"}
        assert trainable == lora | copies | expect_bias, bias


def test_training_moves_only_trainable_weights():
    base = MLP(16)
    model = fxlora.transform(base, LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], lora_dropout=0.1))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    moving = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all params passed, as users do
    x, y = torch.randn(32, 20), torch.randint(0, 2, (32,))
    model.train()
    for _ in range(3):
        loss = nn.functional.nll_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in moving), n
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(not torch.equal(dict(model.named_parameters())[n], v) for n, v in moving.items() if "lora_A" not in n)


def test_dropout_follows_train_and_eval():
    model = fxlora.transform(MLP(16), LoraConfig(target_modules=["seq.0"], lora_dropout=0.5, init_lora_weights=False))
    x = torch.randn(8, 20)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    assert not model.seq.training and not model.model.training


def test_deepcopy_save_load_to_dtype_and_state_dict_round_trip():
    model = fxlora.transform(Mixed(), LoraConfig(target_modules="all-linear", modules_to_save=["head"], init_lora_weights=False))
    x = torch.randn(4, 6)
    ref = model(x)
    clone = copy.deepcopy(model)
    assert torch.equal(clone(x), ref)
    assert clone.target_paths == model.target_paths
    assert clone.model is not model.model and clone.seq if hasattr(clone, "seq") else True

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), ref)
    assert loaded.targeted_module_names == model.targeted_module_names

    double = copy.deepcopy(model).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in double.parameters())
    assert torch.allclose(double(x.double()), ref.double(), atol=1e-6)

    sd = model.state_dict()
    fresh = fxlora.transform(Mixed(), LoraConfig(target_modules="all-linear", modules_to_save=["head"], init_lora_weights=False))
    assert not torch.allclose(fresh(x), ref)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), ref)


def test_explain_is_a_dry_run_matching_transform():
    model = Mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = dict(model.named_modules())
    config = LoraConfig(target_modules="all-linear", modules_to_save=["head"])
    report = fxlora.explain(model, config)
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert dict(model.named_modules()) == modules_before
    assert "forward" not in model.__dict__
    lora = fxlora.transform(model, config)
    assert report.targets == lora.targeted_module_names
    assert (report.trainable_params, report.all_params) == lora.get_nb_trainable_parameters()
    paths = lora.target_paths
    assert {n: ("graph" if n in report.graph_targets else "eager") for n in report.targets} == paths
    text = str(report)
    assert "blocks.0.fc1" in text and "eager" in text and "graph" in text and "trainable params:" in text


def test_eager_path_for_untraceable_children_and_graph_for_the_rest():
    model = fxlora.transform(Mixed(), LoraConfig(target_modules="all-linear"))
    paths = model.target_paths
    assert paths["blocks.0.fc1"] == "eager" and paths["blocks.0.fc2"] == "eager"
    assert paths["blocks.1.0"] == "graph" and paths["stem"] == "eager" and paths["head"] == "eager"
    assert set(model.graph_roots) == {"blocks.1"}
    report = model.reports["default"]
    row = next(r for r in report.rows if r.name == "blocks.0.fc1")
    assert "does not trace" in row.reason


def test_branchy_parent_children_in_graph():
    base = Branchy()
    x = torch.randn(3, 8)
    ref = base(x)
    model = fxlora.transform(base, LoraConfig(target_modules="all-linear"))
    assert model.target_paths == {"block_a.0": "graph", "block_a.2": "graph", "block_b.0": "graph", "out": "eager"}
    assert torch.equal(model(x), ref)


def test_optional_arguments_each_call_pattern_is_exact():
    torch.manual_seed(1)
    base = OptionalArgs()
    eager = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["fc", "gate"], init_lora_weights=False), trace="eager")
    graph = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["fc", "gate"], init_lora_weights=False))
    graph.load_state_dict(eager.state_dict())
    assert graph.target_paths == {"fc": "graph", "gate": "graph"}
    graph.eval(), eager.eval()
    x, mask = torch.randn(2, 8), (torch.rand(2, 8) > 0.5).float()
    calls = [((x,), {}), ((x, mask), {}), ((x,), {"mask": mask}), ((x,), {"scale": 2.0}), ((x, None, 3.0, False), {}), ((x,), {"use_gate": False, "mask": mask})]
    for args, kwargs in calls:
        assert torch.equal(graph(*args, **kwargs), eager(*args, **kwargs)), (args, kwargs)
    graph.train(), eager.train()
    torch.manual_seed(3)
    a = graph(x, mask)
    torch.manual_seed(3)
    b = eager(x, mask)
    assert torch.equal(a, b)


def test_stateful_forward_is_not_captured():
    model = fxlora.transform(Stateful(), LoraConfig(target_modules=["fc"]))
    assert model.target_paths == {"fc": "eager"}
    model(torch.randn(1, 4))
    model(torch.randn(1, 4))
    assert model.calls == 2


def test_trace_policies():
    with pytest.raises(Exception, match="trace='graph'"):
        fxlora.transform(Mixed(), LoraConfig(target_modules="all-linear"), trace="graph")
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]), trace="graph")
    assert model.target_paths == {"seq.0": "graph"}
    with pytest.raises(ValueError, match="trace must be"):
        fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]), trace="sometimes")


def test_repr_marks_adapted_layers():
    model = fxlora.transform(Mixed(), LoraConfig(target_modules=["stem", "blocks.1.0"], modules_to_save=["head"]))
    text = repr(model)
    assert text.startswith("LoraModel(adapters=['default']")
    assert "(stem): Linear(in_features=6, out_features=8, bias=True)  [LoRA default: r=8 alpha=8; eager]" in text
    assert "[LoRA default: r=8 alpha=8; graph]" in text
    assert "[modules_to_save: trainable copy for default]" in text
    assert "lora_A" not in text


def test_half_precision_base_gets_float32_adapters():
    base = MLP(8).to(torch.bfloat16)
    model = fxlora.transform(base, LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False))
    assert model.get_submodule("seq.0.lora_A.default").weight.dtype == torch.float32
    out = model(torch.randn(2, 20, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------- errors leave the model untouched
def snapshot(model):
    return (
        [(n, type(m), id(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: dict(m.__dict__).keys() for n, m in model.named_modules()},
    )


@pytest.mark.parametrize(
    "config, exc",
    [
        (LoraConfig(target_modules=["nope"]), fxlora.NoTargetFoundError),
        (LoraConfig(target_modules=["seq.1"]), fxlora.UnsupportedTargetError),
        (LoraConfig(target_modules=["seq.0"], modules_to_save=["nope"]), fxlora.NoTargetFoundError),
        (LoraConfig(target_modules=["seq.0"], layers_to_transform=[3]), fxlora.NoTargetFoundError),
    ],
)
def test_errors_leave_model_exactly_as_it_was(config, exc):
    model = MLP(8)
    model.seq[0].weight.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(exc):
        fxlora.transform(model, config)
    after = snapshot(model)
    assert before[0] == after[0] and before[2] == after[2] and before[3] == after[3]
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])


def test_failure_during_apply_rolls_back(monkeypatch):
    import fxlora.core.trainable as trainable

    model = MLP(8)
    before = snapshot(model)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(trainable, "set_trainable", broken)  # the last step of adding an adapter
    with pytest.raises(RuntimeError, match="disk full"):
        fxlora.transform(model, LoraConfig(target_modules=["seq.0"], modules_to_save=["seq.4"]))
    after = snapshot(model)
    assert before[0] == after[0] and before[2] == after[2] and before[3] == after[3]


def test_conv_rank_not_divisible_by_groups():
    model = ConvNet2d(groups=4)
    before = snapshot(model)
    with pytest.raises(ValueError, match="groups=4"):
        fxlora.transform(model, LoraConfig(target_modules=["conv2"], r=6))
    assert snapshot(model)[0] == before[0]


def test_transform_twice_is_refused():
    model = fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]))
    with pytest.raises(TypeError, match="add_adapter"):
        fxlora.transform(model, LoraConfig(target_modules=["seq.2"]))
    with pytest.raises(ValueError, match="already carries"):
        fxlora.transform(model.model, LoraConfig(target_modules=["seq.2"]))


def test_bad_adapter_names():
    for name in ["", "a.b", "__base__", "forward", 3]:
        with pytest.raises(ValueError):
            fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"]), adapter_name=name)


def test_config_is_copied_not_mutated():
    config = LoraConfig(target_modules=["seq.0"])
    model = fxlora.transform(MLP(8), config)
    assert model.peft_config["default"] is not config
    assert model.peft_config["default"] == config


@pytest.mark.parametrize("args", [("config", "default"), ("config",)], ids=["peft-style", "two-args"])
def test_building_lora_model_directly_points_to_transform(args):
    base = MLP(8)
    config = LoraConfig(target_modules=["seq.0"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(TypeError, match=r"use fxlora.transform\(model, config, adapter_name\)"):
        fxlora.LoraModel(base, *[config if a == "config" else a for a in args])
    assert base.state_dict().keys() == before.keys() and all(p.requires_grad for p in base.parameters())
    assert fxlora.LoraModel.adapt(base, config).targeted_module_names == ["seq.0"]
