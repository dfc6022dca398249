"""merge_adapter / unmerge_adapter / merge_and_unload / unload on LoraModel.

Merged outputs equal unmerged ones (float32, 1e-5 relative) on every layer type and on random
architectures; merged weights equal peft's; merge + unmerge gives the original weights bit for bit,
however often; adapter state changes on a merged model are exact and never recompile; bad input
changes nothing."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import fxlora
from fxlora import LoraConfig
from fxlora.errors import MergeError
from models import MLP, ConvNet1d, ConvNet2d, ConvNet3d, EmbeddingModel, Mixed, copy_peft_adapter_weights
from test_properties import setups

CASES = [
    ("mlp", lambda: MLP(32), ["seq.0", "seq.2"], ["seq.4"], lambda: torch.randn(5, 20)),
    ("conv1d", ConvNet1d, ["conv1", "conv2"], ["head"], lambda: torch.randn(2, 3, 17)),
    ("conv2d", ConvNet2d, ["conv1", "conv2", "conv3"], None, lambda: torch.randn(2, 3, 11, 11)),
    ("conv2d-dilated-reflect", lambda: ConvNet2d(dilation=2, padding_mode="reflect"), ["conv1", "conv3"], None, lambda: torch.randn(2, 3, 11, 11)),
    ("conv3d", ConvNet3d, ["conv1", "conv2", "conv3"], ["head"], lambda: torch.randn(2, 2, 5, 6, 7)),
    ("embedding", EmbeddingModel, ["emb", "proj"], ["classifier"], lambda: torch.randint(0, 50, (3, 7))),
    ("mixed-graph-and-eager", Mixed, "all-linear", None, lambda: torch.randn(4, 6)),
]
EXTRAS = {
    "plain": {},
    "rslora+patterns": {"use_rslora": True, "lora_alpha": 12, "r": 4, "rank_pattern": {"conv1|seq.0|emb": 2}, "alpha_pattern": {"conv3|proj": 3}},
    "lora_bias": {"lora_bias": True},
}


def perturbed(model):
    """Make the trainable copies differ from their originals (so unload vs merge is visible)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def base_weights(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items() if ".lora_" not in n and ".modules_to_save." not in n}


def assert_same_bits(now, before):
    assert now.keys() == before.keys()
    for name in before:
        assert torch.equal(now[name], before[name]), name


def rel_close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


@pytest.mark.parametrize("policy", ["auto", "eager"])
@pytest.mark.parametrize("extra", list(EXTRAS), ids=list(EXTRAS))
@pytest.mark.parametrize("name, make, targets, saved, make_input", CASES, ids=[c[0] for c in CASES])
def test_merged_equals_unmerged_and_unmerge_is_exact(policy, extra, name, make, targets, saved, make_input):
    if name == "embedding" and extra == "lora_bias":
        pytest.skip("embeddings have no lora_bias")
    config = LoraConfig(target_modules=targets, modules_to_save=saved, init_lora_weights=False, **EXTRAS[extra])
    model = perturbed(fxlora.transform(make(), config, trace=policy)).eval()
    x = make_input()
    before = base_weights(model)
    unmerged = model(x)
    model.merge_adapter()
    assert model.merged_adapters == ["default"]
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())  # weights really changed
    rel_close(model(x), unmerged)
    model.unmerge_adapter()
    assert model.merged_adapters == []
    assert_same_bits(base_weights(model), before)
    assert torch.equal(model(x), unmerged)


@given(setup=setups(), scale=st.sampled_from([1.0, 0.5, 2.0]))
def test_property_merged_equals_unmerged_on_random_architectures(setup, scale):
    net, shape, targets, config = setup
    model = fxlora.transform(net, config.replace(init_lora_weights=False)).eval()
    model.set_adapter_scale("default", scale)
    torch.manual_seed(0)  # the same input each time hypothesis replays an example
    x = torch.randn(*shape)
    before = base_weights(model)
    unmerged = model(x)
    grouped = [t for t in targets if getattr(net.get_submodule(t), "groups", 1) > 1]
    biasless = [t for t in targets if config.lora_bias and net.get_submodule(t).bias is None]
    if grouped or biasless:
        with pytest.raises(MergeError, match="|".join(grouped + biasless)):
            model.merge_adapter()
        assert_same_bits(base_weights(model), before)
        assert model.merged_adapters == []
        assert torch.equal(model(x), unmerged)
        return
    model.merge_adapter()
    rel_close(model(x), unmerged)
    with model.disable_adapter():
        base_out = model(x)
    model.unmerge_adapter()
    assert_same_bits(base_weights(model), before)
    with model.disable_adapter():
        # the merged weight less the update: rounding of the weights' size, which a small output
        # (cancelling terms) sees relatively larger
        rel_close(base_out, model(x), rtol=1e-4)


def test_disable_adapter_on_a_merged_model_gives_base_outputs_and_stays_merged():
    model = perturbed(fxlora.transform(MLP(32), LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], init_lora_weights=False))).eval()
    x = torch.randn(6, 20)
    with model.disable_adapter():
        base_out = model(x)
    adapted = model(x)
    model.merge_adapter()
    merged_weights = base_weights(model)
    with model.disable_adapter():
        rel_close(model(x), base_out)
        assert model.merged_adapters == ["default"]
    assert model.merged_adapters == ["default"]
    assert_same_bits(base_weights(model), merged_weights)  # nothing was unmerged behind our back
    rel_close(model(x), adapted)
    model.disable_adapter_layers()
    rel_close(model(x), base_out)
    model.enable_adapter_layers()
    rel_close(model(x), adapted)


def two_adapters():
    model = fxlora.transform(MLP(32), LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(target_modules=["seq.2", "seq.4"], r=4, lora_alpha=16, init_lora_weights=False))
    return model.eval()


def outputs_by_state(model, x):
    out = {}
    for active in (["default"], ["other"], ["default", "other"]):
        model.set_adapter(active)
        out[tuple(active)] = model(x)
    with model.disable_adapter():
        out["off"] = model(x)
    model.set_adapter("default")
    return out


def test_switching_adapters_on_a_merged_model_computes_every_state_exactly():
    model = two_adapters()
    x = torch.randn(5, 20)
    reference = outputs_by_state(model, x)
    before = base_weights(model)
    model.merge_adapter(["default", "other"])
    assert sorted(model.merged_adapters) == ["default", "other"]
    for state, expected in outputs_by_state(model, x).items():
        rel_close(expected, reference[state])
    model.set_adapter_scale("other", 0.25)  # a new scale after merging: the gate makes up the difference
    model.set_adapter(["default", "other"])
    unmerged_scaled = copy.deepcopy(model)
    unmerged_scaled.unmerge_adapter()
    rel_close(model(x), unmerged_scaled(x))
    model.unmerge_adapter()
    assert_same_bits(base_weights(model), before)


def test_mixed_batch_on_a_merged_model_matches_the_unmerged_model():
    model = two_adapters()
    x = torch.randn(4, 20)
    names = ["default", "__base__", "other", "default"]
    reference = model(x, adapter_names=names)
    model.merge_adapter("default")
    rel_close(model(x, adapter_names=names), reference)


def test_merging_with_a_run_time_scale_folds_that_scale():
    model = fxlora.transform(MLP(16), LoraConfig(target_modules=["seq.0"], init_lora_weights=False)).eval()
    x = torch.randn(3, 20)
    model.set_adapter_scale("default", 0.3)
    expected = model(x)
    unload = model.merge_and_unload()
    rel_close(unload(x), expected)


def test_separate_merges_unmerge_in_reverse_order_exactly():
    model = two_adapters()
    before = base_weights(model)
    model.merge_adapter("default")
    model.merge_adapter("other")
    assert model.merged_adapters == ["default", "other"]
    model.unmerge_adapter()
    assert_same_bits(base_weights(model), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_repeated_cycles_never_drift(dtype):
    model = fxlora.transform(MLP(64).to(dtype), LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights=False)).eval()
    before = base_weights(model)
    for _ in range(5):
        model.merge_adapter()
        model.unmerge_adapter()
        assert_same_bits(base_weights(model), before)


def test_merging_rounds_once_into_half_precision():
    model = fxlora.transform(MLP(64).to(torch.bfloat16), LoraConfig(target_modules=["seq.2"], init_lora_weights=False)).eval()
    layer = model.model.seq[2]
    from fxlora.core.delta import delta_weight

    expected = (layer.weight.float() + delta_weight(layer, "default")).to(torch.bfloat16)
    model.merge_adapter()
    assert torch.equal(layer.weight, expected)


def test_unmerge_after_the_weights_changed_subtracts_instead_of_restoring_stale_values():
    model = fxlora.transform(MLP(16), LoraConfig(target_modules=["seq.0"], init_lora_weights=False)).eval()
    layer = model.model.seq[0]
    before = layer.weight.detach().clone()
    model.merge_adapter()
    with torch.no_grad():
        layer.weight.add_(1.0)  # e.g. the user edited the merged weights
    model.unmerge_adapter()
    torch.testing.assert_close(layer.weight, before + 1.0, rtol=0, atol=1e-5)


def test_unmerge_after_the_adapter_changed_subtracts_the_current_update():
    model = fxlora.transform(MLP(16), LoraConfig(target_modules=["seq.0"], init_lora_weights=False)).eval()
    layer = model.model.seq[0]
    model.merge_adapter()
    merged = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(2.0)
    from fxlora.core.delta import delta_weight

    expected = merged - delta_weight(layer, "default")
    model.unmerge_adapter()
    assert torch.equal(layer.weight, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_unmerge_keeps_little_for_small_updates_and_never_more_than_the_weights(dtype):
    from fxlora.core.fold import fold_layer

    for size, sparse in ((1e-3, True), (10.0, False)):
        model = fxlora.transform(MLP(128).to(dtype), LoraConfig(target_modules=["seq.2"], init_lora_weights=False))
        layer = model.model.seq[2]
        with torch.no_grad():
            layer.lora_B["default"].weight.mul_(size)
        record = fold_layer(layer, {"default": 1.0})
        weight_bytes = layer.weight.numel() * layer.weight.element_size()
        assert (record.restores["weight"].index is not None) == sparse
        assert record.nbytes <= weight_bytes * (0.5 if sparse else 1.0)


def test_merge_twice_and_unmerge_unmerged_warn_and_do_nothing():
    model = fxlora.transform(MLP(16), LoraConfig(target_modules=["seq.0"], init_lora_weights=False)).eval()
    before = base_weights(model)
    with pytest.warns(UserWarning, match="no adapter is merged"):
        model.unmerge_adapter()
    assert_same_bits(base_weights(model), before)
    model.merge_adapter()
    merged = base_weights(model)
    with pytest.warns(UserWarning, match=r"\['default'\] are already merged"):
        model.merge_adapter()
    assert_same_bits(base_weights(model), merged)
    assert model.merged_adapters == ["default"]


def test_unknown_adapter_is_refused_with_the_known_names_and_nothing_changes():
    model = two_adapters()
    before = base_weights(model)
    with pytest.raises(ValueError, match=r"unknown adapter 'nope'; existing adapters: \['default', 'other'\]"):
        model.merge_adapter(["default", "nope"])
    assert_same_bits(base_weights(model), before)
    assert model.merged_adapters == []


def test_safe_merge_refuses_non_finite_naming_adapter_and_layer_and_changes_nothing():
    model = two_adapters()
    x = torch.randn(3, 20)
    out = model(x)
    before = base_weights(model)
    lora_b = model.model.seq[4].lora_B["other"].weight
    good = lora_b[0, 0].item()
    with torch.no_grad():
        lora_b[0, 0] = float("nan")  # in the last layer merged
    with pytest.raises(MergeError, match=r"adapter 'other'.*'seq\.4'"):
        model.merge_adapter(["default", "other"], safe_merge=True)
    assert_same_bits(base_weights(model), before)  # seq.0 and seq.2 untouched too
    assert model.merged_adapters == []
    with torch.no_grad():
        lora_b[0, 0] = good
    assert torch.equal(model(x), out)


def test_safe_merge_refuses_overflow_into_half_precision():
    model = fxlora.transform(MLP(16).to(torch.float16), LoraConfig(target_modules=["seq.0"], init_lora_weights=False))
    with torch.no_grad():
        model.model.seq[0].lora_B["default"].weight.fill_(1e7)  # finite in float32, too big for float16
    with pytest.raises(MergeError, match=r"\['default'\] into 'seq\.0'.*non-finite.*overflows torch.float16"):
        model.merge_adapter(safe_merge=True)
    assert model.merged_adapters == []


def test_a_failure_while_writing_leaves_every_weight_as_it_was(monkeypatch):
    import fxlora.model.merging as merge_module
    import fxlora.passes.merge as merge_pass

    model = fxlora.transform(Mixed(), LoraConfig(target_modules="all-linear", init_lora_weights=False)).eval()
    assert set(model.target_paths.values()) == {"graph", "eager"}
    before = base_weights(model)
    real, count = merge_pass.fold_layer, []

    def fails_late(module, scales, *args):
        count.append(1)
        if len(count) == 5:  # after the graph layers and some eager ones were written
            raise RuntimeError("out of memory")
        return real(module, scales, *args)

    monkeypatch.setattr(merge_pass, "fold_layer", fails_late)
    monkeypatch.setattr(merge_module, "fold_layer", fails_late)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.merge_adapter()
    assert_same_bits(base_weights(model), before)
    assert model.merged_adapters == []


def test_tied_weights_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    model = fxlora.transform(Tied(), LoraConfig(target_modules=["emb"], init_lora_weights=False))
    with pytest.raises(MergeError, match=r"'emb'.*tied to \['head.weight'\]"):
        model.merge_adapter()


def test_merged_adapter_cannot_be_deleted_until_unmerged():
    model = two_adapters()
    model.merge_adapter("other")
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model.delete_adapter("other")
    model.unmerge_adapter()
    model.delete_adapter("other")


def test_merge_unmerge_and_switches_never_recompile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = two_adapters()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 20)
    reference = compiled(x)
    model.merge_adapter()
    rel_close(compiled(x), reference)
    with model.disable_adapter():
        compiled(x)
    model.set_adapter("other")
    compiled(x)
    model.set_adapter("default")
    model.unmerge_adapter()
    assert torch.equal(compiled(x), reference)
    model.merge_adapter(["default", "other"])
    compiled(x)
    assert counter.frame_count == 1
    torch._dynamo.reset()


# ---------------------------------------------------------------------- merge_and_unload / unload
def assert_plain(model, original_keys):
    from fxlora.runtime.install import fxlora_present

    assert not fxlora_present(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == original_keys
    assert not any(k.startswith(("lora_", "modules_to_save")) or ".lora_" in k for k, _ in model.named_modules())


@pytest.mark.parametrize("policy", ["auto", "eager"])
def test_merge_and_unload_returns_the_users_plain_model_with_merged_weights(policy):
    user = MLP(32)
    user.seq[0].weight.requires_grad_(False)  # a flag of the user's that must come back
    flags = {n: p.requires_grad for n, p in user.named_parameters()}
    keys = list(user.state_dict())
    model = perturbed(fxlora.transform(user, LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], init_lora_weights=False), trace=policy)).eval()
    x = torch.randn(5, 20)
    expected = model(x)
    trained_head = model.model.seq[4].modules_to_save["default"].weight.detach().clone()
    out = model.merge_and_unload()
    assert out is user and type(out) is MLP and type(out.seq[0]) is nn.Linear
    assert_plain(out, keys)
    assert {n: p.requires_grad for n, p in out.named_parameters()} == flags
    assert torch.equal(out.seq[4].weight, trained_head)
    rel_close(out(x), expected)
    assert out.describe() == "MLP with 6 layers"


def test_unload_gives_back_the_exact_base_model_even_after_a_merge():
    user = MLP(32)
    before = {k: v.clone() for k, v in user.state_dict().items()}
    keys = list(before)
    model = fxlora.transform(user, LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], init_lora_weights=False))
    model.merge_adapter()
    out = model.unload()
    assert out is user
    assert_plain(out, keys)
    assert_same_bits(out.state_dict(), before)
    assert all(p.requires_grad for p in out.parameters())


def test_a_model_can_be_adapted_again_after_unloading():
    user = MLP(16)
    fxlora.transform(user, LoraConfig(target_modules=["seq.0"])).merge_and_unload()
    again = fxlora.transform(user, LoraConfig(target_modules=["seq.2"]))
    assert again.targeted_module_names == ["seq.2"]


@pytest.mark.parametrize("call", ["forward", "merge_adapter", "state_dict", "parameters", "save_merged", "model", "setattr"])
def test_the_lora_model_fails_clearly_after_unloading(call, tmp_path):
    model = fxlora.transform(MLP(16), LoraConfig(target_modules=["seq.0"]))
    user = model.merge_and_unload()
    actions = {
        "forward": lambda: model(torch.randn(2, 20)),
        "merge_adapter": lambda: model.merge_adapter(),
        "state_dict": lambda: model.state_dict(),
        "parameters": lambda: list(model.parameters()),
        "save_merged": lambda: model.save_merged(tmp_path / "m.safetensors"),
        "model": lambda: model.model,
        "setattr": lambda: setattr(model, "x", 1),
    }
    with pytest.raises(RuntimeError, match=r"unloaded by merge_and_unload\(\) or unload\(\).*use the model that call returned"):
        actions[call]()
    assert "UnloadedLoraModel" in repr(model)
    assert user(torch.randn(2, 20)).shape == (2, 2)  # the returned model is unaffected
    assert not list(tmp_path.iterdir())


def test_merge_and_unload_with_an_unmergeable_layer_changes_nothing_and_stays_usable():
    model = fxlora.transform(ConvNet2d(groups=2), LoraConfig(target_modules=["conv1", "conv2"], r=2, init_lora_weights=False)).eval()
    x = torch.randn(2, 3, 11, 11)
    out = model(x)
    before = base_weights(model)
    with pytest.raises(MergeError, match="'conv2'"):
        model.merge_and_unload()
    assert_same_bits(base_weights(model), before)
    assert torch.equal(model(x), out)
    assert model.targeted_module_names == ["conv1", "conv2"]


# ---------------------------------------------------------------------- against peft
peft = pytest.importorskip("peft")

PEFT_CASES = [
    ("mlp", lambda: MLP(32), dict(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])),
    ("conv1d-lora_bias", ConvNet1d, dict(target_modules=["conv1", "conv2"], lora_bias=True)),
    ("conv2d-rslora", ConvNet2d, dict(target_modules=["conv1", "conv2", "conv3"], use_rslora=True, lora_alpha=12, r=4)),
    ("embedding-patterns", EmbeddingModel, dict(target_modules=["emb", "proj"], rank_pattern={"proj": 2}, alpha_pattern={"emb": 3})),
    ("hf-conv1d", "gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
]


def make_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("name, make, kwargs", PEFT_CASES, ids=[c[0] for c in PEFT_CASES])
def test_same_merged_weights_as_peft(name, make, kwargs):
    torch.manual_seed(0)
    base = make_gpt2() if make == "gpt2" else make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
        fm = fxlora.transform(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    copy_peft_adapter_weights(pm, fm)
    ours = fm.merge_and_unload().state_dict()
    theirs = pm.merge_and_unload().state_dict()
    assert list(ours) == list(theirs)
    changed = 0
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6)
        changed += not torch.equal(theirs[key], base.state_dict()[key])
    assert changed >= 2  # the comparison covers merged weights, not only untouched ones
