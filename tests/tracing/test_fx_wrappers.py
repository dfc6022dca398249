"""torch.fx's leaf-function wrappers are built once per function across fxlora traces, and traces
record and leave behind exactly what they did before (`fxlora.tracing.fx_wrappers`)."""

import math
import threading

import pytest
import torch
import torch.fx as fx
import torch.fx._symbolic_trace as symbolic_trace
import torch.nn as nn

import fxlora
from fxlora import LoraConfig
from fxlora.tracing import fx_wrappers
from fxlora.tracing.fx_wrappers import reused_wrappers

pytestmark = pytest.mark.skipif(fx_wrappers._ORIGINAL is None, reason="this torch.fx builds no wrappers")


class Scaled(nn.Module):
    """Calls a ``math`` function on a traced size: torch.fx must record it as a leaf call."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x) / math.sqrt(x.size(-1))


@pytest.fixture
def builds(monkeypatch):
    """The functions torch.fx's own builder is asked to wrap."""
    seen = []
    original = fx_wrappers._ORIGINAL

    def counting(fn):
        seen.append(fn)
        return original(fn)

    monkeypatch.setattr(fx_wrappers, "_ORIGINAL", counting)
    monkeypatch.setattr(symbolic_trace, "_create_wrapped_func", counting)  # as if torch.fx's own
    monkeypatch.setattr(fx_wrappers, "_BUILT", {})
    return seen


def transform():
    torch.manual_seed(0)
    return fxlora.transform(Scaled(), LoraConfig(target_modules=["proj"], init_lora_weights=False))


def test_a_second_trace_builds_no_wrapper(builds):
    transform()
    first = len(builds)
    assert first > 0 and math.sqrt in builds
    model = transform()
    assert len(builds) == first
    x = torch.randn(2, 8)
    assert torch.allclose(model(x), model.model.proj(x) / math.sqrt(8))
    assert "sqrt" in model.graph_code()  # still a leaf call in the graph, not a constant


def test_traces_leave_torch_fx_and_math_as_they_were():
    sqrt, builder = math.sqrt, symbolic_trace._create_wrapped_func
    transform()
    assert math.sqrt is sqrt and symbolic_trace._create_wrapped_func is builder
    with reused_wrappers():
        with reused_wrappers():  # nested
            assert symbolic_trace._create_wrapped_func is fx_wrappers._built_once
        assert symbolic_trace._create_wrapped_func is fx_wrappers._built_once
    assert symbolic_trace._create_wrapped_func is builder
    graph = fx.Tracer().trace(Scaled())  # a plain torch.fx trace afterwards: torch.fx's own wrappers
    assert any(n.target is math.sqrt for n in graph.nodes)


def test_traces_in_threads_restore_the_builder_when_the_last_ends():
    builder = symbolic_trace._create_wrapped_func
    barrier, inside, release = threading.Barrier(2), [], threading.Event()

    def trace(wait: bool):
        with reused_wrappers():
            barrier.wait()
            inside.append(symbolic_trace._create_wrapped_func is fx_wrappers._built_once)
            if wait:
                release.wait(10)

    slow = threading.Thread(target=trace, args=(True,))
    slow.start()
    trace(False)  # ends first: the other thread's block still runs
    assert symbolic_trace._create_wrapped_func is fx_wrappers._built_once
    release.set()
    slow.join()
    assert inside == [True, True]
    assert symbolic_trace._create_wrapped_func is builder


def test_someone_elses_builder_is_left_alone(monkeypatch):
    def theirs(fn):
        return fx_wrappers._ORIGINAL(fn)

    monkeypatch.setattr(symbolic_trace, "_create_wrapped_func", theirs)
    with reused_wrappers():
        assert symbolic_trace._create_wrapped_func is theirs
    model = transform()
    assert symbolic_trace._create_wrapped_func is theirs
    assert "sqrt" in model.graph_code()
