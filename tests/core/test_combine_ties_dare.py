"""add_weighted_adapter's pruning merges (ties, dare_linear, dare_ties, magnitude_prune and their
_svd forms) against peft 0.21.2: the same combined tensors (DARE: under the same seed, bit for
bit), the same outputs; properties from the definitions; clear errors."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxlora
from fxlora import LoraConfig
from fxlora.core.task_merge import merge_task_tensors
from models import ConvNet2d, EmbeddingModel, MLP, copy_peft_adapter_weights, peft_key_to_fxlora

peft = pytest.importorskip("peft")

METHODS = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]
ALL = METHODS + [f"{m}_svd" for m in METHODS]
MODELS = [
    ("mlp", lambda: MLP(12), ["seq.0", "seq.2"], lambda: torch.randn(3, 20)),
    ("conv2d", ConvNet2d, ["conv1", "conv3"], lambda: torch.randn(2, 3, 9, 9)),
    ("embedding", EmbeddingModel, ["emb", "proj"], lambda: torch.randint(0, 50, (2, 6))),
]


def pair(make, targets, init=False):
    """The same two adapters (equal ranks, different alphas) on a peft and an fxlora copy."""
    torch.manual_seed(0)
    base = make()
    cfgs = [dict(target_modules=targets, r=4, lora_alpha=8, init_lora_weights=init),
            dict(target_modules=targets, r=4, lora_alpha=3, init_lora_weights=init)]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfgs[0]))
    pm.add_adapter("b", peft.LoraConfig(**cfgs[1]))
    fm = fxlora.transform(copy.deepcopy(base), LoraConfig(**cfgs[0]))
    fm.add_adapter("b", LoraConfig(**cfgs[1]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_()
    copy_peft_adapter_weights(pm, fm)
    return pm.eval(), fm.eval()


def tensors_of(model, adapter, peft_names=False):
    out = {}
    for k, v in model.state_dict().items():
        if f".{adapter}" in k and "lora_" in k:
            out[peft_key_to_fxlora(k) if peft_names else k] = v
    return out


def combine_both(pm, fm, seed=1, **kw):
    torch.manual_seed(seed)
    pm.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", **kw)
    torch.manual_seed(seed)
    fm.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", **kw)
    pm.set_adapter("mix"), fm.set_adapter("mix")


@pytest.mark.parametrize("name, make, targets, make_x", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("combination", ALL)
def test_same_tensors_and_outputs_as_peft(name, make, targets, make_x, combination):
    pm, fm = pair(make, targets)
    kw = dict(combination_type=combination, density=0.4)
    if "ties" in combination:
        kw["majority_sign_method"] = "frequency" if name == "conv2d" else "total"
    combine_both(pm, fm, **kw)
    theirs, ours = tensors_of(pm, "mix", peft_names=True), tensors_of(fm, "mix")
    assert set(theirs) == set(ours)
    for key, value in theirs.items():
        if combination.endswith("_svd"):  # the deltas are computed differently: equal to rounding
            torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:  # the very same arithmetic: bit for bit
            assert torch.equal(ours[key], value), key
    x = make_x()
    torch.testing.assert_close(fm(x), pm(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("combination", ["dare_linear", "dare_ties"])
def test_dare_follows_peft_random_draws_when_the_first_adapter_has_the_default_init(combination):
    # creating the new adapter draws its init before pruning (in both libraries)
    pm, fm = pair(lambda: MLP(12), ["seq.0", "seq.2"], init=True)
    combine_both(pm, fm, seed=5, combination_type=combination, density=0.3)
    theirs, ours = tensors_of(pm, "mix", peft_names=True), tensors_of(fm, "mix")
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
    # and a different seed gives a different result
    fm.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix2", combination_type=combination, density=0.3)
    assert not torch.equal(fm.get_submodule("seq.0").lora_A["mix2"].weight, fm.get_submodule("seq.0").lora_A["mix"].weight)


@pytest.mark.parametrize("reference, combination", [
    ("linear", "magnitude_prune"), ("linear", "dare_linear"), ("svd", "magnitude_prune_svd"), ("svd", "dare_linear_svd"),
    ("ties", "dare_ties"), ("ties_svd", "dare_ties_svd"),
])
def test_density_one_prunes_nothing(reference, combination):
    _, fm = pair(lambda: MLP(12), ["seq.0", "seq.2"])
    kw = {} if reference in ("linear", "svd") else {"density": 1.0}
    fm.add_weighted_adapter(["default", "b"], [0.7, -0.4], "ref", combination_type=reference, **kw)
    fm.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=combination, density=1.0)
    ref, mix = tensors_of(fm, "ref"), tensors_of(fm, "mix")
    for key, value in ref.items():
        torch.testing.assert_close(mix[key.replace(".ref", ".mix")], value, rtol=1e-4, atol=1e-5)


tensor_lists = st.integers(1, 4).flatmap(
    lambda n: st.tuples(st.lists(st.integers(0, 10_000), min_size=n, max_size=n), st.lists(st.floats(-2, 2), min_size=n, max_size=n))
)


@settings(max_examples=40, deadline=None)
@given(seeds_weights=tensor_lists, density=st.floats(0, 1), method=st.sampled_from(METHODS), sign=st.sampled_from(["total", "frequency"]))
def test_merge_properties(seeds_weights, density, method, sign):
    seeds, weights = seeds_weights
    tensors = [torch.randn(5, 7, generator=torch.Generator().manual_seed(s)) for s in seeds]
    w = torch.tensor(weights)
    if method.startswith("dare") and density < torch.finfo(torch.float32).tiny:  # refused by add_weighted_adapter
        density = 0.5
    torch.manual_seed(0)
    merged = merge_task_tensors(method, tensors, w, density, sign)
    assert merged.shape == (5, 7) and torch.isfinite(merged).all()
    if method == "magnitude_prune":
        kept = int(density * 35) if density < 1 else 35
        # each tensor keeps at most `kept` entries: the merge has at most n * kept non-zeros
        assert int((merged != 0).sum()) <= len(tensors) * kept
        if density == 0:
            assert not merged.any()
    if method in ("ties", "dare_ties"):
        # the TIES mean of agreeing entries is bounded by the largest agreeing weighted entry
        bound = torch.stack([t.abs() * abs(x) for t, x in zip(tensors, weights)]).amax(0) / (density if method == "dare_ties" and density < 1 else 1)
        assert (merged.abs() <= bound + 1e-5).all()
    torch.manual_seed(0)
    assert torch.equal(merge_task_tensors(method, tensors, w, density, sign), merged)  # deterministic given the seed


def test_ties_on_one_tensor_is_its_magnitude_pruning():
    t = torch.randn(6, 6)
    pruned = merge_task_tensors("magnitude_prune", [t], torch.tensor([1.0]), 0.5)
    assert torch.equal(merge_task_tensors("ties", [t], torch.tensor([1.0]), 0.5), pruned)
    assert int((pruned != 0).sum()) == 18 and set(pruned[pruned != 0].abs().tolist()) <= set(t.abs().flatten().topk(18).values.tolist())


def test_a_single_adapter_is_pruned_as_asked():
    _, fm = pair(lambda: MLP(12), ["seq.0", "seq.2"])
    fm.add_weighted_adapter(["default"], [1.0], "mix", combination_type="magnitude_prune", density=0.25)
    a = fm.get_submodule("seq.0").lora_A["mix"].weight
    assert int((a != 0).sum()) == int(0.25 * a.numel())


def test_bad_arguments_are_refused_and_change_nothing():
    _, fm = pair(lambda: MLP(12), ["seq.0", "seq.2"])
    keys = list(fm.state_dict())
    cases = [
        (dict(combination_type="tie", density=0.5), "combination_type must be one of .*'dare_ties'"),
        (dict(combination_type="ties"), "needs density"),
        (dict(combination_type="ties", density=1.5), r"density must be a float in \[0, 1\]"),
        (dict(combination_type="dare_linear", density=0.0), r"\(0, 1\].*divides"),
        (dict(combination_type="dare_ties", density=1e-300), "normal float32"),
        (dict(combination_type="magnitude_prune", density=-0.1), "density must be"),
        (dict(combination_type="svd", density=0.5), "density applies only to"),
        (dict(combination_type="ties", density=0.5, majority_sign_method="mean"), "majority_sign_method must be one of"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            fm.add_weighted_adapter(["default", "b"], [1, 1], "mix", **kw)
    fm.add_adapter("r2", LoraConfig(target_modules=["seq.0"], r=2))
    with pytest.raises(ValueError, match="'ties' needs equal ranks"):
        fm.add_weighted_adapter(["default", "r2"], [1, 1], "mix", combination_type="ties", density=0.5)
    assert list(fm.peft_config) == ["default", "b", "r2"]
    assert set(keys) <= set(fm.state_dict()) and not any(".mix" in k for k in fm.state_dict())


@pytest.mark.parametrize("combination", ["dare_ties", "dare_linear_svd"])
def test_gpt2_conv1d_layers_draw_as_peft_does(combination):
    # Conv1D stores its weight as (in, out): the _svd forms prune the update in that layout
    from zoo import TRANSFORMERS, text_inputs

    pm, fm = pair(lambda: TRANSFORMERS["gpt2"].build(seed=0), ["c_attn", "c_fc"])
    combine_both(pm, fm, seed=3, combination_type=combination, density=0.5)
    theirs, ours = tensors_of(pm, "mix", peft_names=True), tensors_of(fm, "mix")
    assert set(theirs) == set(ours)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=key)
    inputs = text_inputs(fm)
    torch.testing.assert_close(fm(**inputs).logits, pm(**inputs).logits, rtol=1e-4, atol=1e-4)
