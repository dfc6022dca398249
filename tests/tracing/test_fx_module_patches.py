"""torch.fx's module patches, scoped to the traced tree's classes (`fxlora.tracing.fx_module_patches`):
the same graphs as torch.fx's own patching, ``nn.Module`` itself never reassigned, everything put
back, and torch.fx's own patching wherever the scoped one would differ."""

import threading

import pytest
import torch
import torch.fx._symbolic_trace as symbolic_trace
import torch.nn as nn

from fxlora.tracing import fx_module_patches
from fxlora.tracing.fx_module_patches import scoped_classes
from fxlora.tracing.tracer import LoraTracer

pytestmark = pytest.mark.skipif(not fx_module_patches._SUPPORTED, reason="this torch.fx has other internals")

GETATTR, CALL, CALL_IMPL = nn.Module.__getattr__, nn.Module.__call__, nn.Module._call_impl


class Seen:
    """What ``nn.Module`` and the tree's classes held while a forward ran."""

    def __init__(self) -> None:
        self.module_dict: dict = {}
        self.block_getattr = None

    def record(self, block: nn.Module) -> None:
        self.module_dict = {name: nn.Module.__dict__[name] for name in ("__getattr__", "__call__", "_call_impl")}
        self.block_getattr = type(block).__dict__.get("__getattr__")


SEEN = Seen()


class Block(nn.Module):
    """Reads its parameter as Python (``self.weight * 2``: a graph node only through the
    ``__getattr__`` patch), reads a buffer, calls a child twice and itself recursively, and
    builds a module during the call."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("offset", torch.randn(4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x, depth: int = 2):
        SEEN.record(self)
        if depth:
            x = self(x, depth - 1)  # the module calling itself: intercepted again
        doubled = self.weight * 2
        y = self.proj(self.proj(x)) @ doubled + self.offset
        return nn.ReLU()(y)  # no submodule: traced inline


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x)).sum(-1)


def trace(root: nn.Module, through: bool = True):
    ids = {id(m) for m in root.modules()} if through else {id(root)}
    graph = LoraTracer(ids).trace(root)
    return graph.python_code("self").src


@pytest.fixture
def fx_patching(monkeypatch):
    """torch.fx's own patching for every trace."""
    monkeypatch.setattr(fx_module_patches, "scoped_classes", lambda root: None)


def assert_put_back(*classes: type) -> None:
    assert nn.Module.__dict__["__getattr__"] is GETATTR and nn.Module.__dict__["__call__"] is CALL
    assert nn.Module.__dict__["_call_impl"] is CALL_IMPL
    for cls in classes:
        assert "__getattr__" not in cls.__dict__ and "_call_impl" not in cls.__dict__
    assert symbolic_trace.CURRENT_PATCHER is None and symbolic_trace._new_patcher is fx_module_patches._NEW_PATCHER


@pytest.mark.parametrize("through", [True, False])
def test_graphs_equal_torch_fx_own_patching(through, monkeypatch):
    torch.manual_seed(0)
    model = Outer()
    scoped = trace(model, through)
    monkeypatch.setattr(fx_module_patches, "scoped_classes", lambda root: None)
    assert scoped == trace(model, through)
    if through:
        assert "weight" in scoped and "mul" in scoped and "offset" in scoped and "relu" in scoped
        assert scoped.count("block_proj") >= 6  # 3 calls of the block, 2 of its child each
    else:
        assert "self.block(" in scoped


def test_graphs_run_like_the_model():
    torch.manual_seed(0)
    model = Outer()
    graph = LoraTracer({id(m) for m in model.modules()}).trace(model)
    x = torch.randn(3, 4)
    assert torch.equal(torch.fx.GraphModule(model, graph)(x), model(x))


def test_nn_module_is_never_reassigned_and_everything_is_put_back():
    model = Outer()
    trace(model)
    assert SEEN.module_dict["__getattr__"] is GETATTR and SEEN.module_dict["__call__"] is CALL
    assert SEEN.module_dict["_call_impl"] is not CALL_IMPL  # the call wrapper, behind __call__
    assert SEEN.block_getattr is not None  # torch.fx's wrapper, on the tree's class
    assert_put_back(Outer, Block, nn.Linear)


def test_a_failing_trace_puts_everything_back():
    class Failing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            if self.proj(x).sum() > 0:  # a proxy decides control flow
                return x
            return -x

    model = Failing()
    with pytest.raises(Exception):
        trace(model)
    assert_put_back(Failing, nn.Linear)


def test_a_class_with_its_own_getattr_alias_gets_it_back():
    class Aliased(nn.Linear):
        __getattr__ = nn.Module.__getattr__

    model = nn.Sequential(Aliased(4, 4))
    assert scoped_classes(model) is not None
    trace(model)
    assert Aliased.__dict__["__getattr__"] is GETATTR
    assert_put_back(nn.Sequential)


class OwnGetattr(nn.Linear):
    def __getattr__(self, name):
        return super().__getattr__(name)


def test_torch_fx_own_patching_where_the_scoped_one_would_differ():
    assert scoped_classes(nn.Sequential(OwnGetattr(4, 4))) is None  # its super() call needs nn.Module's patch
    compiled = nn.Sequential(nn.Linear(4, 4))
    compiled[0].compile()
    assert scoped_classes(compiled) is None  # its call skips _call_impl
    assert scoped_classes(lambda x: x) is None
    symbolic_trace.CURRENT_PATCHER = symbolic_trace._Patcher()  # inside another trace
    try:
        assert scoped_classes(nn.Linear(4, 4)) is None
    finally:
        symbolic_trace.CURRENT_PATCHER = None


def test_a_class_with_its_own_getattr_traces_as_with_torch_fx(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(OwnGetattr(4, 4), nn.ReLU())
    own = trace(model)
    monkeypatch.setattr(fx_module_patches, "scoped_classes", lambda root: None)
    assert own == trace(model) and "weight" in own
    assert_put_back(nn.Sequential)


def test_another_threads_forwards_are_unchanged_while_a_trace_runs():
    torch.manual_seed(0)
    other, x = Outer(), torch.randn(3, 4)
    expected = other(x)
    stop, results = threading.Event(), []

    def run():
        while not stop.is_set():
            results.append(torch.equal(other(x), expected))

    thread = threading.Thread(target=run)
    thread.start()
    try:
        for _ in range(20):
            trace(Outer())
    finally:
        stop.set()
        thread.join()
    assert results and all(results)
