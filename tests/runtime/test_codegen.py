"""Generated code reads every target, whatever its path components (keywords, quotes,
backslashes, line breaks, identifiers Python normalises), and leaves ordinary graphs alone."""

import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import given, strategies as st

from fxlora.runtime.codegen import compile_graph, safe_targets, written_safely

WRITTEN_WRONG = ['" + str(1/0) + "', 'a" "b', 'a"b', "if", "None", "a\nb", "\r", "a\\b", "º", "ﬁ", "\\", '"""']
WRITTEN_RIGHT = ["x y", "'", "\x0c", "é", "default", "0"]


def graph_reading(key: str) -> tuple[nn.Module, fx.Graph]:
    """A root whose ModuleDict holds a Linear under `key`, and a graph that calls it and reads
    its weight."""
    root = nn.Module()
    root.holder = nn.ModuleDict({key: nn.Linear(3, 2)})
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module(f"holder.{key}", (x,))
    w = graph.get_attr(f"holder.{key}.weight")
    graph.output(graph.call_function(torch.add, (y, graph.call_method("sum", (w,)))))
    return root, graph


def check(key: str) -> None:
    root, graph = graph_reading(key)
    x = torch.randn(4, 3)
    layer = root.holder[key]
    torch.testing.assert_close(compile_graph(graph)(root, x), layer(x) + layer.weight.sum())


def test_names_torch_fx_writes_wrong_are_read_back():
    for key in WRITTEN_WRONG + WRITTEN_RIGHT:
        assert written_safely(key) == (key in WRITTEN_RIGHT), key
        check(key)


@given(st.text(min_size=1).filter(lambda k: "." not in k and not hasattr(nn.ModuleDict(), k)))
def test_any_module_dict_key(key):
    check(key)


def test_graphs_with_safe_targets_are_not_copied():
    _, graph = graph_reading("default")
    assert safe_targets(graph) is graph
    _, graph = graph_reading("if")
    rewritten = safe_targets(graph)
    assert rewritten is not graph and [n.op for n in graph.nodes].count("call_module") == 1  # input untouched
    assert not any(n.op == "call_module" for n in rewritten.nodes)
