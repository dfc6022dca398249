"""The adapted weight where a parent hands a layer's weight to other code (torchvision's Swin:
``shifted_window_attention(x, self.qkv.weight, self.proj.weight, ...)``): the adapter acts in the
graph, trains, merges bit for bit, compiles without graph breaks, and what it cannot do is refused."""

import copy

import pytest
import torch

import fxlora
from fxlora import LoraConfig, UnsupportedTargetError
from fxlora.core.weight_use import adapted_weight
from fxlora.passes.weight_uses import ADAPT_WEIGHT_USES

torchvision = pytest.importorskip("torchvision")
from torchvision.models.swin_transformer import SwinTransformer  # noqa: E402

TARGETS = ["qkv", "proj"]


def _swin() -> torch.nn.Module:
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 2], window_size=[4, 4], num_classes=10).eval()


def _adapted(base, **options):
    with pytest.warns(UserWarning, match="hands that code the adapted weight"):
        return fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=TARGETS, init_lora_weights=False, **options))


def _folded(base, lora, adapters):
    """`base` with each adapter's ``scaling * B @ A`` added to its layers' weights by hand."""
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in lora.model.named_modules():
            for adapter in adapters if hasattr(module, "lora_A") else ():
                if adapter in module.lora_A:
                    scaling = lora.peft_config[adapter].lora_alpha / lora.peft_config[adapter].r
                    delta = module.lora_B[adapter].weight @ module.lora_A[adapter].weight
                    reference.get_submodule(name).weight.add_(scaling * delta)
    return reference


def test_swin_projections_act_in_the_graph_and_merge_exactly():
    base = _swin()
    lora = _adapted(base)
    assert set(lora.target_paths.values()) == {"graph"} and len(lora.target_paths) == 6
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = lora(x)
        torch.testing.assert_close(out, _folded(base, lora, ["default"])(x))
        assert not torch.allclose(out, base(x), atol=1e-3)
        with lora.disable_adapter():
            assert torch.equal(lora(x), base(x))
        lora.merge_adapter()
        assert torch.equal(lora(x), out)  # the merged weight is the weight the graph computed with
        lora.unmerge_adapter()
        assert torch.equal(lora(x), out)


def test_swin_trains_every_lora_tensor():
    lora = _adapted(_swin())
    lora.train()
    lora(torch.randn(2, 3, 32, 32)).square().mean().backward()
    grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    assert len(grads) == 12 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_swin_compiles_without_graph_breaks_or_recompiles_on_adapter_switches():
    from torch._dynamo.testing import CompileCounter

    base = _swin()
    lora = _adapted(base)
    lora.add_adapter("other", LoraConfig(target_modules=["qkv"], r=4, init_lora_weights=False))
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lora, backend=counter, fullgraph=True)
    with torch.no_grad():
        for adapters in (["default"], ["other"], ["default", "other"], ["default"]):
            lora.set_adapter(adapters)
            torch.testing.assert_close(compiled(x), _folded(base, lora, adapters)(x), rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


def test_mixed_batches_and_impure_adapters_are_refused():
    base = _swin()
    lora = _adapted(base)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), pytest.raises(ValueError, match="mixed batch"):
        lora(x, adapter_names=["default", "__base__"])
    with torch.no_grad():
        before = lora(x)
    state = {k: v.clone() for k, v in lora.state_dict().items()}
    with pytest.raises(UnsupportedTargetError, match="lora_dropout=0"):
        lora.add_adapter("dropped", LoraConfig(target_modules=["qkv"], lora_dropout=0.1))
    assert list(lora.peft_config) == ["default"] and set(lora.target_paths.values()) == {"graph"}
    assert set(lora.state_dict()) == set(state)
    with torch.no_grad():
        assert torch.equal(lora(x), before)  # nothing changed


def test_with_dropout_alone_the_layers_stay_eager_and_warned():
    base = _swin()
    with pytest.warns(UserWarning, match="the parent reads the weight directly"):
        lora = fxlora.transform(copy.deepcopy(base), LoraConfig(target_modules=TARGETS, lora_dropout=0.1))
    assert set(lora.target_paths.values()) == {"eager"}


def test_the_pass_routes_every_weight_use_and_states_it():
    lora = _adapted(_swin())
    graph = copy.deepcopy(next(iter(lora.model.forward.variants.values())).graph)
    from fxlora.passes.base import PassContext

    result = ADAPT_WEIGHT_USES(graph, lora.model, PassContext(), True)  # contracts checked
    assert len(result.sites) == 6
    assert len(graph.find_nodes(op="call_function", target=adapted_weight)) == 6
    assert not [n for n in graph.find_nodes(op="get_attr") if n.target.endswith("qkv.weight")]
