"""call_weight_reads: an adapter on a layer its parent uses through ``F.linear(x, layer.weight, b)``
acts, trains and merges exactly as on a layer the parent calls with the same input.

The oracle is the same model whose parent calls the layer instead (``layer(x) + b``; timm's own
``qkv_bias_separate=True`` for beit / eva / swinv2). PEFT's adapters on such layers do nothing, so
PEFT is the oracle for names, trainable counts and files only.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

import fxlora
from fxlora import LoraConfig, LoraModel
from fxlora.passes import PassContext
from fxlora.passes.weight_reads import CALL_WEIGHT_READS
from fxlora.tracing.linear_reads import linear_reads
from models import row_by_row

from .pass_models import ReadNet as Net, fresh_graph


def _transform(model, config, **kwargs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        lora = fxlora.transform(model, config, **kwargs)
    return lora, [str(w.message) for w in seen if str(w.message).startswith("fxlora:")]


def pair(config: LoraConfig, seed: int = 0):
    """(adapted reading model, adapted calling reference) with the same base and adapter tensors."""
    torch.manual_seed(seed)
    base = Net(read=True)
    reference = Net(read=False)
    reference.load_state_dict(base.state_dict())
    lora, notes = _transform(base, config)
    ref, _ = _transform(reference, config)
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    ref.load_state_dict(lora.state_dict())
    return lora, ref, notes


TARGETS = ["attn.qkv", "attn.proj", "fc"]


def step(model, x, seed=3):
    torch.manual_seed(seed)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out, {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("extra", [{}, {"lora_dropout": 0.5}, {"use_dora": True}, {"lora_bias": True}], ids=["plain", "dropout", "dora", "lora_bias"])
def test_acts_trains_and_equals_the_called_layer(extra):
    lora, ref, notes = pair(LoraConfig(target_modules=TARGETS, **extra))
    assert set(lora.target_paths.values()) == {"graph"}
    assert not any("no effect" in n for n in notes)
    x = torch.randn(3, 5, 8)
    lora.train(), ref.train()
    out, grads = step(lora, x)
    ref_out, ref_grads = step(ref, x)  # same seed: the same dropout masks
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    for name in [n for n in grads if "attn" in n and "lora_" in n]:
        assert grads[name].abs().sum() > 0, name
    lora.eval()
    with torch.no_grad(), lora.disable_adapter():
        plain = lora(x)
    with torch.no_grad():
        assert not torch.allclose(lora(x), plain)


def test_the_graph_calls_the_layer_where_its_weight_was_read():
    lora, _, _ = pair(LoraConfig(target_modules=TARGETS))
    root, graph = fresh_graph(lora)
    found = linear_reads(graph, root, lambda path, module: path in {"attn.qkv", "attn.proj"})
    assert [r.extra_bias is None for r in found["attn.qkv"]] == [False]  # qkv has no bias: q/k/v bias is added
    assert [r.extra_bias is None for r in found["attn.proj"]] == [True]  # proj's own bias
    ctx = PassContext()
    CALL_WEIGHT_READS.requires(graph, root, ctx)
    assert CALL_WEIGHT_READS.run(graph, root, ctx).sites == ("attn.qkv", "attn.proj")
    CALL_WEIGHT_READS.ensures(graph, root, ctx)
    calls = [n.target for n in graph.find_nodes(op="call_module")]
    assert calls == ["attn.qkv", "attn.proj", "fc"]
    assert not graph.find_nodes(op="call_function", target=F.linear)
    assert not [n for n in graph.find_nodes(op="get_attr") if n.target.startswith(("attn.qkv", "attn.proj"))]


def test_adapter_state_behaves_as_on_called_layers():
    lora, ref, _ = pair(LoraConfig(target_modules=TARGETS))
    for model in (lora, ref):
        model.add_adapter("other", LoraConfig(target_modules=["attn.qkv"], r=2, init_lora_weights=False))
    ref.load_state_dict(lora.state_dict())
    lora.eval(), ref.eval()
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        for name in ("default", "other"):
            lora.set_adapter(name), ref.set_adapter(name)
            assert torch.equal(lora(x), ref(x))
        with lora.disable_adapter(), ref.disable_adapter():
            assert torch.equal(lora(x), ref(x))
            plain = lora(x)
        names = ["default", "other", "__base__", "default"]
        mixed = lora(x, adapter_names=names)
        assert torch.equal(mixed, ref(x, adapter_names=names))
        torch.testing.assert_close(mixed, row_by_row(lora, x, names))
        assert torch.equal(mixed[2], plain[2])


def test_merge_and_unmerge_are_exact():
    lora, _, _ = pair(LoraConfig(target_modules=TARGETS))
    lora.eval()
    x = torch.randn(2, 5, 8)
    weight = lora.model.attn.qkv.weight.detach().clone()
    with torch.no_grad():
        adapted = lora(x)
        lora.merge_adapter()
        assert not torch.equal(lora.model.attn.qkv.weight, weight)
        torch.testing.assert_close(lora(x), adapted, rtol=1e-5, atol=1e-6)
        lora.unmerge_adapter()
        assert torch.equal(lora.model.attn.qkv.weight, weight)
        assert torch.equal(lora(x), adapted)
        plain = lora.merge_and_unload()  # the parent reads the merged weight
        assert type(plain.attn.forward) is type(Net().attn.forward)
        torch.testing.assert_close(plain(x), adapted, rtol=1e-5, atol=1e-6)


def test_compiles_whole():
    torch._dynamo.reset()
    lora, _, _ = pair(LoraConfig(target_modules=TARGETS))
    lora.eval()
    x = torch.randn(2, 5, 8)
    explanation = torch._dynamo.explain(lora)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(lora, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), lora(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_a_saved_linear_read_through_its_weight_selects_its_copy():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return F.linear(self.fc(x), self.head.weight, self.head.bias)

    torch.manual_seed(0)
    lora, _ = _transform(Head(), LoraConfig(target_modules=["fc"], modules_to_save=["head"]))
    x = torch.randn(2, 8)
    with torch.no_grad():
        before = lora(x)
        lora.model.head.modules_to_save["default"].weight.add_(1.0)
        assert not torch.allclose(lora(x), before)
        with lora.disable_adapter():
            assert torch.equal(lora(x), before)


class OtherBias(nn.Module):
    """F.linear on a layer with a bias, given another one: no call of the layer equals it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.extra = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return F.linear(x, self.proj.weight, self.extra)


def test_a_read_no_call_equals_stays_eager_and_warned():
    model = OtherBias()
    x = torch.randn(2, 8)
    base = model(x)
    lora, notes = _transform(model, LoraConfig(target_modules=["proj"], init_lora_weights=False, lora_dropout=0.1))
    assert lora.target_paths == {"proj": "eager"}  # with dropout: no weight update (a pure one gets `weight_uses`)
    assert len(notes) == 1 and "proj: the parent reads the weight directly" in notes[0]
    with torch.no_grad():
        assert torch.equal(lora(x), base)  # the warning is true


def test_the_parents_own_forward_elsewhere_is_warned_and_indeed_without_the_adapter():
    lora, _, notes = pair(LoraConfig(target_modules=["attn.qkv"]))
    assert len(notes) == 1 and "attn.qkv: the parent uses the weight instead of calling the module" in notes[0]
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        direct = lora.model.attn(x)  # the parent's eager forward reads qkv.weight itself
        with lora.disable_adapter():
            assert torch.equal(direct, lora.model.attn(x))
        assert not torch.allclose(lora.model.fc(direct), lora(x))


def test_peft_names_counts_and_files_agree(tmp_path):
    peft = pytest.importorskip("peft")
    config = dict(target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(0)
    base = Net()
    lora, _ = _transform(copy.deepcopy(base), LoraConfig(**config))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    assert lora.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    x = torch.randn(2, 5, 8)
    lora.save_pretrained(tmp_path / "fx")
    pm.save_pretrained(str(tmp_path / "peft"))
    from_fx = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "fx"))
    ours = {k.replace(".default", "") for k in peft.get_peft_model_state_dict(from_fx)}
    assert ours == set(peft.get_peft_model_state_dict(pm))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_peft = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    for name, tensor in pm.state_dict().items():
        if "lora_" in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(from_peft.state_dict()[key], tensor), key
    with torch.no_grad():
        assert not torch.equal(from_peft(x), base(x))  # fxlora's adapters act there (PEFT's do not)


# ---------------------------------------------------------------- timm
TIMM = {
    "beit": ("beit_base_patch16_224", dict(img_size=32, depth=2, embed_dim=32, num_heads=2), 32),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2, embed_dim=32, num_heads=2), 28),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4), 32),
}


def _timm(name: str, separate: bool) -> nn.Module:
    timm = pytest.importorskip("timm")
    arch, kwargs, _ = TIMM[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=3, **kwargs)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):  # swinv2 zeroes its post-norms: no gradient reaches the blocks
            nn.init.ones_(module.weight)
        if hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = separate  # True: the attention calls qkv (the reference)
    return model


def _silent_layers(model, x) -> set[str]:
    """The adapted layers whose LoRA tensors get no gradient from one backward."""
    out, grads = step(model, x)
    return {n.rsplit(".lora_", 1)[0] for n, g in grads.items() if "lora_" in n and not g.abs().sum() > 0}


@pytest.mark.parametrize("name", ["beit", "eva02"])
def test_timm_peft_adapters_on_qkv_get_no_gradient(name):
    """What PEFT does there (so no PEFT output is an oracle for these layers)."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(_timm(name, separate=False), peft.LoraConfig(target_modules="all-linear", init_lora_weights=False))
    silent = _silent_layers(pm.train(), torch.randn(1, 3, TIMM[name][2], TIMM[name][2]))
    assert silent == {f"base_model.model.blocks.{i}.attn.qkv" for i in range(2)}


@pytest.mark.parametrize("name", list(TIMM))
def test_timm_every_target_trains_as_with_a_called_qkv(name):
    config = LoraConfig(target_modules="all-linear", init_lora_weights=False)
    lora, _ = _transform(_timm(name, separate=False), config)
    ref, _ = _transform(_timm(name, separate=True), config)
    ref.load_state_dict(lora.state_dict())
    assert set(lora.target_paths.values()) == {"graph"}
    assert any(".qkv" in n for n in lora.target_paths)
    x = torch.randn(2, 3, TIMM[name][2], TIMM[name][2])
    lora.train(), ref.train()
    out, grads = step(lora, x)
    ref_out, ref_grads = step(ref, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    silent = [n for n, g in grads.items() if "lora_" in n and not g.abs().sum() > 0]
    assert silent == []
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6)
    lora.eval()
    with torch.no_grad():
        before = lora(x)
        for n, p in lora.named_parameters():
            if p.requires_grad:
                p.sub_(0.1 * grads[n])
        assert not torch.allclose(lora(x), before)


def test_the_roots_own_forward_warns_that_its_weight_reads_skip_their_adapters():
    lora, _, _ = pair(LoraConfig(target_modules=TARGETS))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        in_graph = lora(x)
        handle = lora.model.attn.qkv.register_forward_hook(lambda module, args, out: None)
        with pytest.warns(UserWarning, match="reads the weight of attn.proj, attn.qkv directly"):
            own = lora(x)  # a hook on a layer: the root runs its own forward
        handle.remove()
        assert not torch.allclose(own, in_graph)  # the warning is true
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(lora(x), in_graph)


class Uses(nn.Module):
    """One use of ``layer``'s tensors per case."""

    def __init__(self, case: str, bias: bool = True) -> None:
        super().__init__()
        self.layer, self.case = nn.Linear(8, 8, bias=bias), case
        self.other = nn.Parameter(torch.ones(8))

    def forward(self, x):
        w, b = self.layer.weight, self.layer.bias
        return {
            "own": lambda: F.linear(x, w, b),
            "keywords": lambda: F.linear(input=x, weight=w, bias=b),
            "twice": lambda: F.linear(F.linear(x, w, b), w, b),
            "other bias, layer without": lambda: F.linear(x, w, self.other),
            "no bias, layer without": lambda: F.linear(x, w),
            "transposed": lambda: x @ w.t(),
            "sliced": lambda: F.linear(x[..., :4], w[:, :4], b),
            "weight as input": lambda: F.linear(w, w, b),
            "no bias, layer with": lambda: F.linear(x, w),
            "other bias, layer with": lambda: F.linear(x, w, self.other),
            "bias used elsewhere": lambda: F.linear(x, w, b) + b,
            "weight used elsewhere": lambda: F.linear(x, w, b) * w.sum(),
        }[self.case]()


@pytest.mark.parametrize(
    "case, bias, reads",
    [
        ("own", True, 1),
        ("keywords", True, 1),
        ("twice", True, 2),
        ("other bias, layer without", False, 1),
        ("no bias, layer without", False, 1),
        ("transposed", True, None),
        ("sliced", True, None),
        ("weight as input", True, None),
        ("no bias, layer with", True, None),
        ("other bias, layer with", True, None),
        ("bias used elsewhere", True, None),
        ("weight used elsewhere", True, None),
    ],
)
def test_only_an_f_linear_that_a_call_equals_is_a_linear_read(case, bias, reads):
    model = Uses(case, bias)
    graph = torch.fx.Tracer().trace(model)
    found = linear_reads(graph, model, lambda path, module: path == "layer")["layer"]
    assert (None if found is None else len(found)) == reads
    x = torch.randn(3, 8)
    base = model(x)
    for dropout in (0.0, 0.1):  # other uses get the adapted weight (`weight_uses`) only as a pure weight update
        lora, notes = _transform(Uses(case, bias).eval(), LoraConfig(target_modules=["layer"], lora_dropout=dropout))
        lora.model.load_state_dict(model.state_dict(), strict=False)
        acts = reads is not None or dropout == 0
        assert lora.target_paths == {"layer": "graph" if acts else "eager"}
        assert any("the parent reads the weight directly" in n for n in notes) == (not acts)
        with torch.no_grad():
            assert torch.equal(lora(x), base)  # B = 0: what the graph computes in the read's place is what it did
            lora.model.layer.lora_B["default"].weight.fill_(0.1)
            assert torch.equal(lora(x), base) != acts  # the adapter acts where the weight is used
            if acts:
                adapted = lora(x)
                lora.merge_adapter()
                assert torch.equal(lora(x), adapted) or reads is not None  # weight uses: the merged weight, bit for bit
