"""accelerate's dispatch and offload around a LoRA model: ``cpu_offload`` and ``dispatch_model``
with layers offloaded to disk, applied before ``transform`` (a model loaded with ``device_map``)
or after it. Outputs and gradients equal the same model's without offload, which are peft's
(peft itself puts the adapters of offloaded layers on the meta device and computes garbage)."""

import copy

import pytest
import torch

import fxlora
from fxlora import LoraConfig
from zoo import TRANSFORMERS

accelerate = pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")

IDS = torch.randint(0, 64, (2, 6))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def base():
    return TRANSFORMERS["llama"].build()


def offload(model, how, tmp_path):
    if how == "cpu_offload":
        return accelerate.cpu_offload(model, execution_device="cpu")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    return accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))


def adapt(model):
    torch.manual_seed(1)
    return fxlora.transform(model, LoraConfig(target_modules=TARGETS, init_lora_weights=False))


def logits_and_grads(model):
    model.train()
    model.zero_grad()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def reference():
    logits, grads = logits_and_grads(adapt(base()))
    net = base()
    torch.manual_seed(1)
    pm = peft.get_peft_model(net, peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False))
    pm.eval()
    with torch.no_grad():
        assert torch.equal(pm(input_ids=IDS).logits, adapt(base()).eval()(input_ids=IDS).logits)  # peft's outputs
    return logits, grads


@pytest.mark.parametrize("how", ["cpu_offload", "disk"])
def test_models_offloaded_before_transform_compute_and_train_as_without_offload(reference, how, tmp_path):
    model = adapt(offload(base(), how, tmp_path))
    logits, grads = logits_and_grads(model)
    ref_logits, ref_grads = reference
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.device.type == "cpu" for p in lora)  # never on the meta device


@pytest.mark.parametrize("how", ["cpu_offload", "disk"])
def test_models_offloaded_after_transform_compute_as_without_offload(reference, how, tmp_path):
    """Offloading the adapted model offloads the adapters too (accelerate then owns their
    storage: inference only, as for any offloaded parameter)."""
    model = adapt(base())
    offload(model.model, how, tmp_path)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert torch.equal(logits, reference[0])


def test_adapters_of_offloaded_layers_save_and_reload(tmp_path):
    model = adapt(offload(base(), "cpu_offload", tmp_path))
    model.save_pretrained(tmp_path / "adapter")
    plain = fxlora.LoraModel.from_pretrained(base(), tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, plain(input_ids=IDS).logits)


def test_cpu_offloaded_models_keep_their_targets_in_graphs():
    """The probe runs on accelerate's execution device (the weights wait on meta), so attention
    is planned for its real call pattern and every target is on the graph path."""
    model = adapt(accelerate.cpu_offload(base(), execution_device="cpu"))
    assert set(model.target_paths.values()) == {"graph"}
