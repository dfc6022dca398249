"""init_lora_weights='corda' with fxlora.preprocess_corda against peft 0.21.2's preprocess_corda
and get_peft_model: the same decompositions, adapter tensors and residual base weights bit for
bit, the same outputs; each side's preprocessing and cache files used by the other; files both
ways; the conversion to plain LoRA; refusals that leave the model as it was."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxlora
from fxlora import CordaConfig, LoraConfig
from fxlora.kinds.inits_corda import corda_factors, eigens_from_covariance
from models import ConvNet2d, MLP, assert_same_state, assert_same_state_as_peft, load_crosswise, peft_key_to_fxlora, save_both_trained, state_snapshot
from zoo import TRANSFORMERS, text_inputs

peft = pytest.importorskip("peft")
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess  # noqa: E402

MLP_TARGETS = ["seq.0", "seq.2"]
FIELDS = ("S_WC", "U_WC", "V_WC")


def configs(targets, method="ipm", **kw):
    cfg = {**dict(target_modules=targets, r=4, lora_alpha=8, init_lora_weights="corda"), **kw}
    return (
        peft.LoraConfig(**cfg, corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method)),
        LoraConfig(**cfg, corda_config=CordaConfig(corda_method=method)),
    )


def mlp_runner(model, batches=3):
    data = [torch.randn(16, 20, generator=torch.Generator().manual_seed(i)) for i in range(batches)]
    return lambda: [model(x) for x in data]


def llama_runner(model):
    inputs = text_inputs(model, batch=1, length=8)  # PEFT's hook takes one sequence a call
    return lambda: [model(input_ids=inputs["input_ids"][:, i:]) for i in range(3)]


def preprocessed(base, targets, runner, method="ipm", peft_targets=None, **kw):
    theirs, ours = configs(targets, method, **kw)
    if peft_targets is not None:
        theirs = configs(peft_targets, method, **kw)[0]
    pb, fb = copy.deepcopy(base), copy.deepcopy(base)
    peft_preprocess(pb, theirs, run_model=runner(pb))
    fxlora.preprocess_corda(fb, ours, run_model=runner(fb))
    return (pb, theirs), (fb, ours)



def assert_same_eigens(a, b, names):
    for name in names:
        ea, eb = a.get_submodule(name).eigens, b.get_submodule(name).eigens
        assert all(torch.equal(getattr(ea, f), getattr(eb, f)) for f in FIELDS), name


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_mlp_equals_peft_bit_for_bit(method):
    torch.manual_seed(0)
    base = MLP(12)
    (pb, pc), (fb, fc) = preprocessed(base, MLP_TARGETS, mlp_runner, method)
    assert_same_eigens(pb, fb, MLP_TARGETS)
    x = torch.randn(3, 20)
    assert torch.equal(fb(x), base(x))  # preprocessing changes no weight
    pm, fm = peft.get_peft_model(pb, pc), fxlora.transform(fb, fc)
    assert_same_state_as_peft(pm, fm)  # adapter tensors and residual base weights
    assert not hasattr(fm.get_submodule("seq.0"), "eigens")  # taken off the layer, as PEFT does
    assert torch.equal(fm(x), pm(x))
    torch.testing.assert_close(fm(x), base(x), rtol=1e-5, atol=1e-5)  # starts as the base model


LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("targets, peft_targets", [(["q_proj", "v_proj"], None), ("all-linear", LLAMA_LINEAR)])
def test_tiny_llama_equals_peft(targets, peft_targets):
    # PEFT's preprocess_corda does not expand "all-linear" (it matches nothing there): its list
    base = TRANSFORMERS["llama"].build(seed=0)
    (pb, pc), (fb, fc) = preprocessed(base, targets, llama_runner, peft_targets=peft_targets)
    pm, fm = peft.get_peft_model(pb, pc), fxlora.transform(fb, fc)
    assert_same_state_as_peft(pm, fm)
    inputs = text_inputs(base)
    assert torch.equal(fm(**inputs).logits, pm(**inputs).logits)


def test_gpt2_conv1d_equals_peft():
    base = TRANSFORMERS["gpt2"].build(seed=0)
    (pb, pc), (fb, fc) = preprocessed(base, ["c_attn", "c_fc"], llama_runner, fan_in_fan_out=True)
    assert_same_state_as_peft(peft.get_peft_model(pb, pc), fxlora.transform(fb, fc))


def test_each_sides_preprocessing_serves_the_other():
    torch.manual_seed(0)
    base = MLP(12)
    (pb, pc), (fb, fc) = preprocessed(base, MLP_TARGETS, mlp_runner)
    pb2, fb2 = copy.deepcopy(pb), copy.deepcopy(fb)
    assert_same_state_as_peft(peft.get_peft_model(fb2, pc), fxlora.transform(pb2, fc))


def test_cache_and_covariance_files_are_peft_files(tmp_path):
    torch.manual_seed(0)
    base = MLP(12)
    theirs, ours = configs(MLP_TARGETS)
    files = dict(cache_file=str(tmp_path / "c" / "cache.pt"), covariance_file=str(tmp_path / "c" / "cov.pt"))
    ours.corda_config = CordaConfig(**files)
    fb = copy.deepcopy(base)
    fxlora.preprocess_corda(fb, ours, run_model=mlp_runner(fb))
    theirs.corda_config.cache_file = files["cache_file"]
    pb = copy.deepcopy(base)
    peft_preprocess(pb, theirs)  # no data: PEFT reads fxlora's cache
    assert_same_eigens(pb, fb, MLP_TARGETS)
    # a covariance file alone, for another rank
    theirs2, ours2 = configs(MLP_TARGETS, r=2)
    ours2.corda_config = CordaConfig(covariance_file=files["covariance_file"])
    theirs2.corda_config.covariance_file = files["covariance_file"]
    fb2, pb2 = copy.deepcopy(base), copy.deepcopy(base)
    fxlora.preprocess_corda(fb2, ours2)
    peft_preprocess(pb2, theirs2)
    assert_same_eigens(pb2, fb2, MLP_TARGETS)
    assert fb2.seq[0].eigens.S_WC.shape == (2,)


def test_files_load_both_ways_on_a_preprocessed_base(tmp_path):
    # the file keeps init_lora_weights='corda': loading recomputes the residual from the layer's
    # decomposition, so (as in PEFT) the base is preprocessed first
    torch.manual_seed(0)
    base = MLP(12)
    (pb, pc), (fb, fc) = preprocessed(base, MLP_TARGETS, mlp_runner)
    pm, fm = peft.get_peft_model(pb, pc), fxlora.transform(fb, fc)
    save_both_trained(tmp_path, pm, fm)
    (p_base, _), (f_base, _) = preprocessed(base, MLP_TARGETS, mlp_runner)
    ours, theirs = load_crosswise(tmp_path, f_base, p_base)
    x = torch.randn(3, 20)
    assert torch.equal(ours(x), pm(x)) and torch.equal(theirs(x), fm(x))
    assert ours.peft_config["default"].corda_config == fc.corda_config


def test_conversion_to_plain_lora_equals_peft(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = MLP(12)
    (pb, pc), (fb, fc) = preprocessed(base, MLP_TARGETS, mlp_runner)
    pm, fm = peft.get_peft_model(pb, pc), fxlora.transform(fb, fc)
    pm.save_pretrained(tmp_path / "peft_init")
    fm.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        for m in (pm, fm):
            for name, p in sorted(m.named_parameters()):
                if "lora_" in name:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(peft_key_to_fxlora(name)))) * 0.05)
    pm.save_pretrained(tmp_path / "peft_lora", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    fm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    theirs = load_file(tmp_path / "peft_lora" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], v) for k, v in theirs.items())
    x = torch.randn(3, 20)
    plain = fxlora.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()  # the original base
    torch.testing.assert_close(plain(x), fm.eval()(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(out=st.integers(2, 10), n_in=st.integers(2, 10), data=st.data(), method=st.sampled_from(["ipm", "kpm"]),
       scaling=st.floats(0.25, 4.0))
def test_the_adapter_and_residual_add_up_to_the_weight(out, n_in, data, method, scaling):
    r = data.draw(st.integers(1, min(out, n_in)))
    g = torch.Generator().manual_seed(out * 11 + n_in)
    weight, x = torch.randn(out, n_in, generator=g), torch.randn(3 * n_in, n_in, generator=g)
    eigens = eigens_from_covariance(weight, x.T @ x / len(x), r, method)
    a, b = corda_factors(eigens, scaling)
    assert a.shape == (r, n_in) and b.shape == (out, r)
    full = eigens_from_covariance(weight, x.T @ x / len(x), min(out, n_in), "ipm")
    torch.testing.assert_close(full.U_WC * full.S_WC @ full.V_WC.T, weight, rtol=1e-3, atol=1e-3)  # U S V^T = W
    assert torch.all(eigens.S_WC[:-1] >= eigens.S_WC[1:])  # the largest (ipm) or smallest (kpm), in order
    kept = full.S_WC[:r] if method == "ipm" else full.S_WC[-r:]
    torch.testing.assert_close(eigens.S_WC, kept, rtol=0, atol=0)


def test_transform_without_preprocessing_is_refused_untouched():
    torch.manual_seed(0)
    model = MLP(12)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=r"run fxlora\.preprocess_corda\(model, config, run_model\) on the model first"):
        fxlora.transform(model, configs(MLP_TARGETS)[1])
    assert_same_state(model, before)


def test_a_failing_transform_puts_weights_and_decompositions_back():
    torch.manual_seed(0)
    model = MLP(12)
    _, ours = configs(MLP_TARGETS)
    fxlora.preprocess_corda(model, ours, run_model=mlp_runner(model))
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=r"seq\.2|Linear.eigens.S_WC has shape \(4,\), rank 2 needs \(2,\)"):
        fxlora.transform(model, ours.replace(rank_pattern={"seq.2": 2}))  # seq.0 is initialised first
    assert_same_state(model, before)
    assert model.seq[0].eigens.S_WC.shape == (4,) and model.seq[2].eigens.S_WC.shape == (4,)
    fxlora.transform(model, ours)  # what was put back still works


@pytest.mark.parametrize(
    "make, targets, runner, match",
    [
        (ConvNet2d, ["conv1"], None, "CorDA adapts nn.Linear and transformers Conv1D layers only"),
        (lambda: MLP(12), ["seq.4"], mlp_runner, r"CorDA needs r <= min\(out, in\) = 2"),
        (lambda: MLP(12), MLP_TARGETS, lambda m: (lambda: m.seq[0](torch.randn(4, 20))), r"did not call the target\(s\) \['seq.2'\]"),
        (lambda: MLP(12), MLP_TARGETS, None, "needs run_model"),
        (lambda: MLP(12), MLP_TARGETS, lambda m: (lambda: m(torch.zeros(4, 20))), "non-finite values"),
    ],
)
def test_bad_preprocessing_is_refused_untouched(make, targets, runner, match):
    torch.manual_seed(0)
    model = make()
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=match):
        fxlora.preprocess_corda(model, configs(targets)[1], run_model=runner(model) if runner else None)
    assert_same_state(model, before)
    assert not any(hasattr(m, "eigens") or m._forward_hooks for m in model.modules())


def test_preprocessing_keeps_the_train_mode_and_refuses_an_adapted_model():
    torch.manual_seed(0)
    model = MLP(12).train()
    fxlora.preprocess_corda(model, configs(MLP_TARGETS)[1], run_model=mlp_runner(model))
    assert model.training  # PEFT leaves it in eval mode
    adapted = fxlora.transform(MLP(12), LoraConfig(target_modules=MLP_TARGETS))
    with pytest.raises(ValueError, match="before fxlora.transform"):
        fxlora.preprocess_corda(adapted.model, configs(MLP_TARGETS)[1], run_model=lambda: None)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"corda_config": {"corda_method": "fast"}}, ValueError, "corda_method must be 'ipm' or 'kpm'"),
        ({"corda_config": 3}, TypeError, "corda_config must be a CordaConfig"),
        ({"corda_config": {"cache": "x"}}, ValueError, r"unknown key\(s\) \['cache'\]"),
    ],
)
def test_bad_settings_are_refused_by_the_config(kw, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(target_modules=["a"], init_lora_weights="corda", **kw)


def test_corda_without_settings_takes_peft_default():
    with pytest.warns(UserWarning, match="using the default CordaConfig"):
        config = LoraConfig(target_modules=["a"], init_lora_weights="corda")
    assert config.corda_config == CordaConfig() and config.to_dict()["corda_config"]["corda_method"] == "ipm"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_equal_peft(dtype):
    torch.manual_seed(0)
    base = MLP(12).to(dtype)

    def runner(model):
        data = [torch.randn(16, 20, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(3)]
        return lambda: [model(x) for x in data]

    (pb, pc), (fb, fc) = preprocessed(base, MLP_TARGETS, runner)
    assert_same_state_as_peft(peft.get_peft_model(pb, pc), fxlora.transform(fb, fc))
