"""init_lora_weights='loftq' against peft 0.21.2: the same quantized base weights and adapter
tensors bit for bit, the same outputs, files both ways; the quantizers against bitsandbytes'; the
properties LoftQ promises; refusals that leave the model as it was.

PEFT's ``loftq_init`` computes on "cuda" (or "xpu") only. The oracle here is PEFT's own function
with that one line pointed at the CPU (its source is compiled with ``compute_device = "cpu"``),
quantizing with bitsandbytes' CPU kernels: the same algorithm PEFT runs on a GPU. One exception:
bitsandbytes' compiled CPU kernel that dequantizes NF4 reads the blocks wrongly for rows shorter
than a block (64; it then disagrees with bitsandbytes' own quantizer, its pure-torch reference and
its CUDA kernel), so the oracle dequantizes NF4 by the format's definition (`flat_dequantize_4bit`:
level of each 4-bit code times its block's absmax, over the flattened tensor)."""

import copy
import inspect

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxlora
from fxlora import LoftQConfig, LoraConfig
from fxlora.kinds.inits_loftq import LoftQ, int8_round_trip, loftq_factors, nf4_round_trip
from models import ConvNet2d, MLP, assert_same_state, assert_same_state_as_peft, load_crosswise, save_both_trained, state_snapshot
from zoo import TRANSFORMERS, text_inputs

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
MLP_TARGETS = ["seq.0", "seq.2"]


def peft_loftq_on_cpu():
    import peft.utils.loftq_utils as loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init)
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert source.count(line) == 1, "peft's loftq_init changed: update the oracle"
    namespace = dict(vars(loftq_utils))
    exec(compile(source.replace(line, 'compute_device = "cpu"'), loftq_utils.__file__, "exec"), namespace)
    return namespace["loftq_init"]


def flat_dequantize_4bit(packed, state):
    """bitsandbytes' NF4 format decoded: two codes a byte (high nibble first), in blocks of
    ``state.blocksize`` over the flattened tensor, each code's level times its block's absmax."""
    codes = packed.view(torch.uint8).reshape(-1)
    codes = torch.stack([codes >> 4, codes & 0xF], dim=1).reshape(-1)[: state.shape.numel()].long()
    values = state.code[codes] * state.absmax.repeat_interleave(state.blocksize)[: codes.numel()]
    return values.reshape(state.shape).to(state.dtype)


@pytest.fixture
def peft_on_cpu(monkeypatch):
    import peft.tuners.lora.layer as layer

    monkeypatch.setattr(layer, "loftq_init", peft_loftq_on_cpu())
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", flat_dequantize_4bit)


def test_the_oracle_decodes_as_bitsandbytes_where_its_cpu_kernel_is_right():
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    x = torch.randn(12, 128)  # rows of whole blocks
    packed, state = quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(flat_dequantize_4bit(packed, state), dequantize_4bit(packed, state))


def configs(targets, bits, iters, **kw):
    cfg = dict(target_modules=targets, r=4, lora_alpha=4, init_lora_weights="loftq", **kw)
    return peft.LoraConfig(**cfg, loftq_config=peft.LoftQConfig(loftq_bits=bits, loftq_iter=iters)), LoraConfig(
        **cfg, loftq_config=LoftQConfig(loftq_bits=bits, loftq_iter=iters)
    )


def both(base, targets, bits, iters, **kw):
    theirs, ours = configs(targets, bits, iters, **kw)
    return peft.get_peft_model(copy.deepcopy(base), theirs), fxlora.transform(copy.deepcopy(base), ours)



@pytest.mark.parametrize("bits, iters", [(4, 1), (4, 3), (8, 1), (8, 2)])
def test_mlp_equals_peft_bit_for_bit(peft_on_cpu, bits, iters):
    torch.manual_seed(0)
    base = MLP(12)
    pm, fm = both(base, MLP_TARGETS, bits, iters)
    assert_same_state_as_peft(pm, fm)  # quantized base weights and adapter tensors
    assert not torch.equal(fm.get_submodule("seq.0").weight, base.seq[0].weight)
    x = torch.randn(3, 20)
    assert torch.equal(fm(x), pm(x))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_tiny_llama_equals_peft(peft_on_cpu, targets):
    base = TRANSFORMERS["llama"].build(seed=0)
    pm, fm = both(base, targets, 4, 2)
    assert_same_state_as_peft(pm, fm)
    inputs = text_inputs(base)
    assert torch.equal(fm(**inputs).logits, pm(**inputs).logits)


def test_files_load_both_ways(peft_on_cpu, tmp_path):
    # the file keeps init_lora_weights='loftq': loading quantizes the base again (as PEFT does)
    torch.manual_seed(0)
    base = MLP(12)
    pm, fm = both(base, MLP_TARGETS, 4, 1)
    save_both_trained(tmp_path, pm, fm)
    x = torch.randn(3, 20)
    ours, theirs = load_crosswise(tmp_path, copy.deepcopy(base), copy.deepcopy(base))
    assert torch.equal(ours(x), pm(x)) and torch.equal(theirs(x), fm(x))
    assert ours.peft_config["default"].loftq_config == {"loftq_bits": 4, "loftq_iter": 1}


def test_conv1d_is_quantized_as_its_out_in_matrix():
    # PEFT gives factors of the wrong shape there (it decomposes the stored (in, out) weight)
    base = TRANSFORMERS["gpt2"].build(seed=0)
    fm = fxlora.transform(copy.deepcopy(base), configs(["c_fc"], 4, 1, fan_in_fan_out=True)[1])
    layer = fm.get_submodule("transformer.h.0.mlp.c_fc")
    original = base.transformer.h[0].mlp.c_fc.weight  # (in, out)
    a, b, quantized = loftq_factors(original.T.contiguous(), 4, LoftQ(4, 1))
    assert torch.equal(layer.weight, quantized.T) and torch.equal(layer.lora_A["default"].weight, a)
    assert torch.equal(layer.lora_B["default"].weight, b)


@pytest.mark.parametrize("shape", [(20, 12), (7, 9), (1, 64), (3, 100)])
def test_quantizers_equal_bitsandbytes(shape):
    from bitsandbytes.functional import int8_vectorwise_dequant, quantize_4bit

    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 3
    packed, state = quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(nf4_round_trip(x), flat_dequantize_4bit(packed, state))
    int8 = bnb.nn.Int8Params(x.clone(), requires_grad=False).to("cpu")
    assert torch.equal(int8_round_trip(x), int8_vectorwise_dequant(int8.data, int8.SCB))


def test_a_zero_block_and_a_zero_row_stay_zero():
    x = torch.zeros(2, 64)
    x[1, 3] = 2.0
    assert torch.equal(nf4_round_trip(x), x) and torch.equal(int8_round_trip(x), x)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(2, 12), n_in=st.integers(2, 12), bits=st.sampled_from([4, 8]), seed=st.integers(0, 99))
def test_quantizing_twice_changes_nothing(out, n_in, bits, seed):
    x = torch.randn(out, n_in, generator=torch.Generator().manual_seed(seed))
    once = (nf4_round_trip if bits == 4 else int8_round_trip)(x)
    assert torch.equal((nf4_round_trip if bits == 4 else int8_round_trip)(once), once)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(4, 16), n_in=st.integers(4, 16), data=st.data(), bits=st.sampled_from([4, 8]))
def test_the_adapter_is_the_best_rank_r_fix_of_the_quantization_error(out, n_in, data, bits):
    r = data.draw(st.integers(1, min(out, n_in)))
    weight = torch.randn(out, n_in, generator=torch.Generator().manual_seed(out * 17 + n_in))
    a, b, quantized = loftq_factors(weight, r, LoftQ(bits, 1))
    assert a.shape == (r, n_in) and b.shape == (out, r)
    assert torch.equal(quantized, (nf4_round_trip if bits == 4 else int8_round_trip)(weight))
    tail = torch.linalg.svdvals(weight - quantized)[r:]  # Eckart-Young: what a rank-r fix leaves
    left = torch.linalg.matrix_norm(weight - quantized - b @ a)
    torch.testing.assert_close(left, tail.norm(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "make, targets, kw, error, match",
    [
        (ConvNet2d, ["conv1"], {}, ValueError, "nn.Linear and transformers Conv1D layers only, not Conv2d"),
        (lambda: MLP(12), ["seq.4"], {}, ValueError, r"init_lora_weights='loftq' needs r <= min\(out, in\) = 2"),
    ],
)
def test_unsupported_layers_are_refused_untouched(make, targets, kw, error, match):
    # PEFT crashes on a Conv (its conv layers call loftq_init with a missing argument)
    torch.manual_seed(0)
    model = make()
    before = state_snapshot(model)
    with pytest.raises(error, match=match):
        fxlora.transform(model, configs(targets, 4, 1, **kw)[1])
    assert_same_state(model, before)


def test_a_failing_transform_puts_the_quantized_weights_back():
    torch.manual_seed(0)
    model = MLP(12)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="needs r <= min"):  # seq.0 and seq.2 are quantized first
        fxlora.transform(model, configs(["seq.0", "seq.2", "seq.4"], 4, 1)[1])
    assert_same_state(model, before)


@pytest.mark.parametrize(
    "kw, error, match",
    [
        ({"init_lora_weights": "loftq"}, ValueError, "init_lora_weights='loftq' needs loftq_config"),
        ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 2}}, ValueError, "loftq_bits must be 4 .NF4. or 8"),
        ({"init_lora_weights": "loftq", "loftq_config": {"loftq_iter": 0}}, ValueError, "loftq_iter must be an int >= 1"),
        ({"init_lora_weights": "loftq", "loftq_config": {"bits": 4}}, ValueError, r"unknown key\(s\) \['bits'\]"),
        ({"init_lora_weights": "loftq", "loftq_config": 4}, TypeError, "loftq_config must be a LoftQConfig"),
    ],
)
def test_bad_settings_are_refused_by_the_config(kw, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(target_modules=["a"], **kw)


def test_settings_are_stored_as_peft_stores_them():
    config = LoraConfig(target_modules=["a"], init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=8))
    assert config.loftq_config == peft.LoraConfig(
        target_modules=["a"], init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=8)
    ).loftq_config == {"loftq_bits": 8, "loftq_iter": 1}
    with pytest.warns(UserWarning, match="loftq_config is ignored"):  # as PEFT: cleared for another init
        assert LoraConfig(target_modules=["a"], loftq_config={"loftq_bits": 4}).loftq_config == {}


def test_loftq_adapters_are_not_converted_to_plain_lora(peft_on_cpu, tmp_path):
    torch.manual_seed(0)
    fm = fxlora.transform(MLP(12), configs(MLP_TARGETS, 4, 1)[1])
    fm.save_pretrained(tmp_path / "init")
    with pytest.raises(ValueError, match="base weights are quantized"):
        fm.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_equal_peft(peft_on_cpu, dtype):
    # PEFT rounds the factors through the base dtype and keeps them in float32
    torch.manual_seed(0)
    pm, fm = both(MLP(12).to(dtype), MLP_TARGETS, 4, 2)
    assert_same_state_as_peft(pm, fm)
    assert fm.seq[0].lora_A["default"].weight.dtype == torch.float32 and fm.seq[0].weight.dtype == dtype
