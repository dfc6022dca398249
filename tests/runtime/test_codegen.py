"""Generated code reads every target, whatever its path components (keywords, quotes,
backslashes, line breaks, identifiers Python normalises), and leaves ordinary graphs alone."""

import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import given, strategies as st

from fxlora.runtime.codegen import compile_graph, safe_targets, share_module_reads, written_safely

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


def graph_reading_two(key: str) -> tuple[nn.Module, fx.Graph]:
    """A root whose ModuleDict holds two Linears under `key` and ``"b"``, and a graph that
    reads both weights and a bias through dotted paths."""
    root = nn.Module()
    root.holder = nn.ModuleDict({key: nn.Linear(3, 3), "b": nn.Linear(3, 3)})
    graph = fx.Graph()
    x = graph.placeholder("x")
    w1, b1 = graph.get_attr(f"holder.{key}.weight"), graph.get_attr(f"holder.{key}.bias")
    y = graph.call_function(torch.nn.functional.linear, (x, w1, b1))
    w2 = graph.get_attr("holder.b.weight")
    graph.output(graph.call_function(torch.nn.functional.linear, (y, w2)))
    return root, graph


@given(st.sampled_from(WRITTEN_WRONG + WRITTEN_RIGHT) | st.text(min_size=1).filter(lambda k: "." not in k and k != "b" and not hasattr(nn.ModuleDict(), k)))
def test_module_reads_are_shared_and_read_the_same_values(key):
    root, graph = graph_reading_two(key)
    x = torch.randn(4, 3)
    expected = compile_graph(graph)(root, x)
    shared = share_module_reads(graph)
    assert [n.target for n in shared.nodes if n.op == "get_attr"] == ["holder"]  # one lookup of `holder`
    holders = [n for n in shared.nodes if n.op == "call_function" and n.args[1] in (key, "b") and isinstance(n.args[1], str)]
    assert len(holders) == 2  # each layer looked up once, its weight and bias read from it
    assert torch.equal(compile_graph(shared)(root, x), expected)
    layer = root.holder[key]
    assert torch.equal(expected, torch.nn.functional.linear(layer(x), root.holder["b"].weight))


def test_module_reads_happen_where_first_used_and_parameters_where_read():
    root, graph = graph_reading_two("a")
    shared = share_module_reads(graph)
    order = [n.op if n.op != "call_function" else (n.target.__name__, n.args[-1] if n.target is getattr else None) for n in shared.nodes]
    # the second layer's holder is read after the first linear, where its weight was read
    assert order.index(("linear", None)) < order.index(("getattr", "b"))


def test_a_child_named_self_does_not_shadow_the_root():
    root = nn.Module()
    root.self = nn.Linear(3, 3)  # transformers' BertAttention.self
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.nn.functional.linear, (x, graph.get_attr("self.weight"), graph.get_attr("self.bias"))))
    x = torch.randn(2, 3)
    assert torch.equal(compile_graph(share_module_reads(graph))(root, x), root.self(x))
