"""Hot-swapping adapters into a (compiled) model: `prepare_for_compiled_hotswap`, `hotswap_adapter`.

Oracles: a model freshly loaded with the incoming adapter (same outputs), peft 0.21.2's
``peft.utils.hotswap`` (same outputs from the same files), and a recompile-counting backend
(`torch._dynamo.testing.CompileCounter`: zero new compilations across swaps)."""

import copy
import threading

import pytest
import torch
from hypothesis import given, settings, strategies as st
import torch._dynamo
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch._dynamo.utils import counters

import fxlora
from fxlora import CheckpointError, LoraConfig, MergeError
from fxlora.core.layers import target_meta
from models import MLP, ConvNet2d, EmbeddingModel, Mixed, assert_same_state, state_snapshot

TARGETS = ["seq.0", "seq.2"]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def base(make=lambda: MLP(16)):
    torch.manual_seed(0)
    return make().eval()


def save_adapter(path, seed, make=lambda: MLP(16), **config):
    """An adapter with random tensors (seeded), saved to `path`; returns `path`."""
    config.setdefault("target_modules", TARGETS)
    model = fxlora.transform(base(make), LoraConfig(init_lora_weights=False, **config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:  # trained: other values per adapter
                p.copy_(torch.randn_like(p) * p.detach().std().clamp(min=0.1))
    model.save_pretrained(path)
    return str(path)


def fresh_output(path, x, make=lambda: MLP(16)):
    """What a model freshly loaded with the adapter at `path` computes."""
    with torch.no_grad():
        return fxlora.LoraModel.from_pretrained(base(make), path)(x)
def assert_swaps_without_recompiling(model, paths, x, make) -> None:
    """`model` compiled, then each adapter of `paths` hot-swapped in turn: every compiled output
    equals a fresh load of that adapter, and nothing compiles after the first call."""
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        compiled(x)
        frames = counter.frame_count
        for path in paths:
            model.hotswap_adapter(path)
            torch.testing.assert_close(compiled(x), fresh_output(path, x, make), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == frames




@pytest.fixture
def adapters(tmp_path):
    """Adapters of different ranks, alphas and scaling rules for the same targets."""
    specs = {
        "r4": dict(r=4, lora_alpha=8),
        "r8": dict(r=8, lora_alpha=16),
        "r2": dict(r=2, lora_alpha=3),
        "r6_rslora": dict(r=6, lora_alpha=5, use_rslora=True),
        "patterns": dict(r=4, lora_alpha=8, rank_pattern={"seq.0": 2}, alpha_pattern={"seq.2": 1}),
        "r8_alpha4": dict(r=8, lora_alpha=4),
        "rank_pattern": dict(r=4, lora_alpha=8, rank_pattern={"seq.0": 2}),
    }
    return {name: save_adapter(tmp_path / name, seed, **spec) for seed, (name, spec) in enumerate(specs.items(), start=1)}


def loaded(path, make=lambda: MLP(16)):
    return fxlora.LoraModel.from_pretrained(base(make), path)


# ---------------------------------------------------------------------- preparing
def test_prepare_pads_with_exact_zeros_and_keeps_outputs_and_scaling(adapters, tmp_path):
    model = loaded(adapters["r4"])
    x = torch.randn(5, 20)
    before = model(x)
    a_before = model.model.seq[0].lora_A["default"].weight.detach().clone()
    model.prepare_for_compiled_hotswap(target_rank=8)
    a, b = model.model.seq[0].lora_A["default"].weight, model.model.seq[0].lora_B["default"].weight
    assert a.shape == (8, 20) and b.shape == (16, 8)
    assert torch.equal(a[:4], a_before) and torch.count_nonzero(a[4:]) == 0 and torch.count_nonzero(b[:, 4:]) == 0
    assert model.model.seq[0].lora_A["default"].out_features == 8
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    spec = target_meta(model.model.seq[0]).adapters["default"]
    assert spec.r == 8 and spec.scaling == 2.0 and float(spec.scaling_cell) == 2.0
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha) == (8, 16.0)  # PEFT sets r=8 and keeps alpha 8: scaling 1 on reload
    model.save_pretrained(tmp_path / "padded")  # the padded adapter reloads to the same model
    torch.testing.assert_close(fresh_output(tmp_path / "padded", x), before, rtol=0, atol=1e-6)


def test_prepare_refuses_a_rank_above_the_target_and_changes_nothing(adapters):
    model = loaded(adapters["r8"])
    snapshot, config = state_snapshot(model), model.peft_config["default"]
    with pytest.raises(ValueError, match=r"rank 8 > target_rank 4"):
        model.prepare_for_compiled_hotswap(target_rank=4)
    assert_same_state(model, snapshot)
    assert model.peft_config["default"] is config and target_meta(model.model.seq[0]).adapters["default"].scaling_cell is None
    with pytest.raises(ValueError, match="positive int"):
        model.prepare_for_compiled_hotswap(target_rank=0)


# ---------------------------------------------------------------------- swapping, compiled
@pytest.mark.parametrize(
    "backend, fullgraph, options",
    [("counter", True, {}), ("counter", False, {}), ("aot_eager", True, {}), ("counter", True, {"fold_scaling": False}), ("counter", False, {"guard_idle": True})],
)
def test_compiled_model_swaps_ranks_and_alphas_with_zero_recompiles(adapters, backend, fullgraph, options, cond_kept):
    """aot_eager: the scaling tensors stay graph inputs through AOT tracing (not constants);
    the pass options: the scaling reaches every form of the branch."""
    model = loaded(adapters["r4"])
    model.set_optimizations(**options)
    model.prepare_for_compiled_hotswap(target_rank=8)
    counter = CompileCounter() if backend == "counter" else CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=fullgraph)
    x = torch.randn(5, 20)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), fresh_output(adapters["r4"], x))
        frames, graphs = counter.frame_count, counters["stats"]["unique_graphs"]
        assert frames == 1
        previous = compiled(x)
        for name in ["r8", "r2", "r6_rslora", "patterns", "r8_alpha4", "r4"]:
            model.hotswap_adapter(adapters[name])
            got = compiled(x)
            torch.testing.assert_close(got, fresh_output(adapters[name], x), rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(model(x), got, rtol=1e-5, atol=1e-6, msg=name)  # eager code agrees
            assert not torch.allclose(got, previous), name  # the swap did change the model
            previous = got
    assert counter.frame_count == frames and counters["stats"]["unique_graphs"] == graphs


def test_a_new_alpha_alone_reaches_the_compiled_graph(adapters):
    """Same tensors, another lora_alpha: the compiled code reads the scaling at run time (a
    scaling baked in as a number would be stale or recompile)."""
    model = loaded(adapters["r8"])
    model.prepare_for_compiled_hotswap()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(3, 20)
    config = LoraConfig(target_modules=TARGETS, r=8, lora_alpha=4)
    with torch.no_grad():
        first = compiled(x)
        tensors = {k: v.clone() for k, v in fxlora.get_peft_model_state_dict(model).items()}
        model.hotswap_adapter(tensors, config=config)
        got = compiled(x)
        want = fxlora.transform(base(), config)
        fxlora.set_peft_model_state_dict(want, tensors)
        torch.testing.assert_close(got, want(x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    assert not torch.allclose(got, first)
    assert float(target_meta(model.model.seq[0]).adapters["default"].scaling_cell) == 0.5
    assert model.peft_config["default"].lora_alpha == 4


def test_eager_path_targets_also_swap_without_recompiling(tmp_path):
    targets = ["stem", "blocks.0.fc1", "blocks.1.0"]
    small = save_adapter(tmp_path / "small", 1, Mixed, target_modules=targets, r=2, lora_alpha=5)
    large = save_adapter(tmp_path / "large", 2, Mixed, target_modules=targets, r=6, lora_alpha=2)
    model = loaded(small, Mixed)
    assert "eager" in model.target_paths.values() and "graph" in model.target_paths.values()
    model.prepare_for_compiled_hotswap(target_rank=6)
    assert_swaps_without_recompiling(model, [large, small, large], torch.randn(4, 6), Mixed)


# ---------------------------------------------------------------------- against peft
def peft_model(path):
    peft = pytest.importorskip("peft")
    return peft.PeftModel.from_pretrained(base(), path).eval()


def test_same_files_give_peft_outputs(adapters):
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap as peft_prepare

    theirs = peft_model(adapters["r4"])
    peft_prepare(theirs, target_rank=8)
    ours = loaded(adapters["r4"])
    fxlora.prepare_model_for_compiled_hotswap(ours, target_rank=8)
    x = torch.randn(5, 20)
    with torch.no_grad():
        for name in ["r8", "r2", "r8_alpha4"]:  # no patterns: PEFT's hotswap ignores them (below)
            peft_hotswap(theirs, adapters[name], adapter_name="default", torch_device="cpu")
            fxlora.hotswap_adapter(ours, adapters[name], "default")
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6, msg=name)


def test_peft_ignores_rank_pattern_when_swapping_fxlora_does_not(adapters):
    """peft 0.21.2 matches rank_pattern keys against parameter names ('seq.0.lora_A.default.weight'),
    so a per-layer rank is missed and that layer's scaling is wrong; fxlora gives a fresh load's output."""
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap as peft_prepare

    x = torch.randn(5, 20)
    with torch.no_grad():
        want = fresh_output(adapters["rank_pattern"], x)
        torch.testing.assert_close(peft_model(adapters["rank_pattern"])(x), want)  # peft loads it right
        theirs = peft_model(adapters["r8"])
        peft_prepare(theirs, target_rank=8)
        peft_hotswap(theirs, adapters["rank_pattern"], adapter_name="default", torch_device="cpu")
        assert not torch.allclose(theirs(x), want, atol=1e-4)
        ours = loaded(adapters["r8"])
        ours.hotswap_adapter(adapters["rank_pattern"])
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-6)


def test_peft_state_dict_and_config_are_taken(adapters):
    peft = pytest.importorskip("peft")
    theirs = peft_model(adapters["r2"])
    # a PEFT model's own keys (adapter name inside) and a peft.LoraConfig, as PEFT's function takes them
    state = {k: v for k, v in theirs.state_dict().items() if ".lora_" in k}
    config = peft.LoraConfig(target_modules=TARGETS, r=2, lora_alpha=3)
    ours = loaded(adapters["r4"])
    ours.prepare_for_compiled_hotswap(target_rank=4)
    fxlora.hotswap_adapter_from_state_dict(ours, state, "default", config)
    x = torch.randn(5, 20)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_peft_named_prepare_refuses_a_compiled_model(adapters):
    model = loaded(adapters["r4"])
    with pytest.raises(ValueError, match="before compiling"):
        fxlora.prepare_model_for_compiled_hotswap(torch.compile(model), target_rank=8)
    with pytest.raises(ValueError, match="check_compiled"):
        fxlora.prepare_model_for_compiled_hotswap(model, target_rank=8, check_compiled="maybe")
    fxlora.prepare_model_for_compiled_hotswap(model, target_rank=8)
    compiled = torch.compile(model, backend=CompileCounter())
    fxlora.hotswap_adapter(compiled, adapters["r2"], "default")  # PEFT's call on the compiled wrapper
    x = torch.randn(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), fresh_output(adapters["r2"], x), rtol=1e-5, atol=1e-6)


def test_source_subfolder_and_modules_to_save_copies(tmp_path):
    saved = ["seq.4"]
    one = save_adapter(tmp_path / "outer" / "one", 1, r=2, modules_to_save=saved)
    two = save_adapter(tmp_path / "two", 2, r=4, modules_to_save=saved)
    model = loaded(two)
    model.prepare_for_compiled_hotswap(target_rank=4)
    model.hotswap_adapter(str(tmp_path / "outer"), subfolder="one")
    x = torch.randn(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh_output(one, x), rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.model.seq[4].modules_to_save["default"].weight, loaded(two).model.seq[4].modules_to_save["default"].weight)


# ---------------------------------------------------------------------- refusals
def assert_refused(model, exc, match, *args, **kwargs):
    """`hotswap_adapter(*args)` raises `exc` matching `match`; the model is bit-identical."""
    x = torch.randn(3, 20)
    snapshot, config, before = state_snapshot(model), model.peft_config["default"], model(x)
    specs = {n: (m.lora_A["default"].weight.shape, target_meta(m).adapters["default"].scaling) for n, m in model.model.named_modules() if target_meta(m)}
    with pytest.raises(exc, match=match):
        model.hotswap_adapter(*args, **kwargs)
    assert_same_state(model, snapshot)
    assert model.peft_config["default"] is config
    assert specs == {n: (m.lora_A["default"].weight.shape, target_meta(m).adapters["default"].scaling) for n, m in model.model.named_modules() if target_meta(m)}
    assert torch.equal(model(x), before)


@pytest.fixture
def slot(adapters):
    model = loaded(adapters["r4"])
    model.prepare_for_compiled_hotswap(target_rank=8)
    return model


def test_refuses_other_targets(slot, tmp_path):
    fewer = save_adapter(tmp_path / "fewer", 3, target_modules=["seq.0"], r=4)
    assert_refused(slot, CheckpointError, r"seq\.2\.lora_A\.default\.weight.*incoming adapter does not", fewer)
    more = save_adapter(tmp_path / "more", 3, target_modules=[*TARGETS, "seq.4"], r=4)
    assert_refused(slot, CheckpointError, r"incoming adapter has 'seq\.4\.lora_A", more)


def test_refuses_a_rank_above_the_slot(slot, tmp_path):
    big = save_adapter(tmp_path / "big", 3, r=16)
    assert_refused(slot, CheckpointError, r"incoming rank 16 exceeds the slot's 8.*prepare_for_compiled_hotswap", big)


def test_refuses_other_features(slot, tmp_path):
    dora = save_adapter(tmp_path / "dora", 3, r=4, use_dora=True)
    assert_refused(slot, CheckpointError, r"lora_magnitude_vector", dora)
    biased = save_adapter(tmp_path / "biased", 3, r=4, lora_bias=True)
    assert_refused(slot, CheckpointError, r"lora_B\.default\.bias", biased)
    trains_bias = save_adapter(tmp_path / "bias_all", 3, r=4, bias="all")
    assert_refused(slot, CheckpointError, r"bias='all', the slot's is 'none'", trains_bias)


def test_refuses_bad_tensors_and_changes_none_of_the_good_ones(slot):
    good = {k: torch.randn_like(v) for k, v in fxlora.get_peft_model_state_dict(slot).items()}
    config = LoraConfig(target_modules=TARGETS, r=8, lora_alpha=2)
    wrong_shape = dict(good, **{"base_model.model.seq.2.lora_A.weight": torch.randn(8, 15)})
    assert_refused(slot, CheckpointError, r"expected shape \(8, 16\), found \(8, 15\)", wrong_shape, config=config)
    wrong_dtype = dict(good, **{"base_model.model.seq.2.lora_B.weight": good["base_model.model.seq.2.lora_B.weight"].double()})
    assert_refused(slot, CheckpointError, r"float64 does not fit the slot's torch.float32", wrong_dtype, config=config)
    assert_refused(slot, ValueError, r"needs its config", good)
    slot.hotswap_adapter({k: v.bfloat16() for k, v in good.items()}, config=config)  # an exact upcast is fine
    assert torch.equal(slot.model.seq[2].lora_B["default"].weight, good["base_model.model.seq.2.lora_B.weight"].bfloat16().float())


def test_refuses_a_merged_slot(slot, adapters):
    slot.merge_adapter()
    snapshot = state_snapshot(slot)
    with pytest.raises(MergeError, match="unmerge_adapter"):
        slot.hotswap_adapter(adapters["r2"])
    assert_same_state(slot, snapshot)


def test_peft_leaves_a_half_swapped_model_fxlora_does_not(adapters):
    """peft 0.21.2 checks keys, not shapes, before copying: a bad tensor late in the dict fails
    after the earlier ones were copied."""
    from peft.utils.hotswap import hotswap_adapter_from_state_dict as peft_from_state_dict

    theirs = peft_model(adapters["r4"])
    keys = [k for k in theirs.state_dict() if ".lora_" in k]
    bad = {k: torch.randn_like(theirs.state_dict()[k]) for k in keys}
    bad[keys[-1]] = torch.randn(3, 3)
    before = {k: theirs.state_dict()[k].clone() for k in keys}
    with pytest.raises(Exception):
        peft_from_state_dict(theirs, bad, "default", theirs.peft_config["default"])
    assert not torch.equal(theirs.state_dict()[keys[0]], before[keys[0]])  # half swapped
    ours = loaded(adapters["r4"])
    ours_bad = {k.replace(".default", ""): v for k, v in bad.items()}
    assert_refused(ours, CheckpointError, "expected shape", ours_bad, config=LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8))


# ---------------------------------------------------------------------- without preparing, other kinds
def test_unprepared_slot_swaps_smaller_ranks_and_new_alphas(adapters):
    model = loaded(adapters["r8"])
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 20)
    with torch.no_grad():
        compiled(x)
        for name in ["r8_alpha4", "r2", "r4"]:  # the first new scaling gives the slot its tensors
            model.hotswap_adapter(adapters[name])
            torch.testing.assert_close(compiled(x), fresh_output(adapters[name], x), rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 2
    assert model.model.seq[0].lora_A["default"].weight.shape == (8, 20)


@pytest.mark.parametrize(
    "make, targets, x",
    [
        (ConvNet2d, ["conv1", "conv3"], lambda: torch.randn(2, 3, 8, 8)),
        (EmbeddingModel, ["emb", "proj"], lambda: torch.randint(0, 50, (3, 7))),
    ],
)
def test_conv_and_embedding_slots(tmp_path, make, targets, x):
    small = save_adapter(tmp_path / "small", 1, make, target_modules=targets, r=2, lora_alpha=3)
    large = save_adapter(tmp_path / "large", 2, make, target_modules=targets, r=4, lora_alpha=8)
    model = loaded(large, make)
    model.prepare_for_compiled_hotswap(target_rank=4)
    assert_swaps_without_recompiling(model, [small, large, small], x(), make)


def test_dora_slot_takes_dora_adapters(tmp_path):
    small = save_adapter(tmp_path / "small", 1, r=2, lora_alpha=3, use_dora=True)
    large = save_adapter(tmp_path / "large", 2, r=4, lora_alpha=8, use_dora=True)
    model = loaded(large)
    model.prepare_for_compiled_hotswap(target_rank=4)
    x = torch.randn(3, 20)
    with torch.no_grad():
        for path in [small, large]:
            model.hotswap_adapter(path)
            torch.testing.assert_close(model(x), fresh_output(path, x), rtol=1e-5, atol=1e-6)
    plain = save_adapter(tmp_path / "plain", 3, r=4)
    assert_refused(model, CheckpointError, r"lora_magnitude_vector", plain)


# ---------------------------------------------------------------------- saving, threads
def test_a_swapped_adapter_saves_as_itself(adapters, tmp_path):
    model = loaded(adapters["r8"])
    model.prepare_for_compiled_hotswap(target_rank=8)
    model.hotswap_adapter(adapters["patterns"])
    model.save_pretrained(tmp_path / "saved")
    x = torch.randn(4, 20)
    with torch.no_grad():
        torch.testing.assert_close(fresh_output(tmp_path / "saved", x), fresh_output(adapters["patterns"], x), rtol=1e-5, atol=1e-6)


def test_calls_in_other_threads_see_one_adapter_or_the_other(adapters):
    """The swap holds the model's call lock: a call racing it computes wholly with the old or
    wholly with the new adapter, never with a mix of their tensors or scalings."""
    model = loaded(adapters["r4"])
    model.prepare_for_compiled_hotswap(target_rank=8)
    x = torch.randn(8, 20)
    with torch.no_grad():
        want = [fresh_output(adapters["r4"], x), fresh_output(adapters["r8_alpha4"], x)]
    outputs, stop = [], threading.Event()

    def serve():
        with torch.no_grad():
            while not stop.is_set():
                outputs.append(model(x))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for i in range(20):
            model.hotswap_adapter(adapters["r8_alpha4" if i % 2 == 0 else "r4"])
    finally:
        stop.set()
        thread.join()
    assert outputs
    for out in outputs:
        assert any(torch.allclose(out, w, rtol=1e-5, atol=1e-6) for w in want)


def test_mixed_batches_and_run_time_scale_follow_the_swap(adapters):
    """Eager code (a known state, a mixed batch) bakes scalings in as numbers: a swap drops it."""
    model = loaded(adapters["r4"])
    model.load_adapter(adapters["r8"], "other")
    model.prepare_for_compiled_hotswap(target_rank=8)
    assert model.model.seq[0].lora_A["other"].weight.shape == (8, 20)  # every adapter is a slot
    model.set_adapter_scale("default", 0.5)
    x = torch.randn(4, 20)
    names = ["default", "other", "__base__", "default"]
    with torch.no_grad():
        model(x, adapter_names=names)
        model(x)
        model.hotswap_adapter(adapters["r8_alpha4"])
        model.hotswap_adapter(adapters["r2"], "other")
        assert model.get_adapter_scale("default") == 0.5 and model.active_adapters == ["default"]
        got_mixed, got = model(x, adapter_names=names), model(x)
        want = loaded(adapters["r8_alpha4"])
        want.load_adapter(adapters["r2"], "other")
        want.set_adapter_scale("default", 0.5)
        torch.testing.assert_close(got, want(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_mixed, want(x, adapter_names=names), rtol=1e-5, atol=1e-6)


def test_a_peft_models_own_state_dict_with_dora_and_copies():
    """Keys as a PEFT model names them (adapter name inside, DoRA's ``...default.weight``,
    ``modules_to_save.default``): taken, and the output is PEFT's."""
    peft = pytest.importorskip("peft")
    config = dict(target_modules=TARGETS, r=4, use_dora=True, modules_to_save=["seq.4"])
    theirs = peft.get_peft_model(base(), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    state = {k: v for k, v in theirs.state_dict().items() if ".lora_" in k or ".modules_to_save." in k}
    ours = fxlora.transform(base(), LoraConfig(**config))
    ours.prepare_for_compiled_hotswap(target_rank=8)
    fxlora.hotswap_adapter_from_state_dict(ours, state, "default", theirs.peft_config["default"])
    x = torch.randn(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_under_inference_mode_the_slot_stays_usable_outside_it(adapters):
    model = loaded(adapters["r4"])
    x = torch.randn(2, 20)
    with torch.inference_mode():
        model.prepare_for_compiled_hotswap(target_rank=8)
        model.hotswap_adapter(adapters["r2"])
        torch.testing.assert_close(model(x), fresh_output(adapters["r2"], x), rtol=1e-5, atol=1e-6)
    assert not any(p.is_inference() for p in model.parameters())
    assert not target_meta(model.model.seq[0]).adapters["default"].scaling_cell.is_inference()
    model.hotswap_adapter(adapters["r8"])  # in place, outside inference mode
    torch.testing.assert_close(model(x), fresh_output(adapters["r8"], x), rtol=1e-5, atol=1e-6)


def test_peft_saves_a_padded_adapter_with_another_scaling_fxlora_does_not(adapters, tmp_path):
    """peft 0.21.2's prepare(..., config=peft_config) sets r to the target rank and keeps
    lora_alpha: the padded adapter it saves reloads with alpha/8 instead of alpha/4."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap as peft_prepare

    x = torch.randn(3, 20)
    theirs = peft_model(adapters["r4"])
    with torch.no_grad():
        want = theirs(x)
        peft_prepare(theirs, target_rank=8, config=theirs.peft_config)
        theirs.save_pretrained(tmp_path / "peft_padded")
        assert not torch.allclose(peft_model(tmp_path / "peft_padded")(x), want, atol=1e-4)
        ours = loaded(adapters["r4"])
        fxlora.prepare_model_for_compiled_hotswap(ours, target_rank=8, config=ours.peft_config)
        ours.save_pretrained(tmp_path / "fxlora_padded")
        torch.testing.assert_close(peft_model(tmp_path / "fxlora_padded")(x), want, rtol=1e-5, atol=1e-6)  # peft reads it right


# ---------------------------------------------------------------------- properties

def random_adapter(r, alpha, use_rslora, seed):
    """(PEFT-format tensors, config) of a random adapter of rank `r` on the MLP's targets."""
    config = LoraConfig(target_modules=TARGETS, r=r, lora_alpha=alpha, use_rslora=use_rslora)
    shapes = fxlora.get_peft_model_state_dict(fxlora.transform(base(), config))
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in shapes.items()}, config


adapter_args = st.tuples(st.integers(1, 6), st.floats(0.5, 32), st.booleans(), st.integers(0, 2**16))


@settings(max_examples=15)
@given(first=adapter_args, second=adapter_args, extra=st.integers(0, 3))
def test_a_swap_computes_what_a_fresh_load_computes(first, second, extra):
    tensors, config = random_adapter(*first)
    model = fxlora.transform(base(), config)
    fxlora.set_peft_model_state_dict(model, tensors)
    model.prepare_for_compiled_hotswap(target_rank=max(first[0], second[0]) + extra)
    new_tensors, new_config = random_adapter(*second)
    model.hotswap_adapter(new_tensors, config=new_config)
    want = fxlora.transform(base(), new_config)
    fxlora.set_peft_model_state_dict(want, new_tensors)
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(first[3]))
    with torch.no_grad():
        got, expected = model(x), want(x)
    # the padded rank sums in another order: float32 rounding of the largest output's size
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=4e-5 * max(1.0, expected.abs().max().item()))


@settings(max_examples=15)
@given(args=adapter_args, which=st.integers(0, 3), fault=st.sampled_from(["shape", "dtype", "missing", "extra"]))
def test_any_bad_tensor_is_refused_and_changes_nothing(args, which, fault):
    tensors, config = random_adapter(*args)
    model = fxlora.transform(base(), config)
    model.prepare_for_compiled_hotswap(target_rank=6)
    bad = dict(tensors)
    key = sorted(bad)[which]
    if fault == "shape":
        bad[key] = torch.randn(*[n + 1 for n in bad[key].shape])
    elif fault == "dtype":
        bad[key] = bad[key].double()
    elif fault == "missing":
        del bad[key]
    else:
        bad["base_model.model.seq.4.lora_A.weight"] = torch.randn(args[0], 16)
    assert_refused(model, CheckpointError, "nothing was changed|does not fit", bad, config=config)


class _Attention(torch.nn.Module):
    """nn.MultiheadAttention (a kind that computes its adapted call itself) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_layers_computing_their_own_call_read_the_swapped_scaling_too(tmp_path):
    """nn.MultiheadAttention's compiled code reads the slot's scaling tensor, as linear branches do:
    a swap to another alpha neither recompiles nor leaves a stale scaling."""
    torch.manual_seed(0)
    base_model = _Attention().eval()
    directories = {}
    for name, alpha, seed in (("a", 8, 1), ("b", 32, 2)):
        torch.manual_seed(seed)
        trained = fxlora.transform(copy.deepcopy(base_model), LoraConfig(target_modules=["attn", "fc"], r=4, lora_alpha=alpha, init_lora_weights=False))
        directories[name] = tmp_path / name
        trained.save_pretrained(directories[name])
    x = torch.randn(2, 5, 16)
    model = fxlora.LoraModel.from_pretrained(copy.deepcopy(base_model), directories["a"]).eval()
    model.prepare_for_compiled_hotswap(target_rank=4)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        compiled(x)
        model.hotswap_adapter(directories["b"])
        got = compiled(x)
        want = fxlora.LoraModel.from_pretrained(copy.deepcopy(base_model), directories["b"]).eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
