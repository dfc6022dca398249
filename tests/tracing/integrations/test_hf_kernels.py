"""The ``kernels`` package's ``use_kernelized_func`` wrapper (transformers 5 puts it on Llama's
attention and most others with rotary embeddings when ``kernels`` is installed): seen through while
the module's private function copies run the plain function, so those attentions are in the
graph and equal peft; a module whose copy was kernelized, or has a hook, runs eagerly, as called."""

import copy
import types

import pytest
import torch
import torch.nn as nn

kernels = pytest.importorskip("kernels")
pytest.importorskip("transformers")
pytest.importorskip("peft")
import fxlora  # noqa: E402
from fxlora.tracing.integrations.hf_kernels import unwrap_kernelized_func  # noqa: E402
from models import paired  # noqa: E402
from zoo_sweep import build, sweep_inputs  # noqa: E402


@kernels.use_kernel_forward_from_hub("FxloraTestShift")
def shift(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


@kernels.use_kernelized_func(shift)
class Shifted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(shift(self.proj(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Shifted()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + 1


def _kernelize(module: Shifted) -> None:
    """What ``kernelize`` does to a private copy: an instance ``forward`` (here a different kernel)."""
    (copy_,) = module._kernel_funcs.values()
    copy_.forward = types.MethodType(lambda self, x: x * 3.0, copy_)


def test_llama_attention_is_wrapped_and_in_the_graph_equal_to_peft(eager_fallbacks):
    base = build("llama")
    attention = base.model.layers[0].self_attn
    assert unwrap_kernelized_func(type(attention).forward, attention) is not None  # the wrapper is there
    reference, ours = paired(base, "all-linear")
    assert set(ours.target_paths.values()) == {"graph"}
    assert "model.layers.0.self_attn" in ours.graph_roots
    inputs = sweep_inputs(base)
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, reference(**inputs).logits)
        compiled = torch.compile(ours, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(**inputs).logits, reference(**inputs).logits)
    assert eager_fallbacks == []


def test_a_plain_copy_is_seen_through_and_trains_as_the_module():
    torch.manual_seed(0)
    base = Net()
    model = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(target_modules=["block.proj", "block.out"], init_lora_weights=False))
    assert set(model.target_paths.values()) == {"graph"}
    x = torch.randn(3, 8)
    out = model(x)
    eager = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(target_modules=["block.proj", "block.out"], init_lora_weights=False), trace="eager")
    eager.load_state_dict(model.state_dict())
    expected = eager(x)
    assert torch.equal(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(torch.equal(g, dict(eager.named_parameters())[n].grad) for n, g in grads.items())


@pytest.mark.parametrize("change", ["kernelized", "hooked"])
def test_a_kernelized_or_hooked_copy_runs_eagerly_with_its_kernel(change):
    torch.manual_seed(0)
    base = Net()
    if change == "kernelized":
        _kernelize(base.block)
    else:
        next(iter(base.block._kernel_funcs.values())).register_forward_hook(lambda m, args, out: out + 5.0)
    assert unwrap_kernelized_func(type(base.block).forward, base.block) is None
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = base(x)  # the copy's kernel (or hook) acts
    model = fxlora.transform(base, fxlora.LoraConfig(target_modules=["block.proj", "block.out"]))
    assert all(path.startswith("eager") for path in model.target_paths.values()), model.target_paths
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # B is zero: the adapted model computes the base's output


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Shifted(), Shifted()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_of_two_identical_blocks_only_the_kernelized_one_runs_eagerly():
    torch.manual_seed(0)
    base = TwoBlocks()
    _kernelize(base.blocks[1])
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = base(x)
    model = fxlora.transform(base, fxlora.LoraConfig(target_modules=["proj", "out"]))
    paths = model.target_paths
    assert paths["blocks.0.proj"] == "graph" and paths["blocks.0.out"] == "graph"
    assert paths["blocks.1.proj"].startswith("eager") and paths["blocks.1.out"].startswith("eager"), paths
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # block 1's kernel (x * 3) acts
