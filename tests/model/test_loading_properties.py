"""Property: for random architectures and configs, save -> load onto a fresh copy of the base
gives identical outputs and identical tensors (adapters, copies and trained biases), and the file
holds nothing but those tensors."""

import copy
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open

import fxlora
from fxlora import LoraModel
from models import peft_key_to_fxlora
from test_properties import expected_counts, setups


@given(setup=setups(), init=st.sampled_from([True, False, "gaussian"]), noise=st.booleans())
def test_save_then_load_onto_a_fresh_base_is_identical(setup, init, noise):
    net, shape, targets, config = setup
    if config.lora_bias and init == "gaussian":
        init = False
    net.eval()
    model = fxlora.transform(copy.deepcopy(net), config.replace(init_lora_weights=init))
    if noise:  # as after training: copies and trained biases differ from the base too
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
    model.eval()
    x = torch.randn(*shape)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        written = sum(torch.Size(shape).numel() for shape in file_shapes(Path(tmp)).values())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = LoraModel.from_pretrained(copy.deepcopy(net), tmp)
    lora, copies, biases = expected_counts(net, targets, config)
    duplicates = 2 * net.head.bias.numel() if config.bias == "all" and config.modules_to_save else 0  # peft's
    assert written == lora + copies + biases + duplicates
    assert loaded.peft_config == {k: c.replace(inference_mode=True) for k, c in model.peft_config.items()}  # PEFT: not is_trainable
    assert loaded.targeted_module_names == targets
    assert loaded.target_paths == model.target_paths
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert theirs.keys() == ours.keys()
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), key
    assert torch.equal(loaded(x), model(x))


@settings(max_examples=min(15, settings().max_examples))
@given(setup=setups())
def test_peft_reads_the_same_tensors_and_writes_the_same_keys(setup):
    """Tensors, not outputs: peft computes dilated / reflect-padded convolutions wrongly."""
    peft = pytest.importorskip("peft")
    net, _, _, config = setup
    model = fxlora.transform(copy.deepcopy(net), config.replace(init_lora_weights=False))
    kwargs = {k: v for k, v in config.to_dict().items() if v is not None}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(Path(tmp) / "fx")
        peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(**kwargs)).save_pretrained(str(Path(tmp) / "peft"))
        assert file_shapes(Path(tmp) / "fx") == file_shapes(Path(tmp) / "peft")
        from_fx = peft.PeftModel.from_pretrained(copy.deepcopy(net), str(Path(tmp) / "fx"))
    ours = model.state_dict()
    theirs = {peft_key_to_fxlora(k): v for k, v in from_fx.state_dict().items()}
    for key, value in ours.items():
        assert torch.equal(theirs[key], value), key


def file_shapes(directory: Path) -> dict:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
