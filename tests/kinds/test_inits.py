"""init_lora_weights 'pissa', 'pissa_niter_K', 'olora', 'orthogonal' against peft 0.21.2: the same
adapter tensors and the same changed base weights bit for bit (same seed), the same outputs,
files both ways; the properties each init promises; refusals that leave the model as it was."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxlora
from fxlora import LoraConfig
from fxlora.kinds.weight_inits import matrix_inits, orthogonal_pair
from models import ConvNet2d, EmbeddingModel, MLP, assert_same_state_as_peft, load_crosswise, peft_key_to_fxlora, save_both_trained
from zoo import TRANSFORMERS, text_inputs

peft = pytest.importorskip("peft")

INITS = ["pissa", "pissa_niter_2", "olora", "orthogonal"]
MLP_TARGETS = ["seq.0", "seq.2"]


def both(base, init, targets, seed=1, **kw):
    cfg = dict(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=init, **kw)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    torch.manual_seed(seed)
    fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**cfg))
    return pm, fm



@pytest.mark.parametrize("init", INITS)
def test_linear_equals_peft_bit_for_bit(init):
    torch.manual_seed(0)
    base = MLP(12)
    pm, fm = both(base, init, MLP_TARGETS)
    assert_same_state_as_peft(pm, fm)  # adapter tensors and base weights
    changed = not torch.equal(fm.get_submodule("seq.0").weight, base.seq[0].weight)
    assert changed == (init != "orthogonal")
    x = torch.randn(3, 20)
    assert torch.equal(fm(x), pm(x))
    torch.testing.assert_close(fm(x), base(x), rtol=1e-5, atol=1e-5)  # starts as the base model


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_equal_peft(init, dtype):
    # PEFT rounds the factors through the base dtype (and keeps them in float32)
    torch.manual_seed(0)
    pm, fm = both(MLP(12).to(dtype), init, MLP_TARGETS)
    assert_same_state_as_peft(pm, fm)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "orthogonal"])
def test_gpt2_conv1d_equals_peft(init):
    base = TRANSFORMERS["gpt2"].build(seed=0).eval()
    pm, fm = both(base, init, ["c_attn", "c_fc"])
    assert_same_state_as_peft(pm, fm)
    inputs = text_inputs(base)
    torch.testing.assert_close(fm(**inputs).logits, pm(**inputs).logits, rtol=0, atol=0)


def test_olora_on_conv1d_uses_the_out_in_matrix():
    # PEFT takes the QR of the stored (in, out) weight there; fxlora of the (out, in) matrix
    base = TRANSFORMERS["gpt2"].build(seed=0).eval()
    torch.manual_seed(1)
    fm = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=["c_attn"], r=4, init_lora_weights="olora"))
    layer = fm.get_submodule("transformer.h.0.attn.c_attn")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(b.T @ b, torch.eye(4), rtol=1e-5, atol=1e-5)  # Q's columns
    assert torch.equal(torch.triu(a[:, :4]), a[:, :4])  # R's rows
    original = base.transformer.h[0].attn.c_attn.weight
    torch.testing.assert_close(layer.weight + (b @ a).T * layer._fxlora.adapters["default"].scaling, original, rtol=1e-5, atol=1e-5)
    inputs = text_inputs(base)
    torch.testing.assert_close(fm(**inputs).logits, base(**inputs).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merge_and_unload_gives_back_the_original_weights(init):
    torch.manual_seed(0)
    base = MLP(12)
    original = copy.deepcopy(base.state_dict())
    _, fm = both(base, init, MLP_TARGETS)
    merged = fm.merge_and_unload()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=1e-5, atol=1e-6)


def test_peft_files_load_both_ways_on_the_original_base(tmp_path):
    # the file keeps init_lora_weights="pissa": loading recomputes the residual from the base
    torch.manual_seed(0)
    base = MLP(12)
    pm, fm = both(base, "pissa", MLP_TARGETS)
    save_both_trained(tmp_path, pm, fm)
    x = torch.randn(3, 20)
    ours, theirs = load_crosswise(tmp_path, copy.deepcopy(base), copy.deepcopy(base))
    assert torch.equal(ours(x), pm(x)) and torch.equal(theirs(x), fm(x))


def test_second_pissa_adapter_is_taken_from_the_residual():
    torch.manual_seed(0)
    base = MLP(12)
    pm, fm = both(base, "pissa", MLP_TARGETS)
    cfg = dict(target_modules=["seq.2"], r=2, lora_alpha=4, init_lora_weights="pissa_niter_1")
    torch.manual_seed(3)
    pm.add_adapter("second", peft.LoraConfig(**cfg))
    torch.manual_seed(3)
    fm.add_adapter("second", LoraConfig(**cfg))
    assert_same_state_as_peft(pm, fm)


def test_a_failing_transform_leaves_the_base_weights_as_they_were():
    torch.manual_seed(0)
    base = MLP(12)
    before = copy.deepcopy(base.state_dict())
    # seq.0 and seq.2 get PiSSA first, then seq.4 (2 x 12) cannot take r=4
    with pytest.raises(ValueError, match=r"r <= min\(out, in\) = 2"):
        fxlora.transform(base, LoraConfig(target_modules=["seq.0", "seq.2", "seq.4"], r=4, init_lora_weights="pissa"))
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items()) and set(base.state_dict()) == set(before)


def test_a_failing_add_adapter_leaves_the_base_weights_as_they_were():
    torch.manual_seed(0)
    fm = fxlora.transform(MLP(12), LoraConfig(target_modules=["seq.0"], r=2))
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    with pytest.raises(ValueError, match="r <= min"):
        fm.add_adapter("p", LoraConfig(target_modules=["seq.2", "seq.4"], r=4, init_lora_weights="olora"))
    assert list(fm.peft_config) == ["default"]
    assert all(torch.equal(v, before[k]) for k, v in fm.state_dict().items()) and set(fm.state_dict()) == set(before)


@pytest.mark.parametrize(
    "make, targets, init, match",
    [
        (ConvNet2d, ["conv1"], "pissa", "nn.Linear and transformers Conv1D layers only, not Conv2d"),
        (EmbeddingModel, ["emb"], "olora", "not Embedding"),
        (lambda: MLP(12), MLP_TARGETS, "orthogonal", "even rank"),
    ],
)
def test_unsupported_layers_are_refused_untouched(make, targets, init, match):
    torch.manual_seed(0)
    model = make()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        fxlora.transform(model, LoraConfig(target_modules=targets, r=3, init_lora_weights=init))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and set(model.state_dict()) == set(before)


@pytest.mark.parametrize("init", ["lora_ga", "pissa_niter_", "pissa_niter_x"])
def test_other_inits_are_refused_by_the_config(init):
    with pytest.raises(ValueError, match="init_lora_weights must be .*'pissa_niter_<K>'.*not supported"):
        LoraConfig(target_modules=["a"], init_lora_weights=init)


@settings(max_examples=30, deadline=None)
@given(out=st.integers(2, 9), n_in=st.integers(2, 9), data=st.data(), init=st.sampled_from(["pissa", "pissa_niter_4", "olora"]),
       scaling=st.floats(0.1, 4.0))
def test_residual_plus_adapter_is_the_weight(out, n_in, data, init, scaling):
    r = data.draw(st.integers(1, min(out, n_in)))
    weight = torch.randn(out, n_in, generator=torch.Generator().manual_seed(out * 10 + n_in))
    a, b, residual = matrix_inits(weight, r, scaling, init)
    assert a.shape == (r, n_in) and b.shape == (out, r)
    torch.testing.assert_close(residual + scaling * b @ a, weight, rtol=1e-4, atol=1e-4)
    if init == "pissa":  # the adapter holds the principal part: the residual's norm is the tail's
        tail = torch.linalg.svdvals(weight)[r:]
        torch.testing.assert_close(torch.linalg.matrix_norm(residual), tail.norm(), rtol=1e-3, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(half=st.integers(1, 6), n_in=st.integers(1, 12), n_out=st.integers(1, 12))
def test_orthogonal_pair_starts_at_zero(half, n_in, n_out):
    a, b = orthogonal_pair(2 * half, n_in, n_out)
    assert a.shape == (2 * half, n_in) and b.shape == (n_out, 2 * half)
    torch.testing.assert_close(b @ a, torch.zeros(n_out, n_in), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- save as a plain LoRA adapter
def _perturb(model):
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(peft_key_to_fxlora(name)))) * 0.05)


def _json(path):
    import json

    return json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_gives_a_plain_lora_of_the_original_model_as_peft_does(tmp_path, init):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = MLP(12)
    pm, fm = both(base, init, MLP_TARGETS)
    pm.save_pretrained(tmp_path / "peft_init")
    fm.save_pretrained(tmp_path / "init")
    _perturb(pm), _perturb(fm)  # "training"
    pm.save_pretrained(tmp_path / "peft_lora", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    fm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    theirs = load_file(tmp_path / "peft_lora" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], v) for k, v in theirs.items())
    ours_cfg, theirs_cfg = _json(tmp_path / "lora"), _json(tmp_path / "peft_lora")
    assert (ours_cfg["r"], ours_cfg["lora_alpha"], ours_cfg["init_lora_weights"]) == (8, 16, True)
    assert (theirs_cfg["r"], theirs_cfg["lora_alpha"]) == (8, 16)
    assert _json(tmp_path / "init")["init_lora_weights"] == init  # the initial files are only read
    x = torch.randn(3, 20)
    trained = fm.eval()(x)
    plain = fxlora.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    torch.testing.assert_close(plain(x), trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(in_peft(x), trained, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain.get_submodule("seq.0").weight, base.seq[0].weight)  # the original weights


def test_conversion_keeps_each_layers_scaling_with_patterns(tmp_path):
    # PEFT refuses rslora with patterns, and leaves alpha_pattern undoubled (halving those layers)
    torch.manual_seed(0)
    base = MLP(12)
    cfg = LoraConfig(target_modules=MLP_TARGETS, r=4, lora_alpha=8, init_lora_weights="pissa", use_rslora=True,
                     rank_pattern={"seq.2": 2}, alpha_pattern={"seq.0": 3})
    fm = fxlora.transform(copy.deepcopy(base), cfg)
    fm.save_pretrained(tmp_path / "init")
    _perturb(fm)
    fm.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    x = torch.randn(3, 20)
    plain = fxlora.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    torch.testing.assert_close(plain(x), fm.eval()(x), rtol=1e-5, atol=1e-5)
    assert plain.peft_config["default"].rank_pattern == {"seq.2": 4}


def test_conversion_refusals_write_nothing(tmp_path):
    torch.manual_seed(0)
    plain = fxlora.transform(MLP(12), LoraConfig(target_modules=MLP_TARGETS, r=4))
    plain.save_pretrained(tmp_path / "init_plain")
    with pytest.raises(ValueError, match="leaves the base weights as they are"):
        plain.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init_plain")
    pissa = fxlora.transform(MLP(12), LoraConfig(target_modules=["seq.0"], r=4, init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="does not have the layers of adapter 'default'"):
        pissa.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init_plain")
    other = fxlora.transform(MLP(12), LoraConfig(target_modules=["seq.0"], r=2))
    other.save_pretrained(tmp_path / "init_r2")
    with pytest.raises(ValueError, match="not its initial state"):
        pissa.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init_r2")
    pissa.add_adapter("b", LoraConfig(target_modules=["seq.2"], r=2))
    with pytest.raises(ValueError, match="converts one adapter"):
        pissa.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init_r2")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_a_failing_load_of_a_pissa_adapter_leaves_the_base_weights(tmp_path, monkeypatch, how):
    import fxlora.model.loading as loading

    torch.manual_seed(0)
    base = MLP(12)
    fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=MLP_TARGETS, r=4, init_lora_weights="pissa")).save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    if how == "load_adapter":
        model = fxlora.transform(model, LoraConfig(target_modules=["seq.4"], r=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(*args, **kwargs):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(loading, "copy_in", broken)
    with pytest.raises(RuntimeError, match="disk went away"):
        if how == "load_adapter":
            model.load_adapter(tmp_path, "p")
        else:
            fxlora.LoraModel.from_pretrained(model, tmp_path)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(v, before[k]) for k, v in after.items())
