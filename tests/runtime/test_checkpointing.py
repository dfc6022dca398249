"""Activation checkpointing applied around adapted blocks, after ``transform``: torch's
``apply_activation_checkpointing(..., checkpoint_wrapper)``, ``torch.utils.checkpoint`` in a
model's own forward, and transformers' ``gradient_checkpointing_enable()``: the blocks really are
recomputed in backward, and the gradients equal those computed without checkpointing."""


import pytest
import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing, checkpoint_wrapper
from torch.utils.checkpoint import checkpoint

import fxlora
from fxlora import LoraConfig
from models import Block, Blocks
from zoo import TRANSFORMERS

X = torch.randn(3, 8)
CONFIG = dict(target_modules=["fc1", "fc2"], init_lora_weights=False)


class CheckpointedBlocks(Blocks):
    """`Blocks` whose forward checkpoints each block itself."""

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return self.head(x)


def grads(model, x=X) -> dict:
    model.train()
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters() if p.requires_grad}


def count_calls(module: nn.Module) -> list:
    calls: list = []
    module.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def transformed(cls=Blocks):
    torch.manual_seed(0)
    net = cls()
    torch.manual_seed(1)
    return fxlora.transform(net, LoraConfig(**CONFIG))


def test_checkpoint_wrappers_applied_after_transform_recompute_with_the_same_gradients():
    ref = grads(transformed())
    model = transformed()
    apply_activation_checkpointing(model.model, checkpoint_wrapper_fn=checkpoint_wrapper, check_fn=lambda m: isinstance(m, Block))
    calls = count_calls(model.model.blocks[0].norm)
    got = grads(model)
    assert len(calls) == 2  # forward, then again in backward
    assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)
    assert model.graph_roots == ["", "blocks.0._checkpoint_wrapped_module", "blocks.1._checkpoint_wrapped_module"]


@pytest.mark.parametrize("trace", ["auto", "eager"])
def test_torch_utils_checkpoint_in_the_model_forward(trace):
    torch.manual_seed(0)
    plain = fxlora.transform(Blocks(), LoraConfig(**CONFIG), trace=trace)
    torch.manual_seed(0)
    model = fxlora.transform(CheckpointedBlocks(), LoraConfig(**CONFIG), trace=trace)
    calls = count_calls(model.model.blocks[1].norm)
    got, ref = grads(model), grads(plain)
    assert len(calls) == 2
    assert all(torch.equal(got[n], ref[n]) for n in ref)


def test_transformers_gradient_checkpointing_enable():
    spec = TRANSFORMERS["llama"]
    ids = torch.randint(0, 64, (2, 6))

    def build():
        base = spec.build()
        torch.manual_seed(1)
        return fxlora.transform(base, LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))

    def llama_grads(model):
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    ref = llama_grads(build())
    model = build()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = count_calls(model.get_submodule("model.layers.0.input_layernorm"))
    got = llama_grads(model)
    assert len(calls) == 2
    assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)
