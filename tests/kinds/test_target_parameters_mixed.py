"""Mixed batches (``adapter_names``) through target_parameters (fused MoE experts, routers) and
batch-first nn.MultiheadAttention: each row computes as the whole batch does with its adapter alone
(``set_adapter(a)``, the rows naming ``a``; ``"__base__"``: adapters disabled). PEFT refuses mixed
batches on these layers, so the oracle is fxlora itself.

Exactness: where every layer of the compared calls sees the same shapes the rows are bit for bit
equal (``torch.equal``). A MoE layer of a mixed batch routes the other rows' tokens with their own
adapters, so each expert's matmul takes a different number of tokens than in the call with one
adapter, and CPU matmuls round a row differently with the number of rows: there the comparison is
``rtol=1e-5, atol=1e-6``."""

import contextlib
import functools

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from hypothesis import given, settings
from hypothesis import strategies as st

import fxlora
from fxlora import LoraConfig
from models import assert_same_state, state_snapshot
import moe_models

transformers = pytest.importorskip("transformers")

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
NAMES = ["other", "__base__", "default", "other"]
TOL = dict(rtol=1e-5, atol=1e-6)
mixtral = functools.partial(moe_models.mixtral, use_cache=False)
qwen3_moe = functools.partial(moe_models.qwen3_moe, use_cache=False)
MODELS = {"mixtral": mixtral, "qwen3_moe": qwen3_moe}


def two_adapters(base: nn.Module, **options) -> fxlora.LoraModel:
    """`base` with adapters "default" (r=8) and "other" (r=4, alpha 16), random B (non-zero updates)."""
    options = dict(target_modules="all-linear", init_lora_weights=False) | options
    torch.manual_seed(3)
    model = fxlora.transform(base, LoraConfig(**options))
    model.add_adapter("other", LoraConfig(**(options | dict(r=4, lora_alpha=16))))
    return model.eval()


def ids(rows: int = len(NAMES)) -> torch.Tensor:
    return torch.randint(0, 100, (rows, 7), generator=torch.Generator().manual_seed(1))


@contextlib.contextmanager
def using(model: fxlora.LoraModel, name: str):
    """Adapter `name` alone active inside the block (``"__base__"``: adapters disabled); "default" after."""
    if name == "__base__":
        with model.disable_adapter():
            yield
        return
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter("default")


def alone(model: fxlora.LoraModel, call, names: list[str]) -> list:
    """Row i of ``call()`` with adapter ``names[i]`` alone on the whole batch."""
    out = {}
    for name in dict.fromkeys(names):
        with using(model, name):
            out[name] = call()
    return [out[name][i] for i, name in enumerate(names)]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("build", list(MODELS))
def test_each_row_computes_as_its_adapter_alone(build, grad):
    model = two_adapters(MODELS[build]())
    x = ids()
    with torch.set_grad_enabled(grad):
        mixed = model(x, adapter_names=NAMES).logits
        want = alone(model, lambda: model(x).logits, NAMES)
    for row, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[row], want[row], **TOL, msg=name)
    with torch.no_grad():
        by_default = alone(model, lambda: model(x).logits, ["default"] * 4)
        by_base = alone(model, lambda: model(x).logits, ["__base__"] * 4)
    assert not torch.allclose(want[0], by_default[0], atol=1e-3)  # the two adapters differ on row 0
    assert not torch.allclose(want[2], by_base[2], atol=1e-3)  # and act


def test_rows_bit_for_bit_where_every_layer_sees_the_same_shapes():
    """One layer, adapters on the experts only: every call (routing included) has the same shapes."""
    model = two_adapters(mixtral(layers=1), target_modules=[], target_parameters=EXPERTS)
    x = ids()
    with torch.no_grad():
        mixed = model(x, adapter_names=NAMES).logits
        want = alone(model, lambda: model(x).logits, NAMES)
    assert all(torch.equal(mixed[row], want[row]) for row in range(len(NAMES)))


def test_the_router_of_a_mixed_batch_routes_each_token_as_its_adapter_alone():
    """The first router sees the same tokens in every call: its outputs match bit for bit, token by
    token (tokens are the batch flattened, row-major: row i holds tokens [7 i, 7 i + 7))."""
    model = two_adapters(mixtral(), target_modules=[], target_parameters=["gate.weight"])
    seen = []
    model.get_submodule("model.layers.0.mlp.gate").register_forward_hook(lambda m, a, out: seen.append(out))
    x = ids()
    with torch.no_grad():
        model(x, adapter_names=NAMES)
        mixed = seen[-1]  # (logits, weights, experts) of every token
        calls = {}
        for name in dict.fromkeys(NAMES):
            with using(model, name):
                model(x)
            calls[name] = seen[-1]
    for row, name in enumerate(NAMES):
        tokens = slice(7 * row, 7 * row + 7)
        assert all(torch.equal(m[tokens], w[tokens]) for m, w in zip(mixed, calls[name])), name
    assert not torch.equal(calls["default"][2], calls["other"][2])  # the adapters route differently


def test_gradients_reach_only_the_adapters_each_row_uses():
    model = two_adapters(mixtral())
    x = ids(3)
    model(x, adapter_names=["default", "__base__", "default"]).logits.square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None or not g.any() for n, g in grads.items() if ".other." in n)
    assert any(g is not None and g.any() for n, g in grads.items() if ".default." in n and "experts" in n)
    assert any(g is not None and g.any() for n, g in grads.items() if ".default." in n and "mlp.gate" in n)
    model.zero_grad(set_to_none=True)
    # row 0 alone in the loss: its adapter's gradients are those of the whole batch with it alone
    model(x, adapter_names=["default", "other", "__base__"]).logits[0].square().sum().backward()
    mixed = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and ".default." in n}
    assert all(not p.grad.any() for n, p in model.named_parameters() if p.grad is not None and ".other." in n)
    model.zero_grad(set_to_none=True)
    model(x).logits[0].square().sum().backward()
    for n, p in model.named_parameters():
        if ".default." in n:
            torch.testing.assert_close(mixed[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_generate_gives_each_row_its_adapter():
    model = two_adapters(mixtral(layers=1))
    x = ids()
    options = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=True)
    out = model.generate(x, adapter_names=NAMES, **options)
    want = alone(model, lambda: model.generate(x, **options), NAMES)
    assert all(torch.equal(out[row], want[row]) for row in range(len(NAMES)))
    assert not torch.equal(want[0], alone(model, lambda: model.generate(x, **options), ["__base__"])[0])


@pytest.mark.parametrize(("build", "guard_idle"), [("mixtral", False), ("qwen3_moe", True)])
def test_compiled_fullgraph_without_graph_breaks_or_recompiles(build, guard_idle, cond_kept):
    model = two_adapters(MODELS[build](layers=1))
    model.set_optimizations(guard_idle=guard_idle)  # routers and experts compute their call themselves: never guarded
    x = ids()
    torch._dynamo.reset()
    counters.clear()
    try:
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        with torch.no_grad():
            frames = None
            for names in (NAMES, ["default", "other", "other", "__base__"], ["default"] * 4):
                got = compiled(x, adapter_names=names).logits
                torch.testing.assert_close(got, model(x, adapter_names=names).logits, **TOL)
                frames = frames or counter.frame_count
                assert counter.frame_count == frames  # a new assignment of adapters to rows: no recompile
            same = got
            model.set_adapter("default")
            assert torch.equal(same, compiled(x).logits)  # every row one adapter: the very same computation
        assert not counters["graph_break"]
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------- a block of our own, and refusals
class Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6))

    def forward(self, tokens):
        return F.linear(tokens, self.weight)


class Block(nn.Module):
    """(batch, seq, 6) -> tokens (`flatten`) -> a module with a target parameter -> (batch, seq, 4)."""

    def __init__(self, flatten) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.router = Router()
        self.flatten = flatten

    def forward(self, x):
        return self.router(self.flatten(x)).reshape(x.shape[0], x.shape[1], 4)


def block_model(flatten) -> fxlora.LoraModel:
    return two_adapters(Block(flatten), target_modules=[], target_parameters=["router.weight"])


@pytest.mark.parametrize("flatten", [lambda x: x.view(-1, 6), lambda x: x.flatten(0, 1), lambda x: torch.reshape(x.contiguous(), (-1, 6))])
def test_a_block_of_our_own_bit_for_bit(flatten):
    model = block_model(flatten)
    x = torch.randn(4, 3, 6)
    mixed = model(x, adapter_names=NAMES)
    want = alone(model, lambda: model(x), NAMES)
    assert all(torch.equal(mixed[row], want[row]) for row in range(len(NAMES)))


class Experts(nn.Module):
    """Tokens through a stack of 3 experts (E, out, in), summed: each token on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = nn.Parameter(torch.randn(3, 4, 6))

    def forward(self, tokens):
        return torch.einsum("ti,eoi->to", tokens, self.stack)


class TwoStep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.router = Router()
        self.experts = Experts()

    def forward(self, x):
        tokens = x.reshape(-1, 6)
        out = self.experts(tokens) * self.router(tokens).sigmoid()
        return out.view(x.shape[0], x.shape[1], 4)


@functools.lru_cache(maxsize=1)
def two_step() -> fxlora.LoraModel:
    """One model for every example of the property test."""
    return two_adapters(TwoStep(), target_modules=[], target_parameters=["router.weight", "experts.stack"])


@settings(max_examples=25, deadline=None)
@given(names=st.lists(st.sampled_from(["default", "other", "__base__"]), min_size=1, max_size=5), seq=st.integers(1, 4))
def test_any_assignment_of_adapters_to_rows_bit_for_bit(names, seq):
    model = two_step()
    x = torch.randn(len(names), seq, 6, generator=torch.Generator().manual_seed(seq))
    mixed = model(x, adapter_names=names)
    want = alone(model, lambda: model(x), names)
    assert all(torch.equal(mixed[row], want[row]) for row in range(len(names)))


def refused(model, call, message):
    before = state_snapshot(model.model)
    with pytest.raises(ValueError, match=message):
        call()
    assert_same_state(model.model, before)
    assert model.adapter_state.pin.get() is None


def test_a_permute_before_the_flattening_is_refused():
    model = block_model(lambda x: x.transpose(0, 1).reshape(-1, 6))
    x = torch.randn(4, 3, 6)
    plain = model(x)
    refused(model, lambda: model(x, adapter_names=NAMES), r"layer 'router' still saw more.*shape \(3, 1, 6\), whose dim 0 is not the batch")
    assert torch.equal(model(x), plain)


def test_without_a_graph_the_token_rows_are_unknown_and_refused():
    model = fxlora.transform(mixtral(), LoraConfig(target_modules=[], target_parameters=EXPERTS), trace="eager")
    model.add_adapter("other", LoraConfig(target_modules=[], target_parameters=EXPERTS))
    refused(model, lambda: model(ids(), adapter_names=NAMES), r"layer 'model\.layers\.0\.mlp\.experts'.*7 entries.*no such graph")


def test_tokens_that_do_not_split_evenly_among_rows_are_refused():
    """A safety net: a reshape chain of a batch-first tensor whose entries the rows do not divide."""
    from fxlora.core.ops import RowMismatch
    from fxlora.core.own_rows import _entries_per_row

    with pytest.raises(RowMismatch, match=r"18 entries.*cannot be split evenly among 4 rows"):
        _entries_per_row(Router(), torch.zeros(18, 6), torch.zeros(4, 3, 6), 4)


def test_a_merged_adapter_is_refused():
    model = two_adapters(mixtral(layers=1), target_modules=[], target_parameters=EXPERTS)
    model.merge_adapter()
    for call in (lambda: model(ids(), adapter_names=NAMES), lambda: model.generate(ids(), adapter_names=NAMES, max_new_tokens=1, pad_token_id=0)):
        refused(model, call, r"\['default'\] are merged: the adapted layer\(s\) \['model\.layers\.0\.mlp\.experts'\].*unmerge")


class WithTotal(Router):
    def forward(self, tokens):
        out = F.linear(tokens, self.weight)
        return out, out.sum()


def test_an_output_without_one_entry_per_row_is_refused():
    model = two_adapters(nn.Sequential(WithTotal()), target_modules=[], target_parameters=["0.weight"])
    refused(model, lambda: model(torch.randn(4, 6), adapter_names=NAMES), r"shape \(\), which has not one entry per input entry")


class Attention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def test_batch_first_multihead_attention_serves_mixed_batches():
    model = two_adapters(Attention(batch_first=True), target_modules=["attn"])
    x = torch.randn(4, 5, 8)
    mixed = model(x, adapter_names=NAMES)
    want = alone(model, lambda: model(x), NAMES)
    assert all(torch.equal(mixed[row], want[row]) for row in range(len(NAMES)))
    assert not torch.allclose(mixed[0], alone(model, lambda: model(x), ["__base__"])[0], atol=1e-4)


def test_sequence_first_multihead_attention_is_refused():
    model = two_adapters(Attention(batch_first=False), target_modules=["attn"])
    refused(model, lambda: model(torch.randn(4, 4, 8), adapter_names=NAMES), r"mixed batch\) cannot be served.*batch_first=False.*set_adapter")
