"""transformers: defaults, Conv1D, and everything a transformers model could do still working
through the returned `LoraModel` (config, generate, gradient checkpointing, tied embeddings, the
Trainer, switching the attention implementation)."""

import copy
import warnings

import pytest
import torch

import fxlora
from fxlora.runtime.forwards import GraphForward, installed_forward
from models import copy_peft_adapter_weights
from zoo import TRANSFORMERS, VOCAB, main_output, text_inputs

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def test_unknown_model_type_asks_for_targets_and_suggests_projections():
    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=32)
    model = transformers.DistilBertForSequenceClassification(config)
    with pytest.raises(ValueError, match="target_modules") as info:
        fxlora.transform(model, fxlora.LoraConfig())
    message = str(info.value)
    assert "'distilbert'" in message and all(name in message for name in ("q_lin", "k_lin", "v_lin", "out_lin"))
    assert not any(hasattr(m, "lora_A") for m in model.modules())  # nothing changed


def test_all_linear_leaves_out_the_output_embedding():
    model = TRANSFORMERS["llama"].build()
    report = fxlora.explain(model, fxlora.LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in report.targets
    assert len(report.targets) == 2 * 7  # q, k, v, o, gate, up, down per layer
    classifier = TRANSFORMERS["bert"].build()  # no output embedding: the head is a plain linear target
    assert "classifier" in fxlora.explain(classifier, fxlora.LoraConfig(target_modules="all-linear")).targets


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_conv1d_layout_per_layer_one_warning_config_untouched(fan_in_fan_out):
    base = TRANSFORMERS["gpt2"].build()
    targets = ["c_attn", "mlp.c_fc", "lm_head"]  # Conv1D layers (weight (in, out)) and one nn.Linear
    config = fxlora.LoraConfig(target_modules=targets, fan_in_fan_out=fan_in_fan_out, init_lora_weights=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fxlora.transform(copy.deepcopy(base), config)
    notes = [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]
    assert len(notes) == 1
    wrong = ["lm_head"] if fan_in_fan_out else ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    assert all(name in notes[0] for name in wrong)
    assert config.fan_in_fan_out is fan_in_fan_out and model.peft_config["default"].fan_in_fan_out is fan_in_fan_out
    assert model.get_submodule("transformer.h.0.attn.c_attn").lora_A.default.weight.shape == (8, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=targets, init_lora_weights=False)).eval()
    copy_peft_adapter_weights(reference, model)
    inputs = text_inputs(base)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_model_attributes_and_methods_reach_the_users_model():
    base = TRANSFORMERS["llama"].build()
    model = fxlora.transform(base, fxlora.LoraConfig())
    assert model.config is base.config and model.generation_config is base.generation_config
    assert model.get_input_embeddings() is base.model.embed_tokens
    assert model.device == base.device and model.can_generate()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_gradient_checkpointing_keeps_gradients_graph_and_recomputation(name, eager_fallbacks):
    base = TRANSFORMERS[name].build()
    model = fxlora.transform(base, fxlora.LoraConfig(target_modules="all-linear", init_lora_weights=False))
    model.train()
    inputs = text_inputs(base)
    attention = next(m for n, m in model.model.named_modules() if isinstance(installed_forward(m), GraphForward) and "att" in n)
    runs = []
    attention.register_forward_pre_hook(lambda *_: runs.append(1))

    def gradients():
        runs.clear()
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks in every run
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(runs)

    plain, plain_runs = gradients()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.is_gradient_checkpointing
    checkpointed, checkpointed_runs = gradients()
    assert plain_runs == 1 and checkpointed_runs == 2  # the layer really is recomputed in backward
    assert plain.keys() == checkpointed.keys() and any(".lora_" in n for n in plain)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-6)
    model.gradient_checkpointing_disable()
    again, again_runs = gradients()
    assert again_runs == 1
    assert eager_fallbacks == []


def test_tied_embeddings_stay_tied_through_training_and_reloading():
    base = TRANSFORMERS["gpt2"].build()
    assert base.lm_head.weight is base.transformer.wte.weight
    config = fxlora.LoraConfig(target_modules=["c_attn", "wte"], init_lora_weights=False)
    model = fxlora.transform(copy.deepcopy(base), config)
    assert model.lm_head.weight is model.transformer.wte.weight
    model.train()
    inputs = text_inputs(base)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)  # the tied base weight is frozen
    fresh = fxlora.transform(copy.deepcopy(base), config)
    fresh.load_state_dict(model.state_dict())
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits)


def test_hf_trainer_trains_a_few_steps(tmp_path):
    base = TRANSFORMERS["llama"].build()
    model = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(3, VOCAB, (12,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3,
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    assert trainer.state.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all(".lora_" in n for n in moved)
    assert all(".lora_B." in n or ".lora_A." in n for n in moved)


def test_switching_the_attention_implementation_retraces(eager_fallbacks):
    base = TRANSFORMERS["llama"].build()
    config = fxlora.LoraConfig(init_lora_weights=False)
    model = fxlora.transform(copy.deepcopy(base), config).eval()
    twin = fxlora.transform(copy.deepcopy(base), config, trace="eager").eval()  # no graph at all
    twin.load_state_dict(model.state_dict())
    inputs = text_inputs(base)
    root = installed_forward(model.get_submodule("model.layers.0.self_attn"))
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        twin.set_attn_implementation(implementation)
        with torch.no_grad():
            torch.testing.assert_close(main_output(model(**inputs)), main_output(twin(**inputs)), rtol=1e-5, atol=1e-5)
        called = {getattr(n.target, "__name__", "") for v in root.variants.values() for n in v.graph.nodes}
        assert f"{implementation}_attention_forward" in called  # the graph was traced again
    assert eager_fallbacks == []


def test_deprecated_keyword_runs_the_original_wrapper(eager_fallbacks):
    base = TRANSFORMERS["llama"].build()
    model = fxlora.transform(base, fxlora.LoraConfig(init_lora_weights=False)).eval()
    attention = model.get_submodule("model.layers.0.self_attn")
    hidden = torch.randn(1, 5, 32)
    cos_sin = model.model.model.rotary_emb(hidden, torch.arange(5)[None])
    with torch.no_grad():
        current = attention(hidden, position_embeddings=cos_sin, attention_mask=None, cache=None)[0]
        assert eager_fallbacks == []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            old = attention(hidden, position_embeddings=cos_sin, attention_mask=None, past_key_values=None)[0]
    assert eager_fallbacks == ["LlamaAttention"]  # the wrapper renames the keyword: not traced
    torch.testing.assert_close(old, current)


def test_encoder_decoder_cache_members_are_typed_handles(eager_fallbacks):
    base = TRANSFORMERS["bart"].build()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    model = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    copy_peft_adapter_weights(reference, model)
    paths = model.target_paths
    assert paths["model.decoder.layers.0.self_attn.q_proj"] == "graph"  # EncoderDecoderCache.self_attention_cache.update
    assert paths["model.decoder.layers.0.encoder_attn.q_proj"] == "graph"  # is_updated flags join the call pattern
    inputs = {k: v for k, v in text_inputs(base).items() if k != "decoder_input_ids"}
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(out, reference.generate(**inputs, max_new_tokens=5, do_sample=False))
    assert eager_fallbacks == []


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_compiles_without_graph_breaks_with_and_without_cache(name):
    import torch._dynamo

    base = TRANSFORMERS[name].build()
    model = fxlora.transform(base, fxlora.LoraConfig(init_lora_weights=False)).eval()
    inputs = text_inputs(base)
    try:
        for extra in ({}, {"use_cache": False}):
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(model)(**inputs, **extra)
            assert explanation.graph_break_count == 0, [r.reason for r in explanation.break_reasons][:2]
    finally:
        torch._dynamo.reset()


def test_get_seq_length_only_where_it_is_an_int():
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticCache

    from fxlora.tracing.integrations.transformers import dynamic_cache_attributes

    assert dynamic_cache_attributes(DynamicCache, {}) == ("get_seq_length",)
    assert dynamic_cache_attributes(EncoderDecoderCache, {"self_attention_cache": DynamicCache}) == ("get_seq_length",)
    assert dynamic_cache_attributes(StaticCache, {}) == ()  # a tensor there: T5 clones it
    assert dynamic_cache_attributes(EncoderDecoderCache, {"self_attention_cache": StaticCache}) == ()
    subclass = type("MyCache", (DynamicCache,), {})
    assert dynamic_cache_attributes(subclass, {}) == ()


# ---------------------------------------------------------------------- pure activations
def test_transformers_plain_activations_qualify_for_base_only_code_and_others_do_not():
    """transformers' activation modules (``ACT2FN``) computing a torch function of their input
    let a graph run as the base model alone (`fxlora.runtime.idle.skippable`); xIELU (a custom
    CUDA class) and an activation whose forward was replaced do not."""
    import torch.fx as fx
    import torch.nn as nn

    from fxlora.runtime.idle import skippable
    from fxlora.tracing.integrations.transformers import _PURE_ACTIVATIONS
    from transformers import activations

    class LeavesOnly(fx.Tracer):
        def is_leaf_module(self, m, qualified_name):
            return True

    def qualifies(act):
        model = nn.Sequential(nn.Linear(6, 6), act)
        return skippable(LeavesOnly().trace(model), model)

    made = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key in activations.ACT2CLS:  # every activation a config can name, as ACT2FN makes it
            act = activations.ACT2FN[key]
            made.setdefault(type(act).__name__, act)
    assert {"SiLUActivation", "GELUActivation", "ClippedGELUActivation"} <= set(made)  # llama's, bert's, gelu_10
    for name, act in made.items():
        expected = name in _PURE_ACTIVATIONS or type(act).__module__.startswith("torch.nn.")
        assert qualifies(act) is expected, name
    assert "XIELUActivation" not in _PURE_ACTIVATIONS and "LinearActivation" not in _PURE_ACTIVATIONS
    replaced = activations.SiLUActivation()
    replaced.forward = lambda x: torch.nn.functional.silu(x) + 1
    assert not qualifies(replaced)


def test_a_merged_llama_mlp_runs_the_base_code_alone_when_compiled_without_autograd(cond_kept):
    model = TRANSFORMERS["llama"].build().eval()
    lm = fxlora.transform(model, fxlora.LoraConfig(target_modules="all-linear", init_lora_weights=False)).eval()
    mlps = [m for m in lm.model.modules() if type(m).__name__ == "LlamaMLP"]
    assert mlps
    for mlp in mlps:
        forward = installed_forward(mlp)
        assert isinstance(forward, GraphForward)
        assert all(code.idle is not None for key, code in forward.gated_code().items() if not key[0])
    mlp = mlps[0]
    h = torch.randn(2, 5, mlp.gate_proj.in_features)
    compiled = torch.compile(mlp, backend="eager", fullgraph=True)
    with torch.no_grad():
        lm.merge_adapter()
        expected = mlp(h)  # eager, merged: the base layers alone, on merged weights
        for name, p in lm.named_parameters():
            if "lora_" in name:
                p.fill_(float("nan"))  # code still computing a merged branch (times a zero gate) gives NaN
        out = compiled(h)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected)
