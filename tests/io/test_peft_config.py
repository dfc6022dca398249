"""adapter_config.json as peft 0.21.2 writes it: the same keys, the same values (resolved
target_modules, fan_in_fan_out as PEFT sets it, PEFT's bookkeeping fields), files of mode 0644
(under umask 022); and peft loads fxlora's adapters with the defaults of every transformers model
type both know, giving fxlora's outputs."""

import copy
import json
import os
import warnings

import pytest
import torch

import fxlora
from fxlora import LoraConfig
from fxlora.io.peft_config import PEFT_FORMAT_VERSION, config_from_json
from models import MLP
from zoo import TRANSFORMERS, VOCAB, TinyTransformer, _common, main_output, text_inputs

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

MODELS = {
    **{name: TRANSFORMERS[name] for name in ("llama", "mistral", "qwen2", "gpt2", "bert", "t5", "bart", "opt", "gemma", "phi", "gpt_neox", "roberta")},
    "mixtral": TinyTransformer(
        "MixtralConfig", "MixtralForCausalLM", _common(num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1), "decoder"
    ),
    **{
        name: TinyTransformer(config, model, kwargs, "")
        for name, config, model, kwargs in [
            ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", _common(num_key_value_heads=2, head_dim=8)),
            ("gemma2", "Gemma2Config", "Gemma2ForCausalLM", _common(num_key_value_heads=2, head_dim=8)),
            ("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM", _common(num_key_value_heads=2, head_dim=8)),
            ("stablelm", "StableLmConfig", "StableLmForCausalLM", _common(num_key_value_heads=2)),
            ("gpt_neo", "GPTNeoConfig", "GPTNeoForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], max_position_embeddings=64, intermediate_size=64, bos_token_id=0, eos_token_id=0)),
            ("gptj", "GPTJConfig", "GPTJForCausalLM", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, bos_token_id=0, eos_token_id=0)),
            ("bloom", "BloomConfig", "BloomForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
            ("falcon", "FalconConfig", "FalconForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
            ("electra", "ElectraConfig", "ElectraForSequenceClassification", _common(embedding_size=32)),
            ("xlm-roberta", "XLMRobertaConfig", "XLMRobertaForSequenceClassification", _common(pad_token_id=1)),
            ("deberta-v2", "DebertaV2Config", "DebertaV2ForSequenceClassification", _common()),
            ("deberta", "DebertaConfig", "DebertaForSequenceClassification", _common()),
            ("gpt_bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)),
            ("codegen", "CodeGenConfig", "CodeGenForCausalLM", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, bos_token_id=0, eos_token_id=0)),
            ("mpt", "MptConfig", "MptForCausalLM", dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)),
            ("mt5", "MT5Config", "MT5ForConditionalGeneration", dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
        ]
    },
}
FILES = ["adapter_config.json", "adapter_model.safetensors"]


def perturb(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)


def test_fxlora_and_peft_know_the_same_defaults():
    from fxlora.planning.defaults import DEFAULT_TARGET_MODULES
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    as_set = lambda v: v if isinstance(v, str) else sorted(v)
    assert {k: as_set(v) for k, v in DEFAULT_TARGET_MODULES.items()} == {k: as_set(v) for k, v in PEFT_DEFAULTS.items()}


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def save_both(tmp_path, base, peft_targets=None, **kwargs):
    """fxlora's and peft's adapter for the same base and config (`peft_targets`: peft's
    target_modules where they differ), saved; returns fxlora's model and both configs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**kwargs))
        theirs = kwargs if peft_targets is None else {**kwargs, "target_modules": peft_targets}
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**theirs))
    fm.save_pretrained(tmp_path / "fx")
    pm.save_pretrained(str(tmp_path / "peft"))
    read = lambda which: json.loads((tmp_path / which / "adapter_config.json").read_text())
    return fm, read("fx"), read("peft")


def assert_same_config(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        if key == "target_modules" and isinstance(value, list):  # peft writes a set as a list
            assert sorted(ours[key]) == sorted(value), key
        elif value == [] and ours[key] is None:  # peft writes target_parameters [] for MoE models (both: unused)
            assert key == "target_parameters"
        else:
            assert ours[key] == value, (key, ours[key], value)


@pytest.mark.parametrize("name", list(MODELS))
def test_config_matches_peft_key_by_key_and_peft_loads_it(tmp_path, name, umask_022):
    torch.manual_seed(0)
    base = MODELS[name].build()
    # peft 0.21.2 resolves Mixtral's defaults to an empty set under transformers 5 (its MoE weight
    # conversion) and then refuses the model; it is handed its own table's list instead
    defaults = peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[base.config.model_type]
    fm, ours, theirs = save_both(tmp_path, base, peft_targets=defaults if name == "mixtral" else None, init_lora_weights=False)
    assert_same_config(ours, theirs)
    assert sorted(ours["target_modules"]) == sorted(defaults)
    assert ours["target_modules"] is not None and ours["peft_version"] == PEFT_FORMAT_VERSION
    assert ours["auto_mapping"] == {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    for file in FILES:
        assert os.stat(tmp_path / "fx" / file).st_mode & 0o777 == 0o644, file
    assert fm.peft_config["default"].target_modules is None  # the model's own config is left as given

    perturb(fm)
    fm.eval()
    fm.save_pretrained(tmp_path / "fx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_fx = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fx")).eval()
    assert sorted(from_fx.targeted_module_names) == sorted(fm.targeted_module_names)
    inputs = text_inputs(base)
    with torch.no_grad():
        ours_out = main_output(fm(**inputs))
        torch.testing.assert_close(main_output(from_fx(**inputs)), ours_out, rtol=1e-5, atol=1e-5)
        with fm.disable_adapter():
            assert not torch.allclose(main_output(fm(**inputs)), ours_out)  # the adapter acts


def test_gpt2_conv1d_targets_write_fan_in_fan_out_true(tmp_path):
    base = TRANSFORMERS["gpt2"].build()
    fm, ours, theirs = save_both(tmp_path, base, target_modules=["c_attn", "c_fc"])
    assert ours["fan_in_fan_out"] is True and theirs["fan_in_fan_out"] is True
    assert fm.peft_config["default"].fan_in_fan_out is False
    assert_same_config(ours, theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file's setting fits the layers: no warning on reload
        config, notes = config_from_json(ours, "adapter_config.json")
        fxlora.LoraModel.from_pretrained(TRANSFORMERS["gpt2"].build(), tmp_path / "fx")
    assert config.fan_in_fan_out is True and notes == []


def test_linear_targets_with_fan_in_fan_out_true_write_false_as_peft_does(tmp_path):
    _, ours, theirs = save_both(tmp_path, MLP(8), target_modules=["seq.0"], fan_in_fan_out=True)
    assert ours["fan_in_fan_out"] is False and theirs["fan_in_fan_out"] is False
    assert_same_config(ours, theirs)


def test_all_linear_writes_the_adapted_modules(tmp_path):
    base = TRANSFORMERS["llama"].build()
    fm, ours, theirs = save_both(tmp_path, base, target_modules="all-linear")
    assert_same_config(ours, theirs)
    assert sorted(ours["target_modules"]) == sorted(fm.targeted_module_names)


def test_custom_model_config_matches_peft(tmp_path, umask_022):
    _, ours, theirs = save_both(tmp_path, MLP(8), target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], bias="lora_only", rank_pattern={"seq.2": 2})
    assert_same_config(ours, theirs)
    for file in FILES:
        assert os.stat(tmp_path / "fx" / file).st_mode & 0o777 == 0o644, file


def test_file_mode_follows_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        fxlora.transform(MLP(8), LoraConfig(target_modules=["seq.0"])).save_pretrained(tmp_path)
    finally:
        os.umask(previous)
    assert {os.stat(tmp_path / f).st_mode & 0o777 for f in FILES} == {0o640}
