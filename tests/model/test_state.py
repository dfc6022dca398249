"""`fxlora.model.state.AdapterState`: one owner of adapter state; gates derived, caches bounded."""

import copy
import dataclasses
import io

import pytest
import torch

import fxlora
from fxlora import LoraConfig
from fxlora.runtime import forwards
import importlib

insert_lora_module = importlib.import_module("fxlora.passes.insert_lora")
from models import MLP, Mixed, row_by_row


def two_adapters(policy="auto", make=lambda: MLP(16)):
    torch.manual_seed(0)
    model = fxlora.transform(make(), LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False), trace=policy)
    model.add_adapter("b", LoraConfig(target_modules=["seq.0"], r=4, lora_alpha=3, init_lora_weights=False))
    return model.eval()


def graph_forwards(model):
    return forwards.graph_forwards(model.model)


def test_pass_options_survive_adding_and_deleting_adapters(cond_kept):
    model = two_adapters()
    model.set_optimizations(fold_scaling=False, guard_idle=True)
    model.add_adapter("c", LoraConfig(target_modules=["seq.2"], init_lora_weights=False))
    assert model.adapter_state.options.fold_scaling is False and model.adapter_state.options.guard_idle is True
    assert "add_scaled_linear" not in model.graph_code(training=True)
    assert "_fxlora_guard_idle" in model.graph_code(training=False)
    model.delete_adapter("c")
    assert "add_scaled_linear" not in model.graph_code(training=True)
    assert "_fxlora_guard_idle" in model.graph_code(training=False)
    model.set_optimizations(fold_scaling=True)
    assert "add_scaled_linear" in model.graph_code(training=True)


def test_set_optimizations_failing_half_way_leaves_the_previous_code(monkeypatch):
    model = two_adapters()
    before = model.graph_code(training=True)
    (fwd,) = graph_forwards(model)
    original, calls = fwd._build, []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # the second pattern of the rebuild
            raise RuntimeError("out of memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(fwd, "_build", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.set_optimizations(fold_scaling=False)
    monkeypatch.undo()
    assert model.adapter_state.options.fold_scaling is True
    assert model.graph_code(training=True) == before and "add_scaled_linear" in before
    x = torch.randn(2, 20)
    state = model.adapter_state
    with torch.no_grad(), state.calling(dataclasses.replace(state.published, eager=None)):
        model(x)  # the gated code of every pattern is there again


def test_set_optimizations_refuses_unknown_switches_and_changes_nothing():
    model = two_adapters()
    before = model.adapter_state.options
    with pytest.raises(ValueError, match="unknown optimisation"):
        model.set_optimizations(fold_scaling=False, fold_everything=True)
    assert model.adapter_state.options == before


@pytest.mark.parametrize("policy", ["auto", "eager"])
def test_many_distinct_scales_build_no_new_code(policy, monkeypatch):
    model = two_adapters(policy)
    x = torch.randn(3, 20)
    model(x)
    builds = []
    for fwd in graph_forwards(model):
        original = fwd._build
        monkeypatch.setattr(fwd, "_build", lambda *a, _o=original, **k: builds.append(a) or _o(*a, **k))
    templates = len(insert_lora_module._TEMPLATES)
    with torch.no_grad():
        for i in range(300):
            scale = 0.5 + i / 1000
            model.set_adapter_scale("default", scale)
            out = model(x)
    assert builds == []  # one eager code per set of live adapters, whatever the scales
    model.set_adapter_scale("default", 1.0)
    with torch.no_grad():
        unit = model(x)
        model.set_adapter_scale("default", 0.799)
        scaled = model(x)
        with model.disable_adapter():
            base = model(x)
        model.set_adapter_scale("default", 1.0)
    # the run-time scale is read per call, not baked into code built for another value
    assert not torch.equal(scaled, unit) and not torch.equal(scaled, base)
    assert len(insert_lora_module._TEMPLATES) == templates
    assert not torch.equal(out, unit)


def test_eager_codes_per_root_are_bounded():
    model = two_adapters()
    for i in range(3):
        model.add_adapter(f"x{i}", LoraConfig(target_modules=["seq.2"], init_lora_weights=False))
    x = torch.randn(2, 20)
    names = list(model.peft_config)
    import itertools

    subsets = [list(c) for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]
    with torch.no_grad():
        for subset in subsets:
            model.set_adapter(subset)
            model(x)
    from fxlora.runtime.code import MAX_EAGER_CODES

    (fwd,) = graph_forwards(model)
    assert len(subsets) > MAX_EAGER_CODES
    assert len(fwd._eager) <= MAX_EAGER_CODES


@pytest.mark.parametrize("policy", ["auto", "eager"])
def test_meta_device_init_then_load_serves_mixed_batches_and_merges(policy):
    real = two_adapters(policy)
    config_a, config_b = real.peft_config["default"], real.peft_config["b"]
    torch.manual_seed(1)
    with torch.device("meta"):
        model = fxlora.transform(MLP(16), config_a, trace=policy)
        model.add_adapter("b", config_b)
    model.to_empty(device="cpu")
    model.load_state_dict(real.state_dict())
    model.eval()
    x = torch.randn(4, 20)
    names = ["b", "default", "__base__", "b"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), real(x))
        torch.testing.assert_close(model(x, adapter_names=names), real(x, adapter_names=names))
        torch.testing.assert_close(model(x, adapter_names=names), row_by_row(model, x, names), rtol=1e-5, atol=1e-6)
        model.set_adapter("default")
        before = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
        merged = model.merged_state_dict()
    torch.testing.assert_close(merged["seq.0.weight"], real.merged_state_dict()["seq.0.weight"])
    model.unmerge_adapter()
    torch.testing.assert_close(model.state_dict()["seq.0.weight"], real.state_dict()["seq.0.weight"], rtol=0, atol=0)


def test_whole_model_torch_load_serves_mixed_batches_and_merges():
    torch.manual_seed(0)
    model = fxlora.transform(Mixed(), LoraConfig(target_modules=["stem", "blocks.0.fc2"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["stem"], r=2, init_lora_weights=False))
    model.eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(3, 6)
    names = ["b", "__base__", "default"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, adapter_names=names), model(x, adapter_names=names))
        loaded.merge_adapter()
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)
        loaded.set_adapter("b")
        model.set_adapter("b")
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)


def test_deepcopy_has_its_own_state():
    model = two_adapters()
    twin = copy.deepcopy(model)
    assert twin.adapter_state is not model.adapter_state
    twin.set_adapter("b")
    assert model.active_adapters == ["default"] and twin.active_adapters == ["b"]
    x = torch.randn(2, 20)
    assert not torch.equal(twin(x), model(x))


@pytest.mark.parametrize("policy", ["auto", "eager"])
def test_failed_add_adapter_restores_every_field(monkeypatch, policy):
    model = two_adapters(policy)
    model.set_adapter_scale("b", 0.5)
    x = torch.randn(3, 20)
    with torch.no_grad():
        out_before = model(x)
    state = model.adapter_state
    before = {k: copy.copy(v) for k, v in vars(state).items() if k in ("configs", "active", "scales", "trainable", "options", "enabled")}
    published = state.published
    import fxlora.model.adapters as adapters_mod

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(adapters_mod, "report_from_plan", broken)
    with pytest.raises(RuntimeError, match="boom"):
        model.add_adapter("c", LoraConfig(target_modules=["seq.2"]))
    after = {k: v for k, v in vars(state).items() if k in before}
    assert list(after["configs"]) == list(before["configs"]) and after["active"] == before["active"]
    assert after["scales"] == before["scales"] and after["trainable"] == before["trainable"]
    assert "c" not in state.published.index and state.published.index == published.index
    assert not any("lora_A.c." in n for n, _ in model.named_parameters())
    gated = dataclasses.replace(state.published, eager=None)  # the code torch.compile runs
    with torch.no_grad():  # the forwards are the ones from before (the new ones knew adapter c)
        assert torch.equal(model(x), out_before)
        with state.calling(gated):
            torch.testing.assert_close(model(x), out_before)
    monkeypatch.undo()
    model.add_adapter("c", LoraConfig(target_modules=["seq.2"]))  # and the name is free again
    assert "c" in model.peft_config
