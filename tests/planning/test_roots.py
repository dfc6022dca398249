"""Repeated blocks planned as graph roots of their own (`fxlora.planning.roots`)."""

import copy

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.planning.roots import BlocksOnly, repeated_blocks, trace_root
from fxlora.runtime.cond_support import cond_keeps_state
from fxlora.tracing.call_keys import call_key
from fxlora.tracing.reuse import TraceCache


class Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stage(nn.Module):
    """A block made of blocks: only the outer ones are planned as roots here."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.inner = nn.ModuleList([Block(d), Block(d)])

    def forward(self, x):
        for block in self.inner:
            x = block(x)
        return x


class Net(nn.Module):
    def __init__(self, d: int = 8, checks_rank: bool = False):
        super().__init__()
        self.stem = nn.Linear(d, d)
        self.stages = nn.Sequential(Stage(d), Stage(d), Stage(d))
        self.lone = nn.ModuleList([Block(d)])  # one block of its class: not repeated
        self.plain = nn.ModuleList([nn.Identity(), nn.Identity()])  # nothing to adapt inside
        self.head = nn.Linear(d, 3)
        self.checks_rank = checks_rank

    def forward(self, x):
        h = self.stages(self.stem(x))
        if self.checks_rank and h.dim() == 3:  # decided only where the trace knows h's rank: inlined
            h = h.mean(1)
        return self.head(self.lone[0](h))


def observed_calls(model: nn.Module, x: torch.Tensor) -> dict:
    """What `fxlora.tracing.probe.observe_calls` records, for a model no integration builds inputs for."""
    seen: dict = {}

    def record(module, args, kwargs):
        seen.setdefault(id(module), []).append(call_key(False, args, kwargs, ranked=True, sized=True))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return seen


def targets(model: nn.Module) -> list:
    return [m for name, m in model.named_modules() if name.endswith(("fc1", "fc2", "stem", "head"))]


def test_repeated_blocks_are_the_outermost_repeated_modules_in_containers():
    model = Net()
    observed = observed_calls(model, torch.randn(2, 8))
    found = repeated_blocks(model, targets(model), observed)
    assert sorted(found) == ["stages.0", "stages.1", "stages.2"]  # not the blocks inside them, not `lone`
    assert "one of 3 Stage blocks in stages" in found["stages.0"]
    inner = repeated_blocks(model.stages[0], targets(model), observed)  # planned as a root, a stage splits in turn
    assert sorted(inner) == ["inner.0", "inner.1"] and "one of 2 Block blocks in inner" in inner["inner.0"]
    assert repeated_blocks(model, targets(model), {}) == {}  # no example forward pass: nothing split off
    unseen = {k: v for k, v in observed.items() if k != id(model.stages[1])}
    # a stage never seen called is no block (no root would run its graph); the blocks inside it are
    assert sorted(repeated_blocks(model, targets(model), unseen)) == ["stages.0", "stages.1.inner.0", "stages.1.inner.1", "stages.2"]
    layers = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))  # the layers to adapt themselves: no blocks
    assert repeated_blocks(layers, list(layers), observed_calls(layers, torch.randn(2, 8))) == {}


def test_blocks_are_leaves_of_the_enclosing_graph_unless_it_needs_them_inlined():
    for checks_rank, split in ((False, True), (True, False)):
        model = Net(checks_rank=checks_rank)
        x = torch.randn(2, 5, 8)
        observed = observed_calls(model, x)
        traced = trace_root(model, targets(model), observed, TraceCache())
        through, leaves = traced.through, traced.leaves
        [variant] = traced.variants.values()
        called = {n.target for n in variant.graph.nodes if n.op == "call_module"}
        assert ({"stages.0", "stages.1", "stages.2"} <= called) is split
        assert (sorted(leaves) == ["stages.0", "stages.1", "stages.2"]) is split
        assert ("stages.0.inner.0.fc1" in called) is not split  # inlined: the block's layers are called by the graph
        assert (id(model.stages[0]) in through) is not split


def test_a_module_with_nothing_to_adapt_outside_its_blocks_runs_its_own_forward():
    model = Net()
    inside = [m for name, m in model.named_modules() if name.startswith("stages.") and name.endswith("fc1")]
    with pytest.raises(BlocksOnly, match="every module to adapt in it is inside one of its repeated blocks"):
        trace_root(model, inside, observed_calls(model, torch.randn(2, 8)), TraceCache())


def counting(monkeypatch, module, name: str) -> list:
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_timm_vit_traces_and_builds_one_block_for_all_and_equals_peft(monkeypatch):
    timm = pytest.importorskip("timm")
    peft = pytest.importorskip("peft")
    import fxlora.runtime.forwards as forwards
    import fxlora.tracing.reuse as reuse

    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=4).eval()
    config = dict(r=4, target_modules=r".*\.(qkv|proj|fc1|fc2)", init_lora_weights=False)
    traces, builds = counting(monkeypatch, reuse, "trace_variant"), counting(monkeypatch, forwards, "rewrite")
    torch.manual_seed(1)
    model = fxlora.transform(copy.deepcopy(base), LoraConfig(**config))
    assert model.graph_roots == ["", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert set(model.target_paths.values()) == {"graph"}
    assert [type(args[0]).__name__ for args in traces] == ["VisionTransformer", "Block"]  # one block traced for all
    assert builds == []  # gated code waits for torch.compile (`fxlora.runtime.compile_builds`)
    for forward in forwards.graph_forwards(model.model):
        forward.gated_code()
    # gated evaluation code (and its base-only twin where this torch allows a cond), for the model and for one block
    assert len(builds) == 2 * (2 if cond_keeps_state() else 1)
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    model.train(), reference.train()
    model(x).square().mean().backward()
    reference(x).square().mean().backward()
    ours = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    theirs = {n.replace("base_model.model.", ""): p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 17
    for name, grad in ours.items():
        assert torch.equal(grad, theirs[name]), name


def vit_with_block_roots():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, depth=3).eval()
    model = fxlora.transform(base, LoraConfig(r=4, target_modules=r".*\.(qkv|proj|fc1|fc2)", init_lora_weights=False)).eval()
    assert model.graph_roots == ["", "blocks.0", "blocks.1", "blocks.2"]
    return model


def count_conds(gm: torch.fx.GraphModule) -> int:
    """``torch.cond`` calls in a dynamo graph and in the branch graphs it holds."""
    found = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.higher_order.cond)
    return found + sum(count_conds(m) for m in gm.children() if isinstance(m, torch.fx.GraphModule))


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_compiled_without_autograd_the_blocks_run_inside_the_models_one_cond(merged, cond_kept):
    """The model's graph calls each block with the code of its own `torch.cond` branch: one cond
    per call, not one more per block (nested conds cost ~5% of a compiled ViT's forward)."""
    torch._dynamo.reset()  # compiled code earlier tests left (one of tests/passes makes dynamo fail on timm's LayerNorm inside torch.cond otherwise, at 4d3e717 too)
    model = vit_with_block_roots()
    if merged:
        model.merge_adapter()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
        torch.testing.assert_close(out, model(x))
    [graph] = graphs
    assert count_conds(graph) == 1


def test_a_block_whose_forward_is_replaced_after_transform_is_called_as_it_now_is():
    model = vit_with_block_roots()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        block = model.model.blocks[1]
        replaced = block.forward
        calls = []
        block.forward = lambda h: calls.append(1) or replaced(h)  # someone's wrapper, no fxlora keyword
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        for run in (model, compiled):
            torch.testing.assert_close(run(x), before)
    assert len(calls) == 2  # the model ran its own forward, which called the wrapper
