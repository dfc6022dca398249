"""diffusers: with probe inputs from the config and rotary embeddings as a leaf, the SD attention
projections of UNet2DConditionModel, AutoencoderKL, DiT, SD3 and Flux all take the graph path,
and compute exactly what peft computes for the same adapter weights."""

import copy

import pytest
import torch

import fxlora
from models import copy_peft_adapter_weights

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from zoo_diffusers import DIFFUSERS, SD_TARGETS, diffusers_inputs  # noqa: E402


def _sample(out):
    return out.sample if hasattr(out, "sample") else out[0]


@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_sd_targets_in_a_graph_compute_as_peft(name, eager_fallbacks):
    base = DIFFUSERS[name]()
    kwargs = dict(target_modules=SD_TARGETS, init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    ours = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(**kwargs)).eval()
    copy_peft_adapter_weights(reference, ours)
    assert ours.reports["default"].graph_share == 1.0
    inputs = diffusers_inputs(name)
    with torch.no_grad():
        out = _sample(ours(**inputs))
        torch.testing.assert_close(out, _sample(reference(**inputs)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, _sample(base(**inputs)), atol=1e-4)
    assert eager_fallbacks == []  # the planned graphs served the real call (batch of two, other sizes)


def test_probe_inputs_and_rotary_leaf_change_nothing():
    from diffusers.models import embeddings
    from diffusers.models.transformers import transformer_flux

    from fxlora.tracing.integrations.diffusers import example_inputs, rotary_leaf

    original = embeddings.apply_rotary_emb
    with rotary_leaf():
        assert transformer_flux.apply_rotary_emb is not original
        x = torch.rand(1, 3, 2, 4)
        freqs = (torch.rand(3, 4), torch.rand(3, 4))
        assert torch.equal(transformer_flux.apply_rotary_emb(x, freqs, sequence_dim=1), original(x, freqs, sequence_dim=1))
    assert transformer_flux.apply_rotary_emb is original and embeddings.apply_rotary_emb is original
    unet = DIFFUSERS["unet"]()
    [(args, inputs)] = example_inputs(unet)
    assert inputs["sample"].shape == (1, 4, 4, 4) and inputs["encoder_hidden_states"].shape == (1, 2, 32)
    assert example_inputs(torch.nn.Linear(2, 2)) == []
