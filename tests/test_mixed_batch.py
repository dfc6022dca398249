"""Mixed batches: each row computes with its own adapter, in one vectorised forward."""

import copy

import pytest
import torch

import fxlora
from fxlora import LoraConfig
from models import ConvNet2d, EmbeddingModel, Mixed, copy_peft_adapter_weights

peft = pytest.importorskip("peft")

CASES = [
    (Mixed, dict(target_modules=["stem", "blocks.1.0", "blocks.0.fc2"]), dict(target_modules=["stem", "head"], r=4, lora_alpha=2), lambda n: torch.randn(n, 6)),
    (ConvNet2d, dict(target_modules=["conv1", "conv3"], modules_to_save=["head"]), dict(target_modules=["conv2"], r=2, modules_to_save=["head"]), lambda n: torch.randn(n, 3, 8, 8)),
    (EmbeddingModel, dict(target_modules=["emb", "proj"]), dict(target_modules=["emb"], r=2), lambda n: torch.randint(0, 50, (n, 5))),
]


def build(make, cfg_a, cfg_b, policy):
    torch.manual_seed(0)
    base = make()
    model = fxlora.transform(copy.deepcopy(base), LoraConfig(**cfg_a, init_lora_weights=False), trace=policy)
    model.add_adapter("b", LoraConfig(**cfg_b, init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p))
    model.eval()
    return base, model


MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("policy", ["auto", "eager"])
@pytest.mark.parametrize("make, cfg_a, cfg_b, make_x", CASES, ids=["mixed", "conv-saved", "embedding"])
def test_each_row_gets_its_adapter(policy, make, cfg_a, cfg_b, make_x, mode):
    base, model = build(make, cfg_a, cfg_b, policy)
    names = ["b", "default", "__base__", "b", "default"]
    x = make_x(len(names))
    with MODES[mode]():  # without autograd, serving reuses stacked weights between calls
        model(x, adapter_names=names[::-1])
        out = model(x, adapter_names=names).clone()
    expected = []
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected.append(model(x[i : i + 1]))
        else:
            model.set_adapter(name)
            expected.append(model(x[i : i + 1]))
    model.set_adapter("default")
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-6)
    # the gates are back to the per-adapter state afterwards
    torch.testing.assert_close(model(x), torch.cat([model(x[i : i + 1]) for i in range(len(names))]), rtol=1e-5, atol=1e-6)
    assert model.get_submodule(model.targeted_module_names[0]).lora_gates.scale.default.dim() == 0


@pytest.mark.parametrize("make, cfg_a, cfg_b, make_x", CASES[:2], ids=["mixed", "conv-saved"])
def test_matches_peft_mixed_batch(make, cfg_a, cfg_b, make_x):
    torch.manual_seed(0)
    base = make()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg_a, init_lora_weights=False))
    pm.add_adapter("b", peft.LoraConfig(**cfg_b, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p))
    fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**cfg_a, init_lora_weights=False))
    fm.add_adapter("b", LoraConfig(**cfg_b, init_lora_weights=False))
    copy_peft_adapter_weights(pm, fm)
    pm.eval(), fm.eval()
    names = ["default", "b", "__base__", "b"]
    x = make_x(4)
    torch.testing.assert_close(fm(x, adapter_names=names), pm(x, adapter_names=names), rtol=1e-5, atol=1e-6)


def test_errors_and_gates_restored_after_failure():
    _, model = build(*CASES[0][:3], "auto")
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match="unknown adapter name"):
        model(x, adapter_names=["default", "zzz", "b"])
    with pytest.raises(ValueError, match="3 rows"):
        model(x, adapter_names=["default", "b"])
    with pytest.raises(TypeError, match="one adapter name per row"):
        model(x, adapter_names="default")
    gates = model.get_submodule("stem").lora_gates
    with pytest.raises(RuntimeError):
        model(torch.randn(3, 7), adapter_names=["b", "b", "b"])  # shape error inside the model
    assert gates.scale.b.dim() == 0 and gates.scale.default.item() == 1.0 and gates.scale.b.item() == 0.0


def test_disabled_model_ignores_adapter_names():
    base, model = build(*CASES[0][:3], "auto")
    x = torch.randn(2, 6)
    with model.disable_adapter():
        torch.testing.assert_close(model(x, adapter_names=["b", "default"]), base.eval()(x))


def test_generate_with_adapter_names_matches_per_row_generation():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = fxlora.transform(transformers.LlamaForCausalLM(config), LoraConfig(init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj", "k_proj", "gate_proj"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(20)
    model.eval()
    ids = torch.randint(0, 64, (3, 5))
    names = ["b", "__base__", "default"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                row = model.generate(input_ids=ids[i : i + 1], **kwargs)
        else:
            model.set_adapter(name)
            row = model.generate(input_ids=ids[i : i + 1], **kwargs)
        n = row.shape[1]  # a row that hit the end-of-sequence token is padded in the batch
        assert torch.equal(out[i, :n], row[0]) and bool((out[i, n:] == 0).all()), name
    model.set_adapter("default")
    beams = model.generate(input_ids=ids, adapter_names=names, num_beams=2, num_return_sequences=2, **kwargs)
    assert beams.shape[0] == 6
