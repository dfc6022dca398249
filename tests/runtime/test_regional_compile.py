"""Regional compilation (``block.compile()`` on each block after ``transform``): each block runs
its own graph code inside its compiled ``__call__``, with no graph break, the same outputs, and no
recompile when adapters are switched, scaled or disabled."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import fxlora
from fxlora import LoraConfig
from fxlora.runtime.forwards import GraphForward, installed_forward
from models import Blocks

X = torch.randn(3, 8)


def two_adapters():
    torch.manual_seed(0)
    model = fxlora.transform(Blocks(n=3), LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(target_modules=["fc1", "fc2"], init_lora_weights=False))
    return model


def same(out, ref):
    """Equal up to float32 rounding: compiled code may order a sum differently from eager code
    (seen as one-ulp differences on some CPUs)."""
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6)


def references(model):
    outs = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        outs[name] = model(X)
    with model.disable_adapter():
        outs[None] = model(X)
    model.set_adapter("default")
    return outs


def plain_frames(mode: str) -> int:
    """Frames plain PyTorch compiles for the same blocks without LoRA (fullgraph: no break)."""
    torch._dynamo.reset()
    net = Blocks(n=3).train(mode == "train")
    counter = CompileCounterWithBackend("aot_eager")
    for block in net.blocks:
        block.compile(backend=counter, fullgraph=True)
    net(X)
    torch._dynamo.reset()
    return counter.frame_count


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compiled_blocks_run_graph_code_with_no_break_and_no_recompile_on_switches(mode):
    limit = plain_frames(mode)
    model = two_adapters()
    model.train(mode == "train")
    torch.manual_seed(2)
    ref = references(model)
    counter = CompileCounterWithBackend("aot_eager")
    for block in model.model.blocks:
        block.compile(backend=counter, fullgraph=True)
    same(model(X), ref["default"])
    assert model.graph_roots == ["", "blocks.0", "blocks.1", "blocks.2"]
    assert all(isinstance(installed_forward(b), GraphForward) for b in model.model.blocks)
    frames = counter.frame_count
    assert frames <= limit  # identical blocks share compiled code, as in plain PyTorch
    counts = []
    for _ in range(2):
        model.set_adapter("other")
        same(model(X), ref["other"])
        with model.disable_adapter():
            same(model(X), ref[None])
        model.set_adapter("default")
        model.set_adapter_scale("default", 0.5)
        assert not torch.allclose(model(X), ref["default"], rtol=1e-3, atol=1e-3)  # the scale acts
        model.set_adapter_scale("default", 1.0)
        same(model(X), ref["default"])
        counts.append(counter.frame_count)
    if mode == "eval":
        assert counts == [frames, frames]
    else:  # switching the trainable adapter changes parameters' requires_grad: compiled once per adapter
        assert counts[1] == counts[0]


def test_compiled_blocks_train_with_the_gradients_of_uncompiled_ones():
    torch._dynamo.reset()
    ref = two_adapters()
    model = two_adapters()
    for block in model.model.blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    for m in (ref, model):
        m.train()
        m(X).pow(2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert len(grads) == 12  # 3 blocks x 2 layers x (A, B) of the active adapter
    for n, p in ref.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6)
