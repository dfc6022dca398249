"""Mixed batches: each row computes with its own adapter, in one vectorised forward."""

import copy

import pytest
import torch
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from models import ConvNet2d, EmbeddingModel, Mixed, copy_peft_adapter_weights, row_by_row

peft = pytest.importorskip("peft")

CASES = [
    (Mixed, dict(target_modules=["stem", "blocks.1.0", "blocks.0.fc2"]), dict(target_modules=["stem", "head"], r=4, lora_alpha=2), lambda n: torch.randn(n, 6)),
    (ConvNet2d, dict(target_modules=["conv1", "conv3"], modules_to_save=["head"]), dict(target_modules=["conv2"], r=2, modules_to_save=["head"]), lambda n: torch.randn(n, 3, 8, 8)),
    (EmbeddingModel, dict(target_modules=["emb", "proj"]), dict(target_modules=["emb"], r=2), lambda n: torch.randint(0, 50, (n, 5))),
]


def build(make, cfg_a, cfg_b, policy):
    torch.manual_seed(0)
    base = make()
    model = fxlora.transform(copy.deepcopy(base), LoraConfig(**cfg_a, init_lora_weights=False), trace=policy)
    model.add_adapter("b", LoraConfig(**cfg_b, init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p))
    model.eval()
    return base, model


MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("policy", ["auto", "eager"])
@pytest.mark.parametrize("make, cfg_a, cfg_b, make_x", CASES, ids=["mixed", "conv-saved", "embedding"])
def test_each_row_gets_its_adapter(policy, make, cfg_a, cfg_b, make_x, mode):
    base, model = build(make, cfg_a, cfg_b, policy)
    names = ["b", "default", "__base__", "b", "default"]
    x = make_x(len(names))
    with MODES[mode]():  # without autograd, serving reuses stacked weights between calls
        model(x, adapter_names=names[::-1])
        out = model(x, adapter_names=names).clone()
    expected = row_by_row(model, x, names)
    model.set_adapter("default")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # the gates are back to the per-adapter state afterwards
    torch.testing.assert_close(model(x), torch.cat([model(x[i : i + 1]) for i in range(len(names))]), rtol=1e-5, atol=1e-6)
    assert model.adapter_state.pin.get() is None and model.adapter_state.published.scale_tensor.dim() == 1


@pytest.mark.parametrize("make, cfg_a, cfg_b, make_x", CASES[:2], ids=["mixed", "conv-saved"])
def test_matches_peft_mixed_batch(make, cfg_a, cfg_b, make_x):
    torch.manual_seed(0)
    base = make()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg_a, init_lora_weights=False))
    pm.add_adapter("b", peft.LoraConfig(**cfg_b, init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p))
    fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**cfg_a, init_lora_weights=False))
    fm.add_adapter("b", LoraConfig(**cfg_b, init_lora_weights=False))
    copy_peft_adapter_weights(pm, fm)
    pm.eval(), fm.eval()
    names = ["default", "b", "__base__", "b"]
    x = make_x(4)
    torch.testing.assert_close(fm(x, adapter_names=names), pm(x, adapter_names=names), rtol=1e-5, atol=1e-6)


def test_errors_and_gates_restored_after_failure():
    _, model = build(*CASES[0][:3], "auto")
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match="unknown adapter name"):
        model(x, adapter_names=["default", "zzz", "b"])
    with pytest.raises(ValueError, match="3 rows"):
        model(x, adapter_names=["default", "b"])
    with pytest.raises(TypeError, match="one adapter name per row"):
        model(x, adapter_names="default")
    published = model.adapter_state.published
    with pytest.raises(RuntimeError):
        model(torch.randn(3, 7), adapter_names=["b", "b", "b"])  # shape error inside the model
    assert model.adapter_state.pin.get() is None and model.adapter_state.published is published
    assert published.scale == {"default": 1.0, "b": 0.0}


def test_disabled_model_ignores_adapter_names():
    base, model = build(*CASES[0][:3], "auto")
    x = torch.randn(2, 6)
    with model.disable_adapter():
        torch.testing.assert_close(model(x, adapter_names=["b", "default"]), base.eval()(x))


def test_generate_with_adapter_names_matches_per_row_generation():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = fxlora.transform(transformers.LlamaForCausalLM(config), LoraConfig(init_lora_weights=False))
    model.add_adapter("b", LoraConfig(target_modules=["q_proj", "k_proj", "gate_proj"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(20)
    model.eval()
    ids = torch.randint(0, 64, (3, 5))
    names = ["b", "__base__", "default"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                row = model.generate(input_ids=ids[i : i + 1], **kwargs)
        else:
            model.set_adapter(name)
            row = model.generate(input_ids=ids[i : i + 1], **kwargs)
        n = row.shape[1]  # a row that hit the end-of-sequence token is padded in the batch
        assert torch.equal(out[i, :n], row[0]) and bool((out[i, n:] == 0).all()), name
    model.set_adapter("default")
    beams = model.generate(input_ids=ids, adapter_names=names, num_beams=2, num_return_sequences=2, **kwargs)
    assert beams.shape[0] == 6


# --------------------------------------------------------------------------- properties

from hypothesis import given, strategies as st  # noqa: E402

import fxlora.core.ops  # noqa: E402


class SequenceStack(nn.Module):
    """Linear layers on (batch, positions, features) or (batch, features) inputs, with a
    data-dependent block in the middle (an eager-path target)."""

    def __init__(self, width: int):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.mid = Untraceable(width)
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(self.inp(x))))


class Untraceable(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        if x.abs().max() > 1e6:  # cannot be traced
            return x
        return self.fc(x)


LAYERS = ["inp", "mid.fc", "out"]


@st.composite
def mixed_setups(draw):
    n_adapters = draw(st.integers(1, 3))
    adapters = []
    for i in range(n_adapters):
        targets = draw(st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True))
        adapters.append(
            dict(
                name=f"a{i}",
                targets=targets,
                r=draw(st.sampled_from([1, 2, 4])),
                alpha=draw(st.sampled_from([1, 3, 8])),
                scale=draw(st.sampled_from([1.0, 1.0, 0.5, 0.0, -2.0])),
            )
        )
    rows = draw(st.integers(1, 7))
    names = draw(st.lists(st.sampled_from([a["name"] for a in adapters] + ["__base__"]), min_size=rows, max_size=rows))
    positions = draw(st.sampled_from([None, 3]))
    merged = draw(st.sampled_from([None] + [a["name"] for a in adapters]))
    return adapters, names, positions, merged


@given(
    setup=mixed_setups(),
    mode=st.sampled_from(list(MODES)),
    policy=st.sampled_from(["auto", "eager"]),
)
def test_mixed_batch_equals_row_by_row(setup, mode, policy):
    """Any assignment of adapters (of any ranks, alphas, targets and run-time scales, one of them
    possibly merged) to rows computes, row for row, what that row's adapter alone computes."""
    adapters, names, positions, merged = setup
    torch.manual_seed(0)
    width = 5
    first, *others = adapters
    config = lambda a: LoraConfig(target_modules=a["targets"], r=a["r"], lora_alpha=a["alpha"], init_lora_weights=False)  # noqa: E731
    model = fxlora.transform(SequenceStack(width), config(first), adapter_name=first["name"], trace=policy)
    for a in others:
        model.add_adapter(a["name"], config(a))
    model.eval()
    for a in adapters:
        model.set_adapter_scale(a["name"], a["scale"])
    if merged is not None:
        model.set_adapter(merged)
        model.merge_adapter()
    x = torch.randn(len(names), *([positions] if positions else []), width)
    with MODES[mode]():
        out = model(x, adapter_names=names).detach().clone()
    torch.testing.assert_close(out, row_by_row(model, x, names).detach(), rtol=1e-5, atol=1e-5)


def test_serving_groups_rows_by_adapter(monkeypatch):
    """Eager serving computes each adapter on its own rows only, not every adapter on every row;
    with autograd, or with a merged adapter, it computes densely."""
    grouped = []
    original = fxlora.core.ops.grouped_linear_update

    def spy(x, base, weights, index, factors):
        grouped.append([rows.tolist() for rows in index])
        return original(x, base, weights, index, factors)

    monkeypatch.setattr(fxlora.core.ops, "grouped_linear_update", spy)
    torch.manual_seed(0)
    model = fxlora.transform(nn.Sequential(nn.Linear(4, 4)), LoraConfig(target_modules=["0"], r=2, init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=["0"], r=3, init_lora_weights=False))
    model.eval()
    names = ["b", "__base__", "a", "b", "b"]
    x = torch.randn(5, 4)
    with torch.no_grad():
        model(x, adapter_names=names)  # the first batch of this layout also checks its rows (4 small passes)
        grouped.clear()
        served = model(x, adapter_names=names)
    assert grouped == [[[2], [0, 3, 4]]]  # a: row 2; b: rows 0, 3, 4
    with torch.enable_grad():
        dense = model(x, adapter_names=names)
    assert len(grouped) == 1
    torch.testing.assert_close(served, dense)
    model.merge_adapter()  # "a" is merged: rows that use "b" or the base subtract it
    with torch.no_grad():
        model(x, adapter_names=names)
    assert len(grouped) == 1


@pytest.mark.parametrize("grad", [False, True])
def test_a_layer_that_sees_other_rows_gets_a_clear_error(grad):
    """Row gates apply along the batch dimension: a layer fed a reshaped batch (here rows folded
    into positions) cannot apply them, and says so, served or not."""

    class Folding(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x.reshape(-1, 4))

    model = fxlora.transform(Folding(), LoraConfig(target_modules=["proj"], init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=["proj"], init_lora_weights=False))
    model.eval()
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match="not the batch of every adapted layer: given one row, a layer still saw more .*gates hold 1 row but a layer received a batch of 3"):
        model(torch.randn(2, 3, 4), adapter_names=["a", "b"])
    assert model.adapter_state.pin.get() is None
    torch.testing.assert_close(model(torch.randn(2, 3, 4)).shape, torch.Size([6, 4]))


@pytest.mark.parametrize("mode", list(MODES))
def test_half_precision_base_with_float32_adapters(mode):
    """A bfloat16 model gets float32 adapters (PEFT's rule); a mixed batch adds each row's update in
    float32 and rounds once, as a single adapter's forward does."""
    torch.manual_seed(0)
    model = fxlora.transform(SequenceStack(8).to(torch.bfloat16), LoraConfig(target_modules=LAYERS, init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=["inp", "out"], r=2, init_lora_weights=False))
    model.eval()
    assert model.get_submodule("inp.lora_A.a").weight.dtype == torch.float32
    names = ["b", "a", "__base__", "a"]
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with MODES[mode]():
        out = model(x, adapter_names=names).detach().clone()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, row_by_row(model, x, names).detach())


# --------------------------------------------------------------------------- every kind of update

def served_pair():
    """Two adapters of different ranks on the linear layers of `SequenceStack` (one on an eager
    path), in eval mode, with a batch and a mixed assignment of its rows."""
    torch.manual_seed(0)
    model = fxlora.transform(SequenceStack(5), LoraConfig(target_modules=LAYERS, r=2, init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(target_modules=["inp", "mid.fc"], r=3, lora_alpha=6, init_lora_weights=False))
    model.eval()
    return model, torch.randn(5, 5), ["b", "a", "__base__", "a", "b"]


def adapter_params(model) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def optimizer_step(**options):
    def update(model):
        params = adapter_params(model)
        for p in params:
            p.requires_grad_(True)
            p.grad = torch.randn_like(p)
        torch.optim.AdamW(params, lr=0.5, **options).step()

    return update


def load_changed(assign: bool):
    def update(model):
        state = {k: v + torch.randn_like(v) if ".lora_" in k else v for k, v in model.state_dict().items()}
        model.load_state_dict(state, assign=assign)

    return update


def data_add(model):
    for p in adapter_params(model):
        p.data.add_(torch.randn_like(p))


def data_copy(model):
    for p in adapter_params(model):
        p.data.copy_(torch.randn_like(p))


def data_set(model):
    for p in adapter_params(model):
        p.data = torch.randn_like(p)


def in_place(model):
    with torch.no_grad():
        for p in adapter_params(model):
            p.mul_(-2)


def replaced(model):
    for name in ("inp.lora_A.b", "mid.fc.lora_B.a", "out.lora_A.a"):
        module = model.get_submodule(name)
        module.weight = nn.Parameter(torch.randn_like(module.weight))


UPDATES = {
    "adamw-fused": optimizer_step(fused=True),
    "adamw-foreach": optimizer_step(foreach=True),
    "adamw-for-loop": optimizer_step(foreach=False),
    "data-add": data_add,
    "data-copy": data_copy,
    "data-set": data_set,
    "in-place": in_place,
    "load_state_dict": load_changed(assign=False),
    "load_state_dict-assign": load_changed(assign=True),
    "replaced": replaced,
}


@pytest.mark.parametrize("mode", ["no_grad", "inference"])
@pytest.mark.parametrize("update", list(UPDATES))
def test_served_mixed_batches_follow_every_kind_of_update(update, mode):
    """However the adapters' weights are written (optimizer steps of every implementation, writes
    through ``.data``, ``load_state_dict`` with or without ``assign``, replaced parameters), the
    next served mixed batch computes with the new weights, as a plain call does."""
    model, x, names = served_pair()
    with MODES[mode]():
        before = model(x, adapter_names=names).clone()
    UPDATES[update](model)
    with MODES[mode]():
        after = model(x, adapter_names=names).clone()
    with torch.no_grad():
        expected = row_by_row(model, x, names)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, expected)  # the update changed what the adapters compute


@given(steps=st.lists(st.tuples(st.sampled_from(["serve", *UPDATES]), st.permutations(["b", "a", "__base__", "a", "b"])), min_size=1, max_size=6))
def test_served_mixed_batches_follow_any_sequence_of_updates(steps):
    """Any sequence of updates of any kind and served mixed batches (any assignment of rows):
    every served batch equals its rows computed one by one with the weights of that moment."""
    model, x, _ = served_pair()
    for step, names in steps:
        if step != "serve":
            UPDATES[step](model)
        with torch.no_grad():
            expected = row_by_row(model, x, list(names))
            # updates compound (AdamW steps, x-2 writes): rows and batch sum terms that grew in different orders
            scale = max(1.0, float(expected.abs().max()))
            torch.testing.assert_close(model(x, adapter_names=list(names)), expected, rtol=1e-4, atol=1e-5 * scale)


# --------------------------------------------------------------------------- where the batch is


class TimeFirstInside(nn.Module):
    """Batch-first input, computed time-first (an RNN-style model): the adapted layers see
    (time, batch, features)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        h = torch.cumsum(torch.tanh(self.fc(x.transpose(0, 1))), 0)  # a recurrence over time
        return self.out(h).transpose(0, 1)


class TimeFirst(nn.Module):
    """Sequence-first input (time, batch, features), as nn.RNN / nn.MultiheadAttention /
    nn.Transformer take by default."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        return self.out(torch.cumsum(torch.tanh(self.fc(x)), 0))


class BatchFirst(TimeFirst):
    def forward(self, x):
        return self.out(torch.cumsum(torch.tanh(self.fc(x)), 1))


def two_adapters(model, targets, policy="auto"):
    torch.manual_seed(0)
    lora = fxlora.transform(model, LoraConfig(target_modules=targets, init_lora_weights=False), adapter_name="a", trace=policy)
    lora.add_adapter("b", LoraConfig(target_modules=targets, r=2, init_lora_weights=False))
    return lora.eval()


def encoder_layer(batch_first):
    return nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)


SEQUENCE_FIRST = [
    (TimeFirstInside, ["fc", "out"], (3, 3, 4), "not the batch of every adapted layer"),
    (TimeFirstInside, ["fc", "out"], (3, 5, 4), "not the batch of every adapted layer"),
    (TimeFirst, ["fc", "out"], (3, 3, 4), "not independent batch rows"),
    (TimeFirst, ["fc", "out"], (3, 5, 4), "not independent batch rows"),  # 3 names for 3 time steps
    (lambda: encoder_layer(False), ["linear1", "linear2"], (3, 3, 8), "not independent batch rows"),
    (lambda: nn.Transformer(8, 2, 1, 1, 16, dropout=0.0), ["linear1", "linear2"], (3, 3, 8), "not independent batch rows"),
]


@pytest.mark.parametrize("policy", ["auto", "eager"])
@pytest.mark.parametrize("make, targets, shape, why", SEQUENCE_FIRST, ids=["inside-T=B", "inside-T!=B", "input-T=B", "input-T!=B", "encoder-layer", "transformer"])
def test_sequence_first_layouts_are_refused_not_computed_along_time(make, targets, shape, why, policy):
    model = two_adapters(make(), targets, policy)
    x = torch.randn(*shape)
    inputs = (x, torch.randn(*shape)) if isinstance(model.model, nn.Transformer) else (x,)
    names = ["a", "b", "__base__"]
    published = model.adapter_state.published
    model.model.train()
    with pytest.raises(ValueError, match=rf"adapter_names cannot be applied to inputs of shapes \[{re_shape(shape)}.*: rows along dim 0 are {why}.*batch-first"):
        model(*inputs, adapter_names=names)
    assert model.adapter_state.pin.get() is None and model.adapter_state.published is published
    assert all(m.training for m in model.model.modules())  # the check changed nothing
    model.eval()
    with torch.no_grad():
        model(*inputs)  # plain calls are unaffected


def re_shape(shape):
    return r"\(" + ", ".join(map(str, shape)) + r"\)"


def test_sequence_first_batch_of_the_wrong_length_names_the_rule():
    model = two_adapters(TimeFirst(), ["fc"])
    with pytest.raises(ValueError, match=r"3 entries but the batch has 5 rows \(dim 0 of the first tensor argument\).*batch-first"):
        model(torch.randn(5, 3, 4), adapter_names=["a", "b", "a"])  # 3 batch rows, 5 time steps


@pytest.mark.parametrize("policy", ["auto", "eager"])
@pytest.mark.parametrize("positions", [3, 5])
def test_batch_first_with_as_many_positions_as_rows_is_right(policy, positions, monkeypatch):
    """No false refusal: a batch-first model whose sequence length equals the batch size gives
    each row its adapter's result (as that row alone), and the layout is checked once."""
    model = two_adapters(BatchFirst(), ["fc", "out"], policy)
    names = ["b", "a", "__base__"]
    x = torch.randn(3, positions, 4)
    calls = []
    inner = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda *a, **k: calls.append(a[0].shape[0]) or inner(*a, **k))
    with torch.no_grad():
        out = model(x, adapter_names=names)
        again = model(torch.randn(3, positions, 4), adapter_names=["a", "a", "b"])
    assert calls == [1, 2, 2, 2, 3, 3]  # one check (row 0 alone; rows 0-1, 0-0, 1-1), then two mixed batches
    assert again.shape == out.shape
    torch.testing.assert_close(out, row_by_row(model, x, names), rtol=1e-5, atol=1e-5)


def test_batch_first_encoder_layer_with_as_many_positions_as_rows_is_right():
    model = two_adapters(encoder_layer(True), ["linear1", "linear2"])  # eval: no fused path (tests/planning/test_warnings.py)
    names = ["a", "__base__", "b"]
    x = torch.randn(3, 3, 8)
    with torch.no_grad():
        out = model(x, adapter_names=names)
    torch.testing.assert_close(out, row_by_row(model, x, names), rtol=1e-5, atol=1e-5)


def test_peft_computes_sequence_first_mixed_batches_along_time():
    """The PEFT defect fxlora does not copy (peft 0.21.2): with time == batch, PEFT's rows are time
    steps, and its mixed batch differs from running each batch element alone."""
    torch.manual_seed(0)
    model = peft.get_peft_model(TimeFirst(), peft.LoraConfig(target_modules=["fc", "out"], init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(target_modules=["fc", "out"], init_lora_weights=False))
    model.eval()
    x = torch.randn(3, 3, 4)  # (time, batch, features)
    names = ["a", "b", "a"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        alone = []
        for i, name in enumerate(names):
            model.set_adapter(name)
            alone.append(model(x[:, i : i + 1]))
    assert not torch.allclose(mixed, torch.cat(alone, dim=1), atol=1e-4)
