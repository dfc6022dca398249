"""fxlora uses ``torch.cond`` only on a torch that keeps a compiled frame's state updates across it
(`fxlora.runtime.cond_support`): this torch is checked against that claim, and a module updating
its own state around an adapted graph root, compiled for inference, keeps every update."""

import copy

import pytest
import torch
import torch._dynamo
import torch.nn as nn

import fxlora
from fxlora.runtime import cond_support
from fxlora.runtime.cond_support import cond_keeps_state


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class Counting(nn.Module):
    """Counts its calls before and after calling `inner` (or a ``torch.cond`` when None)."""

    def __init__(self, inner=None):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.inner is None:
            y = torch.cond(x.sum() > 0, lambda t: t + 1, lambda t: t - 1, (x,))
        else:
            y = self.inner(x)
        self.calls += 10
        return y


def test_this_torch_keeps_state_across_a_cond_exactly_when_cond_keeps_state_says():
    counting = Counting()
    with torch.no_grad():
        torch.compile(counting, backend="eager", fullgraph=True)(torch.randn(3))
    kept = counting.calls == 11
    assert kept == cond_keeps_state(), (
        f"torch {torch.__version__} {'keeps' if kept else 'drops'} the updates: move "
        "fxlora.runtime.cond_support.KEEPS_STATE_FROM"
    )


@pytest.mark.parametrize("merged", [False, True])
def test_a_module_counting_its_calls_around_an_adapted_root_keeps_its_count_compiled(merged):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model = fxlora.transform(net, fxlora.LoraConfig(target_modules=["0", "2"], init_lora_weights=False))
    model.eval()  # traces and builds the evaluation code
    if merged:
        model.merge_adapter()
    counting = Counting(net)
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = copy.deepcopy(counting)(x)
        got = torch.compile(counting, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, expected)
    assert counting.calls == 11  # on main before: 1 (the update after the cond was dropped)


def test_guard_idle_is_refused_on_this_torch_and_the_options_stay():
    if cond_keeps_state():
        pytest.skip("this torch keeps state across torch.cond")
    model = fxlora.transform(nn.Sequential(nn.Linear(4, 4)), fxlora.LoraConfig(target_modules=["0"]))
    before = model.adapter_state.options
    with pytest.raises(ValueError, match="guard_idle=True is refused: .*torch.cond"):
        model.set_optimizations(guard_idle=True, fold_scaling=False)
    assert model.adapter_state.options == before
    model.set_optimizations(guard_idle=False)  # switching it off is always allowed


@pytest.mark.parametrize(
    "version, keeps", [("2.14.1+cu130", False), ("2.15.0", True), ("2.15.0a0+git1234", True), ("3.0.1", True), ("1.13.1", False)]
)
def test_the_version_bound_compares_major_and_minor_releases(monkeypatch, version, keeps):
    monkeypatch.setattr(cond_support, "KEEPS_STATE_FROM", (2, 15))
    assert cond_keeps_state(version) is keeps
    monkeypatch.setattr(cond_support, "KEEPS_STATE_FROM", None)
    assert cond_keeps_state(version) is False
