"""init_lora_weights='eva' with fxlora.initialize_lora_eva_weights / get_eva_state_dict against
peft 0.21.2's: the same ranks, alphas, targets and A bit for bit from the same batches (PEFT's
incremental SVD is seeded), the same outputs, files both ways; the incremental SVD's promises;
refusals that leave the model as it was."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import fxlora
from fxlora import EvaConfig, LoraConfig
from fxlora.kinds.inits_eva import IncrementalSVD
from models import ConvNet2d, MLP, assert_same_state, assert_same_state_as_peft, load_crosswise, save_both_trained, state_snapshot
from zoo import TRANSFORMERS, text_inputs

peft = pytest.importorskip("peft")
from peft.tuners.lora.eva import get_eva_state_dict as peft_state_dict  # noqa: E402
from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_initialize  # noqa: E402

PLAIN = dict(forward_fn=lambda model, x: model(x), prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None)
QKV = ["q_proj", "k_proj", "v_proj"]


class TwoInputs(nn.Module):
    """Layer `a` sees 8 strong directions, `b` isotropic noise: with rho=2 EVA gives `a` all the rank."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 8), nn.Linear(64, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.c(self.a(x[:, :16].contiguous()) + self.b(x[:, 16:].contiguous()))  # PEFT hashes with .view


def two_inputs_data():
    g = torch.Generator().manual_seed(0)
    mix = torch.linalg.qr(torch.randn(16, 8, generator=g))[0].T  # 8 equally strong directions
    return [torch.cat([torch.randn(96, 8, generator=g) @ mix * 5, torch.randn(96, 64, generator=g) * 0.1], 1) for _ in range(4)]


def mlp_data():
    return [torch.randn(64, 20, generator=torch.Generator().manual_seed(i)) for i in range(6)]


def llama_data(model):
    out = []
    for i in range(4):
        batch = text_inputs(model, batch=4, length=16, seed=i)
        batch["labels"] = batch["input_ids"].clone()
        batch["labels"][:, :3] = -100
        out.append(batch)
    return out


def cfg(targets, rho=2.0, **kw):
    return dict(target_modules=targets, r=4, lora_alpha=8, init_lora_weights="eva", eva_config=dict(rho=rho, tau=0.9), **kw)


def both(base, config, data, **kw):
    theirs = {**config, "eva_config": peft.EvaConfig(**config["eva_config"])}
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**theirs))
    peft_initialize(pm, data, show_progress_bar=False, **kw)
    torch.manual_seed(1)
    fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**config))
    fxlora.initialize_lora_eva_weights(fm, data, **kw)
    return pm, fm


def assert_equal_to_peft(pm, fm):
    assert_same_state_as_peft(pm, fm)
    pc, fc = pm.peft_config["default"], fm.peft_config["default"]
    assert (sorted(pc.target_modules), pc.rank_pattern, pc.alpha_pattern) == (sorted(fc.target_modules), fc.rank_pattern, fc.alpha_pattern)


@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_mlp_equals_peft_bit_for_bit(rho):
    torch.manual_seed(0)
    base = MLP(48)
    pm, fm = both(base, cfg(["seq.0", "seq.2", "seq.4"], rho), mlp_data(), **PLAIN)
    assert_equal_to_peft(pm, fm)
    assert bool(fm.peft_config["default"].rank_pattern) == (rho > 1)  # rho=1: no redistribution
    x = torch.randn(3, 20)
    assert torch.equal(fm(x), pm(x)) and torch.equal(fm(x), base(x))  # B is zero


def test_tiny_llama_equals_peft_with_label_masks_and_shared_inputs():
    # q, k and v see the same input: one decomposition serves the three
    base = TRANSFORMERS["llama"].build(seed=0)
    pm, fm = both(base, cfg([*QKV, "down_proj"]), llama_data(base))
    assert_equal_to_peft(pm, fm)
    inputs = text_inputs(base)
    assert torch.equal(fm(**inputs).logits, pm(**inputs).logits)


def test_a_layer_given_rank_zero_is_dropped_as_peft_does():
    torch.manual_seed(0)
    base = TwoInputs()
    pm, fm = both(base, cfg(["a", "b", "c"]), two_inputs_data(), **PLAIN)
    assert_equal_to_peft(pm, fm)
    assert "b" not in fm.targeted_module_names and fm.peft_config["default"].rank_pattern["a"] == 8
    assert fm.peft_config["default"].alpha_pattern["a"] == 16  # alpha scaled with the rank


def test_the_state_dict_of_the_plain_model_equals_peft():
    base = TRANSFORMERS["llama"].build(seed=0)
    config = cfg(QKV)
    ours = fxlora.get_eva_state_dict(copy.deepcopy(base), llama_data(base), LoraConfig(**config))
    theirs = peft_state_dict(copy.deepcopy(base), llama_data(base), peft.LoraConfig(**{**config, "eva_config": peft.EvaConfig(rho=2.0, tau=0.9)}),
                             show_progress_bar=False)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # and it initialises a transformed model as the dataloader would
    torch.manual_seed(1)
    fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**config))
    fxlora.initialize_lora_eva_weights(fm, eva_state_dict={f"base_model.model.{k}": v for k, v in ours.items()})
    _, direct = both(base, config, llama_data(base))
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in fm.state_dict().items())


def test_whitening_and_unadjusted_scaling_equal_peft():
    torch.manual_seed(0)
    config = cfg(["seq.0", "seq.2"])
    config["eva_config"].update(whiten=True, adjust_scaling_factors=False)
    pm, fm = both(MLP(48), config, mlp_data(), **PLAIN)
    assert_equal_to_peft(pm, fm)
    assert fm.peft_config["default"].alpha_pattern == {}


def test_files_load_both_ways(tmp_path):
    torch.manual_seed(0)
    base = MLP(48)
    pm, fm = both(base, cfg(["seq.0", "seq.2", "seq.4"]), mlp_data(), **PLAIN)
    save_both_trained(tmp_path, pm, fm)
    x = torch.randn(3, 20)
    ours, theirs = load_crosswise(tmp_path, copy.deepcopy(base), copy.deepcopy(base))
    assert torch.equal(ours(x), pm.eval()(x)) and torch.equal(theirs(x), fm.eval()(x))


def test_the_rebuilt_model_trains_and_unloads_to_the_original():
    torch.manual_seed(0)
    base = MLP(48)
    before = state_snapshot(base)
    fm = fxlora.transform(base, LoraConfig(**cfg(["seq.0", "seq.2", "seq.4"])))
    fxlora.initialize_lora_eva_weights(fm, mlp_data(), **PLAIN)
    trainable = {n for n, p in fm.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in fm.named_parameters() if ".lora_" in n}
    fm(torch.randn(3, 20)).sum().backward()
    assert fm.seq[0].lora_B["default"].weight.grad is not None
    assert_same_state(fm.unload(), before)


@pytest.mark.parametrize(
    "make, config, call, error, match",
    [
        (lambda: MLP(48), cfg(["seq.0"]), lambda m: fxlora.initialize_lora_eva_weights(m), ValueError, "needs a dataloader"),
        (lambda: MLP(48), cfg(["seq.0"]), lambda m: fxlora.initialize_lora_eva_weights(m, [], **PLAIN), ValueError, "at least one batch"),
        (lambda: MLP(48), {**cfg(["seq.0"]), "init_lora_weights": True, "eva_config": None},
         lambda m: fxlora.initialize_lora_eva_weights(m, mlp_data(), **PLAIN), ValueError, "needs init_lora_weights='eva'"),
        (lambda: MLP(48), cfg(["seq.0"]), lambda m: fxlora.initialize_lora_eva_weights(m, eva_state_dict={"seq.2": torch.ones(2, 48)}),
         ValueError, "does not fit the adapter's targets"),
        (lambda: MLP(48), cfg(["seq.0"]), lambda m: fxlora.initialize_lora_eva_weights(m, eva_state_dict={"seq.0": torch.ones(2, 7)}),
         ValueError, r"must be a \(rank, 20\) tensor"),
        (lambda: MLP(48), cfg(["seq.0"]), lambda m: fxlora.initialize_lora_eva_weights(m.model, mlp_data()), ValueError, "needs the fxlora.LoraModel"),
        (lambda: MLP(48), cfg(["seq.0"]), lambda m: fxlora.initialize_lora_eva_weights(
            m, [torch.randn(64, 20)], forward_fn=lambda model, x: model.seq[2](torch.randn(64, 48)),
            prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None), ValueError, r"did not reach the target\(s\) \['seq.0'\]"),
    ],
)
def test_bad_calls_are_refused_untouched(make, config, call, error, match):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fxlora.transform(make(), LoraConfig(**config))
    before = state_snapshot(model)
    with pytest.raises(error, match=match):
        call(model)
    assert_same_state(model, before)


def test_a_second_adapter_is_refused():
    model = fxlora.transform(MLP(48), LoraConfig(**cfg(["seq.0"])))
    model.add_adapter("other", LoraConfig(target_modules=["seq.2"]))
    with pytest.raises(ValueError, match="the one unmerged adapter 'default'"):
        fxlora.initialize_lora_eva_weights(model, mlp_data(), **PLAIN)


def test_eva_on_a_conv_layer_is_refused_by_transform():
    model = ConvNet2d()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="nn.Linear and transformers Conv1D layers only, not Conv2d"):
        fxlora.transform(model, LoraConfig(**cfg(["conv1"])))
    assert_same_state(model, before)


@pytest.mark.parametrize(
    "settings_, error, match",
    [({"rho": 0.5}, ValueError, "rho must be a number >= 1.0"), ({"tau": 2}, ValueError, r"tau must be a number in \[0, 1\]"),
     ({"whiten": 1}, TypeError, "whiten must be True or False"), ({"rank": 2}, ValueError, r"unknown key\(s\) \['rank'\]")],
)
def test_bad_settings_are_refused_by_the_config(settings_, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(target_modules=["a"], init_lora_weights="eva", eva_config=settings_)


def test_peft_eva_config_is_taken_and_the_default_comes_with_peft_warning():
    assert LoraConfig(target_modules=["a"], init_lora_weights="eva", eva_config=peft.EvaConfig(rho=3.0)).eva_config == EvaConfig(rho=3.0)
    with pytest.warns(UserWarning, match="using the default EvaConfig"):
        assert LoraConfig(target_modules=["a"], init_lora_weights="eva").eva_config == EvaConfig()


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 4), batches=st.integers(1, 4), seed=st.integers(0, 50))
def test_the_incremental_svd_keeps_orthonormal_directions_of_the_data(k, batches, seed):
    features = 2 * k  # PEFT's randomized SVD takes q = 2k directions: here all of them
    g = torch.Generator().manual_seed(seed)
    data = [torch.randn(3 * features, features, generator=g) * torch.linspace(4, 0.5, features) for _ in range(batches)]
    svd = IncrementalSVD(k)
    for batch in data:
        svd.update(batch)
    torch.testing.assert_close(svd.components.double() @ svd.components.double().T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-5)
    assert torch.all(svd.singular_values[:-1] >= svd.singular_values[1:]) and float(svd.explained_variance_ratio.sum()) <= 1 + 1e-6
    if batches == 1:  # one batch: the exact SVD of the centred data
        centred = data[0].double() - data[0].double().mean(0)
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        torch.testing.assert_close(svd.singular_values.double(), s[:k], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close((svd.components.double() @ vh[:k].T).diagonal().abs(), torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-4)
        torch.testing.assert_close(svd.explained_variance_ratio.double(), (s**2 / (s**2).sum())[:k], rtol=1e-4, atol=1e-5)


def test_a_failing_rebuild_puts_the_adapter_back(monkeypatch):
    from fxlora.model.lora_model import LoraModel

    torch.manual_seed(0)
    base = MLP(48)
    model = fxlora.transform(copy.deepcopy(base), LoraConfig(**cfg(["seq.0", "seq.2", "seq.4"])))
    before, config = state_snapshot(model), model.peft_config["default"]
    real, calls = LoraModel.adapt.__func__, []

    def flaky(cls, *args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "adapt", classmethod(flaky))
    with pytest.raises(RuntimeError, match="out of memory"):
        fxlora.initialize_lora_eva_weights(model, mlp_data(), **PLAIN)
    assert_same_state(model, before)
    assert model.peft_config["default"] == config and model.targeted_module_names == ["seq.0", "seq.2", "seq.4"]
    x = torch.randn(3, 20)
    assert torch.equal(model(x), base(x))  # B is still zero: computes as the base
    fxlora.initialize_lora_eva_weights(model, mlp_data(), **PLAIN)  # and it can be done again
    assert model.peft_config["default"].rank_pattern
