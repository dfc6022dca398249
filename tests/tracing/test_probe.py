"""The probe: how a transformers model's modules are really called, observed without changing anything."""

import pytest
import torch

from fxlora.tracing.probe import observe_calls
from fxlora.tracing.call_keys import MANY, OBJECT, TENSOR, erase_sizes, size_class
from models import MLP
from zoo import TRANSFORMERS

transformers = pytest.importorskip("transformers")


def test_observes_attention_calls_with_cache_handles_tuples_and_ranks():
    model = TRANSFORMERS["llama"].build()
    model.train()
    attention = model.model.layers[0].self_attn
    seen = observe_calls(model)
    keys = seen[id(attention)]
    assert len(keys) == 4  # with and without a padding mask, each with and without the KV cache
    training, positional, named = keys[0]
    kinds = dict(named)
    assert training is False and positional == ()
    hidden = model.config.hidden_size
    assert kinds["hidden_states"][:2] == (TENSOR, 3)  # rank, then each dimension's size class (0, 1, 2 = more)
    assert kinds["hidden_states"][2][2] == size_class(hidden) == MANY
    assert all(kind[:2] == (TENSOR, 3) and len(kind[2]) == 3 for kind in kinds["position_embeddings"][1])
    assert erase_sizes(keys[0]) != keys[0] and dict(erase_sizes(keys[0])[2])["hidden_states"] == (TENSOR, 3)
    assert kinds["cache"][:2] == (OBJECT, transformers.DynamicCache)
    assert dict(keys[1][2])["attention_mask"] != kinds["attention_mask"]
    assert dict(keys[2][2])["cache"] == ("NoneType", None)
    assert id(model) in seen and id(model.lm_head) in seen


def test_probe_changes_nothing():
    model = TRANSFORMERS["gpt2"].build()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    observe_calls(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_no_observation_without_an_example_input():
    assert observe_calls(MLP(4)) == {}


def test_vision_models_are_probed_with_pixels_at_their_config_resolution():
    vision = transformers.ViTForImageClassification(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=16))
    seen = observe_calls(vision)
    attention = vision.get_submodule("vit.layers.0.attention")
    [key] = seen[id(attention)]
    key = erase_sizes(key)
    assert (TENSOR, 3) in [*key.positional, *dict(key.named).values()]  # (batch, patches, hidden), ranked


def test_observing_some_modules_observes_them_and_what_contains_them_as_a_full_probe_does():
    model = TRANSFORMERS["llama"].build()
    layer = model.model.layers[0]
    full = observe_calls(model)
    seen = observe_calls(model, [layer.self_attn.q_proj, model.lm_head])
    containing = [model, model.model, model.model.layers, layer, layer.self_attn, layer.self_attn.q_proj, model.lm_head]
    assert set(seen) == {id(m) for m in containing if id(m) in full}
    assert all(seen[k] == full[k] for k in seen)
    assert id(layer.mlp) not in seen and id(model.model.layers[1]) not in seen
    assert all(not m._forward_pre_hooks for m in model.modules())
