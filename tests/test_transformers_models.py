"""transformers zoo: twelve tiny architectures built from configs (no downloads).

Per model: default targets (``target_modules=None``) are PEFT's; identity at init; the same logits
as peft for the same adapter weights (default targets and "all-linear", with and without a
padding mask); a training step moves adapter weights only; decoders and encoder-decoders generate
the same tokens as peft (greedy, sampling and beam search, KV cache on). The graph share per model
is pinned.
"""

import copy

import pytest
import torch

import fxlora
from fxlora.planning.defaults import DEFAULT_TARGET_MODULES
from models import paired
from zoo import TRANSFORMERS, main_output, text_inputs

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

NAMES = list(TRANSFORMERS)
GENERATORS = [n for n in NAMES if TRANSFORMERS[n].kind != "encoder"]

#: share of LoRA targets on the graph path: default targets, "all-linear". Fewer than all where a
#: target sits directly in a transformers GradientCheckpointingLayer (OPT/BART fc1, fc2; never
#: traced through, so that gradient checkpointing keeps working), or is the head of a
#: PreTrainedModel whose top-level forward is wrapped (BERT's classifier). Cross-attention is in a
#: graph: the cache's ``is_updated`` flags are part of the call pattern.
GRAPH_SHARE = {
    "llama": (1.0, 1.0),
    "mistral": (1.0, 1.0),
    "qwen2": (1.0, 1.0),
    "gemma": (1.0, 1.0),
    "phi": (1.0, 1.0),
    "gpt2": (1.0, 1.0),
    "gpt_neox": (1.0, 1.0),
    "opt": (1.0, 1.0),
    "bert": (1.0, 1.0),
    "roberta": (1.0, 1.0),
    "t5": (1.0, 1.0),
    "bart": (1.0, 28 / 32),
}


@pytest.fixture(scope="module")
def bases():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = TRANSFORMERS[name].build()
        return copy.deepcopy(cache[name])

    return get



@pytest.mark.parametrize("name", NAMES)
def test_default_targets_and_identity_at_init(bases, name):
    base = bases(name)
    inputs = text_inputs(base)
    with torch.no_grad():
        expected = main_output(base(**inputs))
    model = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig())
    wanted = DEFAULT_TARGET_MODULES[base.config.model_type]
    assert model.targeted_module_names and all(n.rsplit(".", 1)[-1] in wanted for n in model.targeted_module_names)
    assert model.config is model.model.config  # everything of the user's model is reachable
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("targets", [None, "all-linear"])
@pytest.mark.parametrize("name", NAMES)
def test_same_logits_as_peft(bases, name, targets, eager_fallbacks):
    base = bases(name)
    reference, ours = paired(base, targets)
    assert ours.targeted_module_names == [k.removeprefix("base_model.model.") for k in reference.targeted_module_names]
    inputs = text_inputs(base)
    unmasked = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with torch.no_grad():
        for batch in (inputs, unmasked):
            out = main_output(ours(**batch))
            torch.testing.assert_close(out, main_output(reference(**batch)), rtol=1e-5, atol=1e-5)
        with ours.disable_adapter():
            torch.testing.assert_close(main_output(ours(**inputs)), main_output(base(**inputs)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, main_output(base(**unmasked)), atol=1e-4)
    assert ours.reports["default"].graph_share == pytest.approx(GRAPH_SHARE[name][targets is not None])
    if name in ("llama", "gpt2", "bert", "roberta", "gpt_neox", "t5"):
        assert eager_fallbacks == []  # the planned graphs served every call, KV cache and masks included


@pytest.mark.parametrize("name", NAMES)
def test_training_step_moves_only_adapter_weights(bases, name):
    base = bases(name)
    model = fxlora.transform(base, fxlora.LoraConfig(target_modules="all-linear", init_lora_weights=False))
    model.train()
    inputs = text_inputs(base)
    kind = TRANSFORMERS[name].kind
    labels = {"encoder": torch.tensor([0, 1]), "decoder": inputs["input_ids"]}.get(kind, inputs.get("decoder_input_ids"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".lora_" in n for n in moved), sorted(moved)[:5]
    assert {n.split(".lora_")[0] for n in moved if ".lora_B." in n} == set(model.targeted_module_names)


@pytest.mark.parametrize("name", GENERATORS)
def test_generate_same_tokens_as_peft(bases, name, eager_fallbacks):
    base = bases(name)
    reference, ours = paired(base, None)
    inputs = {k: v for k, v in text_inputs(base).items() if k != "decoder_input_ids"}
    settings = dict(max_new_tokens=6, pad_token_id=base.config.pad_token_id or 0)
    greedy = ours.generate(**inputs, do_sample=False, **settings)
    torch.testing.assert_close(greedy, reference.generate(**inputs, do_sample=False, **settings))
    torch.manual_seed(7)
    sampled = ours.generate(**inputs, do_sample=True, top_k=20, **settings)
    torch.manual_seed(7)
    torch.testing.assert_close(sampled, reference.generate(**inputs, do_sample=True, top_k=20, **settings))
    beams = ours.generate(**inputs, num_beams=3, do_sample=False, **settings)
    torch.testing.assert_close(beams, reference.generate(**inputs, num_beams=3, do_sample=False, **settings))
    assert greedy.shape[-1] > inputs["input_ids"].shape[-1] or TRANSFORMERS[name].kind == "seq2seq"
    if name in ("llama", "gpt2", "mistral", "qwen2", "gemma", "phi", "gpt_neox", "opt", "t5", "bart"):
        assert eager_fallbacks == []  # the KV cache is passed to the traced attention code
