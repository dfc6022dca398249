"""Adapter files exchanged with peft 0.21.2, in both directions.

fxlora -> peft: an adapter saved by fxlora loads with ``peft.PeftModel.from_pretrained`` and gives
fxlora's outputs; its file holds exactly the keys and shapes peft writes for the same config.
peft -> fxlora: an adapter saved by peft loads with ``fxlora.LoraModel.from_pretrained`` and gives
peft's outputs.
"""

import copy
import os
import warnings

import pytest
import torch
from safetensors import safe_open

import fxlora
from fxlora import LoraConfig, LoraModel
from models import MLP, ConvNet1d, ConvNet2d, ConvNet3d, EmbeddingModel

peft = pytest.importorskip("peft")

WEIGHTS = "adapter_model.safetensors"


def perturb(model) -> None:
    """Distinct values for every trainable tensor (LoRA weights, copies, trained base biases)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)


def file_shapes(directory) -> dict:
    with safe_open(str(directory / WEIGHTS), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def outputs(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def exchange(tmp_path, base, kwargs, x, atol=1e-5):
    """Both directions for one base model and config; returns (fxlora model, peft model)."""
    kwargs = dict(kwargs, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**kwargs))
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
        perturb(fm), perturb(pm)
        fm.save_pretrained(tmp_path / "fx")
        pm.save_pretrained(str(tmp_path / "peft"))
        from_fx = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fx"))
        from_peft = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    fm.eval(), pm.eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs(from_fx, x), outputs(fm, x), rtol=1e-5, atol=atol)
        torch.testing.assert_close(outputs(from_peft, x), outputs(pm, x), rtol=1e-5, atol=atol)
    assert not from_peft.training and not any(p.requires_grad for p in from_peft.parameters())
    return fm, pm


CASES = [
    ("linear", lambda: MLP(16), ["seq.0", "seq.2"], ["seq.4"], lambda: torch.randn(5, 20)),
    ("conv1d", ConvNet1d, ["conv1", "conv2"], ["head"], lambda: torch.randn(2, 3, 17)),
    ("conv2d", lambda: ConvNet2d(groups=2), ["conv1", "conv2", "conv3"], None, lambda: torch.randn(2, 3, 11, 11)),
    ("conv3d", ConvNet3d, ["conv1", "conv2", "conv3"], ["head"], lambda: torch.randn(1, 2, 4, 5, 4)),
    ("embedding", EmbeddingModel, ["emb", "proj"], ["classifier"], lambda: torch.randint(0, 50, (3, 7))),
]
EXTRAS = [
    {},
    {"bias": "all"},
    {"bias": "lora_only"},
    {"lora_bias": True},
    {"r": 4, "lora_alpha": 6, "use_rslora": True, "rank_pattern": {"conv2|seq.2|proj": 2}, "alpha_pattern": {"conv1|seq.0|emb": 11}},
]


@pytest.mark.parametrize("extra", EXTRAS, ids=["plain", "bias-all", "bias-lora_only", "lora_bias", "patterns"])
@pytest.mark.parametrize("name, make, targets, saved, make_x", CASES, ids=[c[0] for c in CASES])
def test_small_models_both_ways(tmp_path, name, make, targets, saved, make_x, extra):
    if name == "embedding" and extra.get("lora_bias"):
        pytest.skip("lora_bias is not defined for embeddings (peft refuses it too)")
    torch.manual_seed(0)
    fm, pm = exchange(tmp_path, make(), dict(target_modules=targets, modules_to_save=saved, **extra), make_x())
    # fxlora writes exactly what peft writes (bias="all" includes peft's duplicate keys)
    assert file_shapes(tmp_path / "fx") == file_shapes(tmp_path / "peft")


def make_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).eval()


def make_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def test_gpt2_conv1d(tmp_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    kwargs = dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="lora_only", lora_bias=True, rank_pattern={"c_fc": 4})
    exchange(tmp_path, make_gpt2(), kwargs, torch.randint(0, 100, (2, 9)))
    assert file_shapes(tmp_path / "fx") == file_shapes(tmp_path / "peft")
    shapes = file_shapes(tmp_path / "fx")
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] == (8, 32)  # Conv1D: (in, out) weight
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"] == (96, 8)
    assert shapes["base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"] == (128, 4)


def test_llama_decoder_with_embedding_target_and_saved_head(tmp_path):
    """peft also saves the full embedding weights when an embedding is targeted; fxlora reads them."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    kwargs = dict(target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"], alpha_pattern={"v_proj": 24})
    exchange(tmp_path, make_llama(), kwargs, torch.randint(0, 64, (2, 7)))
    fx_keys, peft_keys = set(file_shapes(tmp_path / "fx")), set(file_shapes(tmp_path / "peft"))
    assert peft_keys - fx_keys == {"base_model.model.model.embed_tokens.base_layer.weight"}
    assert fx_keys <= peft_keys


def test_timm_vit(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model("test_vit", pretrained=False).eval()
    kwargs = dict(target_modules=r"blocks\.[01]\..*\.(qkv|fc1)", modules_to_save=["head"], bias="all")
    exchange(tmp_path, base, kwargs, torch.randn(1, 3, 160, 160), atol=1e-4)
    assert file_shapes(tmp_path / "fx") == file_shapes(tmp_path / "peft")


def test_several_adapters_both_ways(tmp_path):
    torch.manual_seed(0)
    base = EmbeddingModel()
    cfg_a = dict(target_modules=["emb", "proj"], init_lora_weights=False)
    cfg_b = dict(target_modules=["proj"], r=2, lora_alpha=5, modules_to_save=["classifier"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg_a))
    pm.add_adapter("b", peft.LoraConfig(**cfg_b))
    fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**cfg_a))
    fm.add_adapter("b", LoraConfig(**cfg_b))
    for model in (pm, fm):
        model.set_adapter("b")
        perturb(model)
        model.set_adapter("default")
        perturb(model)
    pm.save_pretrained(str(tmp_path / "peft"))
    fm.save_pretrained(tmp_path / "fx")
    assert sorted(os.listdir(tmp_path / "fx" / "b")) == sorted(os.listdir(tmp_path / "peft" / "b"))

    from_peft = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    from_peft.load_adapter(tmp_path / "peft" / "b", "b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_fx = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fx"))
        from_fx.load_adapter(str(tmp_path / "fx" / "b"), "b")
    ids = torch.randint(0, 50, (3, 6))
    pm.eval(), fm.eval()
    for active in ["default", "b"]:
        for model in (pm, fm, from_peft, from_fx):
            model.set_adapter(active)
        torch.testing.assert_close(from_peft(ids), pm(ids), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(from_fx(ids), fm(ids), rtol=1e-5, atol=1e-6)
