"""The forwards fxlora installs on the user's modules (as the instance attribute ``forward``).

- `GraphForward` on a *graph root*: runs the LoRA-rewritten graph code with ``self`` bound to the
  root module itself, so every attribute it reads is the live one (no copy of the model exists).
- `EagerLoraForward` on every adapted layer, `SavedForward` on every `modules_to_save` module
  (`fxlora.runtime.layer_forwards`): their eager forwards, which graph code calls with ``BASE_ONLY``.

The module's class, parameters and ``state_dict()`` keys never change; deleting the instance
attribute (`uninstall`) gives back the class's own forward.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxlora.runtime.calls import CALL_LOCK
from fxlora.runtime.installed import install, installed_forward, installs, live_roots, track, uninstall
from fxlora.runtime.layer_forwards import EagerLoraForward, SavedForward, call_original, with_call_gates
from fxlora.runtime.builds import build_state, built_once, closed_roots
from fxlora.runtime.code import MAX_EAGER_CODES, Code
from fxlora.runtime.codegen import compile_graph, python_source
from fxlora.runtime.compile_builds import defer, ready_when_traced
from fxlora.runtime.cond_support import cond_keeps_state
from fxlora.runtime.idle import IDLE, IdleCode, run_gated, skippable
from fxlora.core.gates import EagerKey, GateState
from fxlora.core.layers import BASE_ONLY, GATED_CODE, IDLE_CODE, NESTED_CODE, saved_meta, target_meta
from fxlora.passes import rewrite
from fxlora.passes.weight_reads import layers_read
from fxlora.passes.weight_uses import layers_used_by_weight
from fxlora.tracing.call_keys import SELF, CallKey, call_key, canonical_key, gather_inputs, key_has_handles, key_is_ranked, key_is_sized, with_training
from fxlora.errors import TraceFailure, UnsupportedTargetError
from fxlora.planning.call_checks import check_new_graph
from fxlora.tracing.traced import TracedVariant, adopt_constants, trace_through_ids
from fxlora.tracing.reuse import TraceCache
from fxlora.tracing.submodules import submodule
from fxlora.tracing.boundaries import base_layers, nested_roots, subtree_hooks

if TYPE_CHECKING:  # pragma: no cover
    from fxlora.model.state import AdapterState

__all__ = ["BASE_ONLY", "GraphForward", "EagerLoraForward", "SavedForward", "installed_forward", "install", "uninstall", "compile_graph", "graph_forwards"]


def _is_graph_root(module: nn.Module) -> bool:
    return isinstance(installed_forward(module), GraphForward)


def _holds_graph_root(module: nn.Module) -> bool:
    return any(_is_graph_root(m) for m in module.modules())


def graph_forwards(model: nn.Module) -> list["GraphForward"]:
    """The `GraphForward` of every graph root in `model`, in module order."""
    return [f for f in map(installed_forward, model.modules()) if isinstance(f, GraphForward)]


def _interesting(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if target_meta(m) is not None or saved_meta(m) is not None]


def _evaluation_graphs(module: nn.Module) -> Optional[list[fx.Graph]]:
    """The evaluation-mode graphs of a graph root (`fxlora.runtime.idle.skippable`), None for any other module."""
    forward = installed_forward(module)
    if not isinstance(forward, GraphForward):
        return None
    return [variant.graph for key, variant in forward.variants.items() if not key[0]]


def _nested_roots(graph: fx.Graph, root: nn.Module) -> list[tuple[str, nn.Module, "GraphForward"]]:
    """The graph roots of their own that `graph` calls as modules: (target, module, forward)."""
    calls = [(node.target, submodule(root, node.target)) for node in graph.find_nodes(op="call_module")]
    return [(target, module, forward) for target, module in calls if isinstance(forward := installed_forward(module), GraphForward)]


@installs
class GraphForward:
    """``forward`` of a graph root: one rewritten graph per call pattern (`fxlora.tracing.traced`).

    A call whose pattern has a graph runs that graph's generated code with the call's gates:
    straight-line tensor code, so ``torch.compile`` captures it whole. A new pattern is traced on
    first use (holding `fxlora.runtime.calls.CALL_LOCK` exclusively; one a compiled call meets, while
    dynamo traces it: `fxlora.runtime.compile_builds.ready_when_traced`); a pattern that cannot be
    traced runs the root's original forward with its layers' eager LoRA forwards (same math, no graph).
    The pass options are the owner's (`AdapterState.options`).

    Eager calls run code built for their adapter state on first use; the gated code that
    torch.compile captures is built when torch.compile next compiles
    (`fxlora.runtime.compile_builds`): the patterns waiting for it are ``_unbuilt``. So are the
    traces of the patterns planning saw but did not trace (`pending`,
    `fxlora.planning.roots.trace_root`), unless a call meets one first.
    """

    path = "graph"

    def __init__(self, root: nn.Module, owner: AdapterState, variants: dict[CallKey, TracedVariant], pending: Iterable[CallKey] = ()) -> None:
        self.root = root
        self.owner = owner
        self.previous: Optional[Callable] = None
        self.variants = dict(variants)
        #: patterns seen by planning's example forward pass but not traced yet: traced by the first
        #: call meeting one, or all when torch.compile next compiles (`build_gated`)
        self.pending: list[CallKey] = list(pending)
        self.pend_for(root.training)  # no repeats, none traced already
        self.failures: dict[CallKey, str] = {}
        self._read: Optional[list[str]] = None  # `layers_read` of the variants and adapters as they are
        # code per call pattern: gated code (what torch.compile sees, reading only this table) for every
        # pattern, and per (pattern, eager key) code running only the live branches, least recently used dropped first
        self._gated: dict[CallKey, Code] = {}
        self._unbuilt: set[CallKey] = set()  # known patterns whose gated code waits for torch.compile
        self._eager: OrderedDict[tuple[CallKey, EagerKey], Code] = OrderedDict()
        # patterns fix tensor ranks when the planned ones needed them (`fxlora.tracing.call_keys.call_key`)
        self.ranked = any(key_is_ranked(k) for k in self.variants)
        self.sized = any(key_is_sized(k) for k in self.variants)  # and size classes (`call_key`)
        track(self)

    # ---------------------------------------------------------------- building
    def _build(self, key: CallKey, variant: TracedVariant, eager: Optional[EagerKey], state: Optional[Hashable], nested_code: Optional[str] = None) -> Code:
        """Code for `variant` for `eager` (None: gated code), and where its inputs come from (None:
        the call's positional arguments as they are, the common case); `state` is the root's
        `fxlora.runtime.builds.build_state` as it is now. `nested_code`: what the roots it calls
        run under torch.compile (`NESTED_CODE`; gated code with base-only code of its own sets it
        itself)."""
        adopt_constants(self.root, variant.constants)
        options = self.owner.options

        def rewritten() -> fx.Graph:
            return rewrite(copy.deepcopy(variant.graph), self.root, options, eager, training=key[0])

        build = built_once(variant.graph, state, (options, eager, key[0]), rewritten)  # one per identical block
        _, positional, named = key
        direct = not named and variant.inputs == tuple(range(len(positional)))
        layers = build.base_layers(self.root)
        forwards = [installed_forward(m) for m in layers]
        lowerable = [m for m, f in zip(layers, forwards) if f is not None and f.previous is None]
        tensors_only = SELF not in variant.inputs and not key_has_handles(key)  # `run_gated` takes tensors
        gated = eager is None and not key[0] and not self.owner.options.guard_idle and tensors_only and cond_keeps_state() and skippable(variant.graph, self.root, _evaluation_graphs)
        nested = _nested_roots(variant.graph, self.root)
        code = GATED_CODE if gated else nested_code  # inside one branch of this root's torch.cond: that branch's code
        fn = build.function(self.root, lowerable, eager is not None, rewritten, tuple(t for t, _, _ in nested), code)
        idle = IdleCode(self._build(key, variant, IDLE, state, IDLE_CODE).fn, subtree_hooks(self.root)) if gated else None
        roots = tuple((m, f) for _, m, f in nested)
        return Code(fn, None if direct else variant.inputs, base_layers(build.base_targets, layers, forwards), idle, variant.output_type, roots)

    def refresh(self) -> None:
        """Drop all code (after adapters or pass options changed): code for eager keys is rebuilt
        on first use, every known pattern's gated code when torch.compile next compiles
        (`build_gated`)."""
        with CALL_LOCK.exclusive():
            self._gated, self._unbuilt = {}, set(self.variants)
            self._eager = OrderedDict()
            self._read = None
            self._gated_due()

    def _gated_due(self, now: bool = False) -> None:
        """Trace the `pending` patterns and build the ``_unbuilt`` ones' gated code now, or when
        torch.compile next compiles (at once where this torch cannot call back)."""
        if (self._unbuilt or self.pending) and (now or not defer(self)):
            self.build_gated()

    def trace_pending(self, wait: bool = True, cache: Optional[TraceCache] = None) -> bool:
        """Trace the `pending` patterns (through `cache`: identical roots share their traces),
        their gated code left waiting; False (nothing done) where `wait` is False and another
        thread holds `CALL_LOCK`."""
        with CALL_LOCK.exclusive(wait) as held:
            for key in list(self.pending) if held else ():
                self.traced(key, cache)  # a traced one waits in ``_unbuilt``
            return held

    def build_gated(self, wait: bool = True, cache: Optional[TraceCache] = None) -> bool:
        """`trace_pending`, then build the gated code of the patterns waiting for it; False
        (nothing built) where `wait` is False and another thread holds `CALL_LOCK`."""
        with CALL_LOCK.exclusive(wait) as held:
            if not held:
                return False
            self.trace_pending(cache=cache)  # this thread holds the lock already: it takes it again at once
            if self._unbuilt:
                state = self._state()  # the same for every pattern
                for key in [k for k in self.variants if k in self._unbuilt]:
                    self._gated[key] = self._build(key, self.variants[key], None, state)
                self._unbuilt = set()
            return True

    def gated_code(self) -> dict[CallKey, Code]:
        """The gated code of every known pattern (built now where it waited for torch.compile)."""
        self.build_gated()
        return dict(self._gated)

    def _state(self) -> Optional[Hashable]:
        return build_state(self.root, closed_roots([v.graph for v in self.variants.values()], _is_graph_root, self.root))

    def forget_eager_code(self) -> None:
        """Drop the code for eager keys (it bakes the adapters' scalings in as numbers; rebuilt on
        first use), keeping the gated code torch.compile sees (`fxlora.model.hotswap`)."""
        with CALL_LOCK.exclusive():
            self._eager = OrderedDict()

    def has_gated_code(self, key: CallKey) -> bool:
        return key in self._gated

    def _code(self, key: Optional[CallKey], eager: Optional[EagerKey]) -> Optional[Code]:
        if eager is None:
            return self._gated.get(key)
        code = self._eager.get((key, eager))
        if code is not None:
            self._eager.move_to_end((key, eager))
        return code

    def ensure(self, key: CallKey, eager: Optional[EagerKey] = None, now: bool = True) -> bool:
        """Make sure pattern `key` has code for `eager` (tracing it if new, for every root of this
        class in the model; gated code, `eager` None, built now or, with `now` False, when
        torch.compile next compiles); False if it cannot be traced."""
        with CALL_LOCK.exclusive():
            if self._code(key, eager) is not None or (eager is None and key in self._unbuilt):
                if self.variants[key].holds(self.root):
                    if eager is None:
                        self._gated_due(now)
                    return True
                self._forget(key)  # an attribute the graph baked in changed, or a module boundary appeared
            new = key not in self.variants
            cache = self._trace_cache()
            variant = self.traced(key, cache)
            if variant is None:
                return False
            for sibling in live_roots(type(self.root), self.owner) if new else ():
                sibling.traced(key, cache)  # identical blocks: one trace, by whichever call meets the pattern first
            if eager is not None:
                code = self._build(key, variant, eager, self._state())
                self._eager[(key, eager)] = code
                while len(self._eager) > MAX_EAGER_CODES:
                    self._eager.popitem(last=False)
            self._gated_due(now and eager is None)  # a compiled call of a pattern met eagerly meets its code
            return True

    def traced(self, key: CallKey, cache: Optional[TraceCache] = None) -> Optional[TracedVariant]:
        """The variant of pattern `key`, traced if new (through `cache`: identical roots traced
        in one pass share their traces; by default, in a call, the call's own cache: identical
        blocks meeting a new pattern in one forward pass trace it once); None if it cannot be
        traced. A new pattern's gated code waits in ``_unbuilt`` (`_gated_due`)."""
        with CALL_LOCK.exclusive():
            if key in self.failures:
                return None
            variant = self.variants.get(key)
            if variant is None:
                observed = key in self.pending
                if observed:
                    self.pending.remove(key)
                try:
                    variant = self._trace(key, cache)
                    check_new_graph(self.root, variant)
                except (TraceFailure, UnsupportedTargetError) as exc:
                    self.failures[key] = str(exc)
                    if observed and all(v.holds(self.root) for v in self.variants.values()):
                        # planning saw it called so, and nothing it traced has changed since: say so
                        warnings.warn(
                            f"fxlora: {type(self.root).__name__} does not trace for one of the call patterns fxlora's example "
                            f"forward pass saw ({exc}): calls of that pattern run its own forward, not a graph",
                            stacklevel=2,
                        )
                    return None
                self.variants[key] = variant
                self._unbuilt.add(key)  # its gated code: when torch.compile next compiles (`_gated_due`)
                self._read = None
                self._adopt_nested_roots()
            return variant

    def _trace_cache(self) -> TraceCache:
        """The call's trace cache (identical blocks meeting a pattern in one forward pass share
        their traces), or a new one outside a call."""
        return self.owner.pin.call_memo(TraceCache) or TraceCache()

    def _trace(self, key: CallKey, cache: Optional[TraceCache]) -> TracedVariant:
        """A new trace of pattern `key` (through `cache`, or `_trace_cache`; raises `TraceFailure`)."""
        cache = cache or self._trace_cache()
        if self.ranked:  # ranks at once for a root that needed them (exact either way)
            cache.needs_ranks(type(self.root))
        return cache.trace(self.root, trace_through_ids(self.root, _interesting(self.root)), key)

    def _adopt_nested_roots(self) -> None:
        """Make each module with a boundary below this root that holds adapted layers a graph
        root of its own (`fxlora.tracing.boundaries.nested_roots`): this root's graphs call it as
        a module, its own graph runs inside its ``__call__``. A module holding graph roots already
        (planning made its children roots: it did not trace itself) is left as planning left it."""
        for module in nested_roots(self.root, _interesting(self.root), _holds_graph_root):
            forward = GraphForward(module, self.owner, {})
            forward.prepare(module.training)
            install(module, forward)

    def _forget(self, key: CallKey) -> None:
        self.variants.pop(key, None)
        self._gated.pop(key, None)
        self._unbuilt.discard(key)
        for entry in [e for e in self._eager if e[0] == key]:
            del self._eager[entry]

    def mode_keys(self, training: bool) -> list[CallKey]:
        """The patterns to have ahead for `training` mode: the train/eval twin of every known
        pattern and the plainest call pattern (so that a compiled model does not meet an
        untraced pattern)."""
        keys = [with_training(k, training) for k in list(self.variants)]
        if not self.ranked:  # a ranked root is never called with the rank-free plainest pattern
            keys.insert(0, canonical_key(self.root, training))
        return keys

    def pend_for(self, training: bool) -> None:
        """Make the `pending` patterns their `training` twins (still pending: traced when first needed)."""
        self.pending = [k for k in dict.fromkeys(with_training(k, training) for k in self.pending) if k not in self.variants]

    def prepare(self, training: bool, cache: Optional[TraceCache] = None) -> bool:
        """After `pend_for`, trace `mode_keys` (through `cache`: `fxlora.runtime.install.prepare_all`
        passes one for all roots), their gated code built when torch.compile next compiles."""
        self.pend_for(training)
        keys = self.mode_keys(training)
        for key in keys:
            self.traced(key, cache)
        return all([self.ensure(k, now=False) for k in keys])

    def modules_used(self) -> set[str]:
        """Paths (relative to the root) of the modules the traced graphs call, and of those whose
        tensors they read."""
        graphs = [variant.graph for variant in self.variants.values()]
        calls = {node.target for graph in graphs for node in graph.find_nodes(op="call_module")}
        return calls | {node.target.rpartition(".")[0] for graph in graphs for node in graph.find_nodes(op="get_attr")}

    def graph_code(self, training: Optional[bool] = None) -> str:
        """The generated code of the plainest call pattern (for inspection)."""
        key = canonical_key(self.root, self.root.training if training is None else training)
        variant = self.variants.get(key) or next(iter(self.variants.values()))
        graph = rewrite(copy.deepcopy(variant.graph), self.root, self.owner.options, training=key[0])
        return python_source(graph).src

    # ---------------------------------------------------------------- calling
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        told = kwargs.pop(NESTED_CODE, None)  # called by another root's compiled code: which code, which gates
        if told is not None and torch.compiler.is_compiling():
            return self._run(told[1], None, args, kwargs, told[0])
        return with_call_gates(self.owner, self._run, args, kwargs)

    def _run(self, gates: GateState, eager: Optional[EagerKey], args: tuple, kwargs: dict, nested: Optional[str] = None) -> Any:
        key = call_key(self.root.training, args, kwargs, self.ranked, self.sized)
        if eager is None and torch.compiler.is_compiling():
            ready_when_traced(self, key)
        code = self._code(key, eager)
        if code is None or not self.variants[key].holds(self.root):
            return self._slow_call(key, gates, eager, args, kwargs)
        fn, inputs, base, idle, output, roots = code
        if not base.bypassable(self.root) or any(m.__dict__.get("forward") is not f for m, f in roots):
            return self._run_eagerly(args, kwargs)
        args = args if inputs is None else gather_inputs(inputs, self.root, args, kwargs)
        if idle is not None and torch.compiler.is_compiling() and not torch.is_grad_enabled() and idle.hooks.absent(self.root):
            if nested is None:
                return run_gated(fn, idle.fn, self.root, gates, tuple(args))
            fn = idle.fn if nested == IDLE_CODE else fn  # inside the caller's torch.cond: no cond of its own
        out = fn(self.root, gates, *args)
        return out if output is None else output(**out)

    @torch.compiler.disable
    def _slow_call(self, key: Optional[CallKey], gates: GateState, eager: Optional[EagerKey], args: tuple, kwargs: dict) -> Any:
        if key is not None and self.ensure(key, eager):
            return self._run(gates, eager, args, kwargs)
        return self._run_eagerly(args, kwargs)

    def _run_eagerly(self, args: tuple, kwargs: dict) -> Any:
        """The original forward: its adapted layers compute their branches themselves, except
        those its code uses by weight (`fxlora.passes.weight_reads`): warned."""
        if self._read is None:  # scanned once per set of graphs and adapters, not on every eager call
            self._read = sorted({n for v in self.variants.values() for n in (*layers_read(v.graph, self.root), *layers_used_by_weight(v.graph, self.root))})
        if self._read:
            warnings.warn(
                f"fxlora: {type(self.root).__name__} runs its own forward in this call (a call pattern or hook fxlora's "
                f"graph does not cover), which reads the weight of {', '.join(self._read)} directly: their unmerged adapters "
                "do not act in this call",
                stacklevel=3,
            )
        return call_original(self.root, self.previous, args, kwargs)

    @property
    def __code__(self) -> Any:
        """The code of the root's own forward, for tools that read where a module's forward is
        defined (non-strict ``torch.export``)."""
        return getattr(self.previous, "__code__", None) or type(self.root).forward.__code__

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_gated={}, _eager=OrderedDict(), _unbuilt=set(self.variants))  # code is rebuilt from the graphs on first use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        track(self)
        self._gated_due()
