"""One build per identical block: the rewritten code of a traced graph, shared by every root in
the same state.

The blocks of a model share their traced graph (`fxlora.tracing.reuse`). `built_once` keeps, per
traced graph, one `Build` for each build context (pass options, eager key, mode) and root state
(`build_state`: every module of the root's subtree, its class, plain values, tensor shapes,
dtypes and devices and its fxlora record), and a `Build` keeps the function generated for each
set of lowered layer calls (`Build.function`), so the 32 decoder layers of a model are rewritten
and compiled once per call pattern instead of once each.

A build copies the traced graph once: the rewrite works on a copy, and the first function lowers
that same copy in place. A build keeps what the runtime reads of the rewritten graph (which layers
it calls for their base output) and not the graph; a root that needs another set of lowered calls
(rare: a layer whose forward someone else replaced) rewrites a copy again.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Collection, Hashable, Iterable, Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.core.layers import BASE_ONLY, META_ATTR, SavedMeta, TargetMeta
from fxlora.runtime.codegen import compile_graph, share_module_reads
from fxlora.runtime.lowering import lower_base_calls, mark_nested_calls
from fxlora.tracing.reuse import module_tensors, module_values
from fxlora.tracing.submodules import named_submodules, submodule

__all__ = ["Build", "build_state", "closed_roots", "built_once", "MAX_BUILDS_PER_GRAPH"]


def _record(module: nn.Module) -> Hashable:
    """What the passes read from `module`'s fxlora record (`fxlora.core.layers`)."""
    meta = module.__dict__.get(META_ATTR)
    if isinstance(meta, TargetMeta):
        specs = tuple((name, type(spec), _spec_values(spec)) for name, spec in meta.adapters.items())
        return ("target", meta.kind, meta.fan_in_fan_out, specs, meta.kind.template_key(module))
    if isinstance(meta, SavedMeta):
        return ("saved", tuple(meta.adapters))
    return None if meta is None else ("other", id(meta))  # an unknown record: never equal to another root's


def _spec_values(spec: Any) -> tuple:
    """An adapter spec's compared fields, and whether it has a hot-swap scaling tensor (read at
    run time, so identical blocks with their own tensors still share one build)."""
    return tuple((f.name, getattr(spec, f.name)) for f in fields(spec) if f.compare) + (getattr(spec, "scaling_cell", None) is not None,)


def build_state(root: nn.Module, closed: tuple[str, ...] = ()) -> Optional[Hashable]:
    """Everything of `root` the passes (`fxlora.passes.rewrite`) can read besides its traced graph:
    for every module of its subtree its relative name, class, tensors' shapes, dtypes and devices
    and fxlora record, and the plain values of the adapted and saved modules and of every module
    inside them (dropout probabilities, the adapter modules' and copies' settings; the other
    modules' plain values are in the traced graph already, as numbers or as the nodes reading
    them: `fxlora.tracing.reuse`). None when some value cannot be hashed (then nothing is reused).

    `closed`: the paths of modules the graphs call as modules and never reach into
    (`closed_roots`): what is inside them is not the passes' concern, and not in the state."""
    named = named_submodules(root, closed)
    inside = {id(sub) for _, m in named if META_ATTR in m.__dict__ for sub in m.modules()}  # small subtrees
    state = tuple(
        (name, type(m), *(module_values(m) if id(m) in inside else ((), module_tensors(m))), _record(m))
        for name, m in named
    )
    try:
        hash(state)
    except TypeError:
        return None
    return state


def closed_roots(graphs: Iterable[fx.Graph], is_root: Callable[[nn.Module], bool], root: nn.Module) -> tuple[str, ...]:
    """The paths of the modules that `graphs` (of `root`) call as modules, that `is_root` accepts
    (graph roots of their own: they run their own code), and that no node of the graphs reaches
    into (a call of, or a read from, a module inside)."""
    calls = {n.target for g in graphs for n in g.find_nodes(op="call_module")}
    reads = {n.target for g in graphs for n in g.find_nodes(op="get_attr")} | calls
    nested = [t for t in calls if is_root(submodule(root, t))]
    return tuple(sorted(t for t in nested if not any(r.startswith(t + ".") for r in reads)))


@dataclass
class Build:
    """A traced graph rewritten for one build context and root state.

    ``base_targets``: the layers (paths relative to the root) the rewritten graph calls for their
    base output only (passing ``BASE_ONLY``). The generated functions are kept by (lowered calls,
    shared reads); the rewritten graph itself only until the first function lowers it in place.
    """

    base_targets: tuple[str, ...]
    _graph: Optional[fx.Graph] = None
    _functions: dict[tuple[frozenset, bool, tuple, Optional[str]], Callable[..., Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, rewritten: fx.Graph) -> "Build":
        targets = tuple(n.target for n in rewritten.find_nodes(op="call_module") if n.kwargs.get(BASE_ONLY))
        return cls(targets, rewritten)

    def base_layers(self, root: nn.Module) -> list[nn.Module]:
        """`root`'s layers that the code calls for their base output only."""
        return [submodule(root, t) for t in self.base_targets]

    def function(
        self,
        root: nn.Module,
        lowerable: Collection[nn.Module],
        share_reads: bool,
        rewrite: Callable[[], fx.Graph],
        nested: tuple[str, ...] = (),
        code: Optional[str] = None,
    ) -> Callable[..., Any]:
        """`compile_graph` of the rewritten graph with the base calls of `lowerable` lowered
        (`fxlora.runtime.lowering.lower_base_calls`), the calls of the graph roots at `nested`
        told to run their `code` (`fxlora.runtime.lowering.mark_nested_calls`) and, with
        `share_reads`, its module reads shared (`share_module_reads`: for code that runs eagerly;
        code torch.compile traces gains nothing from it), made once per set of lowered calls
        and nested roots. `rewrite()` gives the rewritten graph again, for a set the build has no
        graph left for."""
        ids = {id(m) for m in lowerable}
        lowered = frozenset(t for t in self.base_targets if id(submodule(root, t)) in ids)
        fn = self._functions.get((lowered, share_reads, nested, code))
        if fn is None:
            graph, self._graph = (self._graph if self._graph is not None else rewrite()), None
            graph = mark_nested_calls(lower_base_calls(graph, root, lowerable), nested, code)
            fn = self._functions[(lowered, share_reads, nested, code)] = compile_graph(share_module_reads(graph) if share_reads else graph)
        return fn


#: builds kept per traced graph (the oldest dropped first; each root keeps its own code too)
MAX_BUILDS_PER_GRAPH = 64
#: per traced graph (shared by identical roots: `fxlora.tracing.reuse.TraceCache`): builds by
#: (build context, root state)
_BUILDS: "weakref.WeakKeyDictionary[fx.Graph, dict[Hashable, Build]]" = weakref.WeakKeyDictionary()


def built_once(graph: fx.Graph, state: Optional[Hashable], context: Hashable, rewrite: Callable[[], fx.Graph]) -> Build:
    """The `Build` of ``rewrite()`` (the rewrite of a copy of `graph` for a root in `context`:
    options, eager key, mode), made once for all roots whose `build_state` is `state` (None: the
    state could not be compared, nothing is shared)."""
    if state is None:
        return Build.of(rewrite())
    known = _BUILDS.setdefault(graph, {})
    build = known.get((context, state))
    if build is None:
        build = known[(context, state)] = Build.of(rewrite())
        while len(known) > MAX_BUILDS_PER_GRAPH:  # adapters added and deleted over time: oldest first
            del known[next(iter(known))]
    return build
