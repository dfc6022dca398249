"""The quantized_linear kind: LoRA on torchao (int8, int4, NF4) and bitsandbytes (LLM.int8) bases
on CPU, with peft 0.21.2 as the oracle for targets, counts, outputs, training and files, and the
merge policy (dequantize, add, requantize; unmerge puts the original weight back) checked against
PEFT's merge where PEFT's runs, and against the same requantization done by hand where it does not
(PEFT's bitsandbytes int8 merge fails on CPU)."""

import copy
import types
import warnings

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.errors import MergeError
from fxlora.kinds import kind_of
from fxlora.kinds.quantized import quantization_of, requantize_with
from tests.models import row_by_row

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
tq = pytest.importorskip("torchao.quantization")


# ---------------------------------------------------------------- bases
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval().train()


def _linears(model: nn.Module, names) -> list[nn.Linear]:
    return [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names]


def int8(model, names):
    config = tq.Int8WeightOnlyConfig()
    tq.quantize_(model, config, filter_fn=lambda m, n: n.rsplit(".", 1)[-1] in names)
    return config


def int4(model, names):
    config = tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(16))
    tq.quantize_(model, config, filter_fn=lambda m, n: n.rsplit(".", 1)[-1] in names)
    return config


def nf4(model, names):
    for m in _linears(model, names):
        m.weight = nn.Parameter(tq.to_nf4(m.weight.detach(), 16, 8), requires_grad=False)
    return None


def bnb8(model, names):
    bnb = pytest.importorskip("bitsandbytes")
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in names:
            new = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=m.bias is not None, has_fp16_weights=False)
            new.load_state_dict(m.state_dict())
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, new.to("cpu"))
    return None


def bnb4(model, names):
    bnb = pytest.importorskip("bitsandbytes")
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in names:
            new = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=torch.float32, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(m.weight.data.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
            if m.bias is not None:
                new.bias = nn.Parameter(m.bias.data.clone())
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, new.to("cpu"))
    return None


QUANTS = {"int8": int8, "int4": int4, "nf4": nf4, "bnb8": bnb8, "bnb4": bnb4}
MODELS = {"mlp": (mlp, ["0", "2"]), "llama": (llama, ["q_proj", "v_proj"])}


def inputs(model_name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 32, generator=g) if model_name == "mlp" else torch.randint(0, 64, (3, 8), generator=g)


def out(model, x):
    y = model(x)
    return y.logits if hasattr(y, "logits") else y


def base(quant: str, model_name: str):
    """A freshly quantized base (quantizing is deterministic: two calls give equal models; NF4
    tensors cannot be deep-copied with their block sizes, so no copies are made) and its config."""
    make, targets = MODELS[model_name]
    model = make()
    config = QUANTS[quant](model, targets)
    return model, config


def pair(quant: str, model_name: str, seed: int = 2, **options):
    """(PEFT model, fxlora model, torchao config) on equal quantized bases, seeded alike."""
    targets = MODELS[model_name][1]
    theirs_base, config = base(quant, model_name)
    if config is not None:  # what PEFT reads to requantize (transformers' TorchAoConfig provides it)
        theirs_base.hf_quantizer = types.SimpleNamespace(quantization_config=types.SimpleNamespace(get_apply_tensor_subclass=lambda: config))
    lora = dict(target_modules=targets, r=4, init_lora_weights=False, **options)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(theirs_base, peft.LoraConfig(**lora))
    ours_base = base(quant, model_name)[0]
    torch.manual_seed(seed)
    ours = fxlora.transform(ours_base, LoraConfig(**lora))
    return theirs, ours, config


CASES = [(q, m) for q in QUANTS for m in MODELS]


# ---------------------------------------------------------------- forward, training, files
@pytest.mark.parametrize("quant,model_name", CASES)
def test_targets_count_and_outputs_equal_peft(quant, model_name):
    theirs, ours, _ = pair(quant, model_name)
    assert ours.targeted_module_names == theirs.targeted_module_names
    for name in ours.targeted_module_names:
        layer = ours.model.get_submodule(name)
        assert kind_of(layer).name == "quantized_linear" and quantization_of(layer) is not None
        assert layer.lora_A["default"].weight.dtype == torch.float32  # the compute dtype, as PEFT's
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    x = inputs(model_name)
    y = out(ours, x)
    assert torch.equal(y, out(theirs, x))  # the same ops run: bit for bit
    with ours.disable_adapter():
        assert not torch.allclose(out(ours, x), y)


@pytest.mark.parametrize("quant,model_name", CASES)
def test_a_training_step_equals_peft(quant, model_name):
    theirs, ours, _ = pair(quant, model_name)
    x = inputs(model_name)
    losses = []
    for model in (theirs, ours):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loss = out(model, x).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    theirs_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(theirs_grads) == sorted(ours_grads)
    for name, grad in ours_grads.items():
        assert torch.equal(grad, theirs_grads[name]), name
    assert torch.equal(out(ours, x), out(theirs, x))
    for name, layer in ours.model.named_modules():
        if quantization_of(layer) is not None:
            assert not layer.weight.requires_grad and layer.weight.grad is None


@pytest.mark.parametrize("quant", ["int8", "nf4", "bnb8", "bnb4"])
def test_adapter_files_load_both_ways(quant, tmp_path):
    theirs, ours, _ = pair(quant, "mlp")
    x = inputs("mlp")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(base(quant, "mlp")[0], tmp_path / "ours")
        in_ours = fxlora.LoraModel.from_pretrained(base(quant, "mlp")[0], tmp_path / "theirs")
    for model in (theirs, ours, in_peft, in_ours):  # one mode for all: bitsandbytes computes differently in eval
        model.train()  # (and its 4-bit CPU eval path fails on these shapes); no dropout, so train is deterministic
    assert torch.equal(in_peft(x), ours(x))
    assert torch.equal(in_ours(x), theirs(x))


def test_mixed_batch_rows_equal_each_adapter_alone():
    _, ours, _ = pair("int8", "mlp")
    torch.manual_seed(5)
    ours.add_adapter("other", LoraConfig(target_modules=["0", "2"], r=2, init_lora_weights=False))
    x = torch.randn(4, 32)
    names = ["default", "other", "__base__", "other"]
    mixed = ours(x, adapter_names=names)
    assert torch.equal(mixed, row_by_row(ours, x, names)) or torch.allclose(mixed, row_by_row(ours, x, names), atol=1e-6)


# ---------------------------------------------------------------- merging
def _dense(layer):
    return quantization_of(layer).dense(layer)


@pytest.mark.parametrize("quant,model_name", [("int8", "mlp"), ("int4", "mlp"), ("nf4", "mlp"), ("int8", "llama"), ("nf4", "llama")])
def test_merge_requantizes_as_peft_does_and_unmerge_restores_the_original_bit_for_bit(quant, model_name):
    theirs, ours, config = pair(quant, model_name)
    if config is not None:
        assert requantize_with(ours.model, config) == [n for n in ours.targeted_module_names]
    x = inputs(model_name)
    unmerged = out(ours, x)
    originals = {n: ours.model.get_submodule(n).weight for n in ours.targeted_module_names}
    ours.merge_adapter()
    if quant == "nf4":  # PEFT treats an NF4Tensor weight as a plain one; its merge of it is checked below
        expected = {}
        for n in ours.targeted_module_names:
            layer, theirs_layer = ours.model.get_submodule(n), theirs.base_model.model.get_submodule(n)
            delta = theirs_layer.get_delta_weight("default")
            w = originals[n]
            expected[n] = tq.to_nf4((w.get_original_weight() + delta).to(w.dtype), w.block_size, w.scaler_block_size).get_original_weight()
    else:
        theirs.merge_adapter()
        expected = {n: theirs.base_model.model.get_submodule(n).base_layer.weight.dequantize() for n in ours.targeted_module_names}
    for name in ours.targeted_module_names:
        layer = ours.model.get_submodule(name)
        assert type(layer.weight) is type(originals[name]) and layer.weight is not originals[name]
        assert torch.equal(_dense(layer), expected[name]), name
    merged = out(ours, x)
    with ours.disable_adapter():
        plain = out(ours, x)
    error = (merged - unmerged).abs().max()
    assert error > 0  # requantizing rounds: the merge is not exact ...
    assert error < (plain - unmerged).abs().max() / 2  # ... but close: far closer than the base without the adapter
    ours.unmerge_adapter()
    for name, weight in originals.items():
        assert ours.model.get_submodule(name).weight is weight  # the original quantized tensor itself
    assert torch.equal(out(ours, x), unmerged)


def _bnb_requantized(layer, dense):
    bnb = pytest.importorskip("bitsandbytes")
    if type(layer).__name__ == "Linear8bitLt":
        return bnb.nn.Int8Params(dense, requires_grad=False, has_fp16_weights=False).to("cpu")
    w = layer.weight
    return bnb.nn.Params4bit(dense, requires_grad=False, quant_type=w.quant_type, blocksize=w.blocksize, compress_statistics=w.compress_statistics).to("cpu")


@pytest.mark.parametrize("quant", ["bnb8", "bnb4"])
def test_bnb_merge_is_the_requantized_sum_and_unmerge_restores_it(quant):
    """PEFT's Linear8bitLt merge fails on CPU ('result type Float can't be cast to ... Char');
    the reference is the same requantization done by hand: Int8Params / Params4bit(dequantized + delta)."""
    _, ours, _ = pair(quant, "mlp")
    x = inputs("mlp")
    unmerged = ours(x)
    layers = {n: ours.model.get_submodule(n) for n in ours.targeted_module_names}
    originals = {n: (m.weight, m.weight.data.clone(), _dense(m)) for n, m in layers.items()}
    deltas = {n: fxlora.core.delta.delta_weight(m, "default") for n, m in layers.items()}
    ours.merge_adapter()
    for name, layer in layers.items():
        expected = _bnb_requantized(layer, originals[name][2] + deltas[name])
        assert torch.equal(layer.weight.data, expected.data), name
    assert not torch.equal(ours(x), unmerged)
    with ours.disable_adapter():
        plain = ours(x)
    # requantizing rounds again; at 4 bits the error is of the order of a small update itself
    assert (ours(x) - unmerged).abs().max() < (plain - unmerged).abs().max() / (2 if quant == "bnb8" else 1)
    ours.unmerge_adapter()
    for name, layer in layers.items():
        assert layer.weight is originals[name][0] and torch.equal(layer.weight.data, originals[name][1])
    assert torch.equal(ours(x), unmerged)


def test_merge_and_unload_leaves_a_quantized_model_with_the_merged_weights():
    _, ours, config = pair("int8", "mlp")
    requantize_with(ours.model, config)
    x = inputs("mlp")
    adapted = ours(x)
    plain = ours.merge_and_unload()
    assert isinstance(plain[0], nn.Linear) and type(plain[0].weight).__name__ == "Int8Tensor"
    assert torch.allclose(plain(x), adapted, atol=0.05)


def test_torchao_merge_without_a_declared_config_is_refused_and_changes_nothing():
    _, ours, _ = pair("int8", "mlp")
    x = inputs("mlp")
    before = ours(x)
    weights = [ours.model.get_submodule(n).weight for n in ours.targeted_module_names]
    with pytest.raises(MergeError, match=r"torchao Int8Tensor.*requantize_with.*save_merged"):
        ours.merge_adapter()
    assert ours.merged_adapters == []
    assert [ours.model.get_submodule(n).weight for n in ours.targeted_module_names] == weights
    assert torch.equal(ours(x), before)


def test_a_wrong_declared_config_is_refused_and_changes_nothing():
    _, ours, _ = pair("int4", "mlp")
    requantize_with(ours.model, tq.Int8WeightOnlyConfig())
    x = inputs("mlp")
    before = ours(x)
    with pytest.raises(TypeError, match="IntxUnpackedToInt8Tensor"):
        ours.merge_adapter()
    assert ours.merged_adapters == [] and torch.equal(ours(x), before)


def test_export_holds_the_dequantized_merged_weights_without_a_config():
    _, ours, _ = pair("int8", "mlp")
    state = ours.merged_state_dict() if hasattr(ours, "merged_state_dict") else fxlora.io.export.merged_state_dict(ours, ["default"])
    for name in ours.targeted_module_names:
        layer = ours.model.get_submodule(name)
        expected = _dense(layer) + fxlora.core.delta.delta_weight(layer, "default")
        assert type(state[f"{name}.weight"]) is torch.Tensor and torch.equal(state[f"{name}.weight"], expected)


# ---------------------------------------------------------------- refusals
def test_dora_on_a_quantized_base_is_refused():
    model, _ = base("int8", "mlp")
    with pytest.raises((ValueError, TypeError), match="quantized"):
        fxlora.transform(model, LoraConfig(target_modules=["0"], r=4, use_dora=True))
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_weight_rewriting_inits_are_refused():
    model, _ = base("int8", "mlp")
    with pytest.raises(ValueError, match="pissa"):
        fxlora.transform(model, LoraConfig(target_modules=["0"], r=4, init_lora_weights="pissa"))
    assert not any("lora_" in n for n, _ in model.named_parameters())


# ---------------------------------------------------------------- torch.compile
def test_compiled_int8_model_equals_eager():
    _, ours, _ = pair("int8", "mlp")
    x = inputs("mlp")
    eager = ours(x)
    compiled = torch.compile(ours, backend="aot_eager")
    assert torch.allclose(compiled(x), eager, atol=1e-6)
