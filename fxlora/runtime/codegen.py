"""Python source from a rewritten graph, for any module and adapter name.

torch.fx writes a ``call_module`` / ``get_attr`` target into the source as an attribute chain:
``self.seq.0.lora_A.default`` becomes ``getattr(self.seq, "0").lora_A.default``. A path component
that is a keyword (``if``, ``None``), an identifier Python reads as another (``º`` is read as ``o``: source
identifiers are NFKC-normalised) or holds a character a ``"..."`` literal cannot hold as it is
(``"``, ``\\``, a line break) gives code that does not compile, or reads another attribute. Adapter
names are such components (``seq.0.lora_A.<adapter>``), and they are any str an ``nn.ModuleDict``
takes that can name a directory (`fxlora.core.layers.check_adapter_name`); so before the code is generated, each target whose path has such a component is
rewritten to reach the same object through ``_attribute(holder, <name>)`` calls, where torch.fx
writes the name with ``repr``. Graphs whose targets all write safely are left as they are.

Graphs that generate the same source over the same objects share one function (`compile_graph`);
identical blocks get there without rewriting again (`fxlora.runtime.builds`).
"""

from __future__ import annotations

import weakref

import ast
import copy
import functools
import keyword
import unicodedata
from typing import Any, Callable

import torch.fx as fx
import torch.nn as nn
from torch.fx.graph_module import _forward_from_src


__all__ = ["written_safely", "safe_targets", "share_module_reads", "python_source", "compile_graph"]


@functools.lru_cache(maxsize=4096)
def written_safely(component: str) -> bool:
    """True when torch.fx's attribute chain for the path component `component` reads it back."""
    if component.isidentifier():  # written as ``.component``, which Python reads NFKC-normalised
        return not keyword.iskeyword(component) and unicodedata.normalize("NFKC", component) == component
    try:  # a literal only: a component such as '" + f() + "' is read, never run
        return ast.literal_eval(f'"{component}"') == component
    except (SyntaxError, ValueError, UnicodeError, MemoryError, RecursionError):
        return False


def _attribute(holder: Any, name: str) -> Any:
    """``getattr(holder, name)`` (torch.fx writes a ``getattr`` call whose name is an identifier
    as ``holder.name``, keywords included; a call of this function it writes with ``repr``)."""
    return getattr(holder, name)


def _call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Call `module` (the node a ``call_module`` becomes when its target cannot be written)."""
    return module(*args, **kwargs)


def _unsafe_at(target: str) -> int:
    """Index of the first path component of `target` torch.fx cannot write (-1: none; 0 is left
    to torch.fx, as the graph's root has no node to start a chain from)."""
    parts = target.split(".")
    return next((i for i, part in enumerate(parts) if i > 0 and not written_safely(part)), -1)


def _reads_unsafe(node: fx.Node) -> bool:
    return node.op in ("call_module", "get_attr") and _unsafe_at(node.target) > 0


def safe_targets(graph: fx.Graph) -> fx.Graph:
    """`graph` if all its targets write safely, else a copy where each target that does not is
    reached as ``_attribute(get_attr(<safe prefix>), <component>)...`` (a ``call_module`` becomes a
    call of that object). Same values, same order of evaluation."""
    if not any(_reads_unsafe(n) for n in graph.nodes):
        return graph
    graph = copy.deepcopy(graph)
    for node in [n for n in graph.nodes if _reads_unsafe(n)]:
        parts = node.target.split(".")
        cut = _unsafe_at(node.target)
        with graph.inserting_before(node):
            value = graph.get_attr(".".join(parts[:cut]))
            for part in parts[cut:]:
                value = graph.call_function(_attribute, (value, part))
            if node.op == "call_module":
                value = graph.call_function(_call_module, (value, *node.args), dict(node.kwargs))
        value.meta = dict(node.meta)
        node.replace_all_uses_with(value)
        graph.erase_node(node)
    graph.lint()
    return graph


def share_module_reads(graph: fx.Graph) -> fx.Graph:
    """`graph` (changed in place) with each ``get_attr`` of a dotted path reading its holder module
    from one node per module path, shared by all the reads below it: ``self.seq.0.lora_A.default.weight``
    and ``...lora_B.default.weight`` look up ``seq.0`` once, where torch.fx would write the whole
    chain for each (nn.Module's ``__getattr__`` per component: eager code pays for every lookup
    between two GEMMs). Each holder is read where its first use was; the attributes themselves
    (parameters, buffers) are still read where each node read them. Same values.

    Requires: no node changes which module a path names (graph code never does); runs on code
    about to be generated (`fxlora.runtime.builds.Build.function`), after every pass."""
    holders: dict[str, fx.Node] = {}

    def holder(path: str) -> fx.Node:
        node = holders.get(path)
        if node is None:
            parent, _, name = path.rpartition(".")
            if parent:
                node = _read(holder(parent), name)
            else:  # a child named ``self`` (transformers' BertAttention.self) must not shadow the root
                node = graph.create_node("get_attr", path, name="self_module" if path == "self" else None)
            holders[path] = node
        return node

    def _read(owner: fx.Node, name: str) -> fx.Node:
        return graph.call_function(getattr if written_safely(name) else _attribute, (owner, name))

    for node in [n for n in graph.nodes if n.op == "get_attr" and "." in n.target]:
        parent, _, name = node.target.rpartition(".")
        with graph.inserting_before(node):
            value = _read(holder(parent), name)
        value.meta = dict(node.meta)
        node.replace_all_uses_with(value)
        graph.erase_node(node)
    return graph


def python_source(graph: fx.Graph) -> fx.graph.PythonCode:
    """The generated ``forward(self, ...)`` of `graph` (targets made safe first)."""
    return safe_targets(graph).python_code(root_module="self")


#: generated functions by (source, ids of the objects it names), while some root uses them
_FUNCTIONS: "weakref.WeakValueDictionary[tuple, Callable[..., Any]]" = weakref.WeakValueDictionary()


def compile_graph(graph: fx.Graph) -> Callable[..., Any]:
    """Python function ``forward(self, *inputs)`` generated from `graph`. Graphs that generate
    the same source over the same objects share one function (the blocks of a model: under
    ``torch.compile`` they then share compiled code instead of recompiling per block)."""
    code = python_source(graph)
    key = (code.src, tuple(sorted((name, id(value)) for name, value in code.globals.items())))
    fn = _FUNCTIONS.get(key)
    if fn is None:
        fn = _forward_from_src(code.src, code.globals)
        _FUNCTIONS[key] = fn
    return fn
