"""transformers: what fxlora needs to trace today's attention modules, and to probe a model.

A transformers attention module defeats plain ``symbolic_trace`` in four ways; each is met here
without changing what the module computes for any call:

1. ``forward`` is wrapped by ``deprecate_kwarg`` (a ``*args, **kwargs`` wrapper). The wrapper only
   acts when the call passes the deprecated keyword; for every other call fxlora traces the wrapped
   function (`unwrap_deprecate_kwarg`), and a call that passes that keyword runs eagerly.
2. The attention function (``sdpa_attention_forward``, ``eager_attention_forward``, ...) is looked
   up with ``ALL_ATTENTION_FUNCTIONS.get_interface`` and branches on sequence lengths. While
   tracing, the lookup returns the same function as an opaque leaf: one node that calls it on the
   real values (`opaque_attention_functions`). Which function was looked up depends on
   ``config._attn_implementation``; that value is a guard of the graph (`config_guards`), so
   ``set_attn_implementation`` makes the graph be traced again.
3. A ``Cache`` argument (always present: models create a ``DynamicCache`` even for a plain
   forward) is a registered handle: its type (and an ``EncoderDecoderCache``'s inner cache types)
   is part of the call pattern, ``isinstance`` checks on it are exact, and its ``update`` method is
   recorded as a node called on the real cache, in program order. Any other use of it
   (`CACHE_ATTRIBUTES`) makes the trace fail (the call then runs eagerly).
5. ``GradientCheckpointingLayer`` wraps ``forward`` in a checkpointing wrapper, which passes every
   call through while the layer's ``gradient_checkpointing`` is False (a guard of the graph:
   `unwrap_checkpointing_layer`). fxlora never traces through such a layer (`kept_whole`): it is
   a graph root of its own for the adapted layers sitting directly in it (OPT's, BART's and
   Whisper's ``fc1`` / ``fc2``), and its graph calls its attention and MLP modules, graph roots of
   their own. After ``gradient_checkpointing_enable()`` the layer runs its own forward (the
   wrapper checkpoints it, as without fxlora): its direct layers then add their branches eagerly,
   and the attention and MLP keep their graphs inside the checkpoint.
4. Shapes are unpacked (``(*hidden_states.shape[:-1], -1, head_dim)``): ranked call patterns
   and `fxlora.tracing.proxies` cover that; ``Conv1D`` and transformers' activations are declared
   rank-preserving.
6. A model's ``forward`` is wrapped by ``can_return_tuple`` and returns a ``ModelOutput``. The
   wrapper changes nothing while ``config.return_dict`` is True (a guard of the graph) and the
   call passes no ``return_dict`` (`unwrap_can_return_tuple`); the graph returns the output's
   items as a dict, and the call rebuilds the same ``ModelOutput`` type from them
   (`TraceHooks.output_types`), so heads such as BERT's ``classifier`` are in the graph.

`example_inputs` (`fxlora.tracing.integrations.hf_inputs`) gives `fxlora.tracing.probe` tiny inputs
built from the config (tokens, pixels, audio features, both for multimodal models) to observe
how each module is called, so those patterns are traced ahead (and ``torch.compile`` meets no
untraced pattern).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Optional

import torch.nn as nn

from fxlora.tracing.integrations import TraceHooks, opaque, register_object_type
from fxlora.tracing.integrations.hf_inputs import example_inputs
from fxlora.tracing.integrations.hf_specials import traced_builtins
from fxlora.tracing.proxies import SeqInfo, TensorInfo
from fxlora.tracing.threads import tracing_here

__all__ = [
    "trace_hooks", "unwrap_deprecate_kwarg", "unwrap_can_return_tuple", "opaque_attention_functions", "config_guards", "example_inputs",
]

#: what every attention function returns: (output (batch, seq, heads, head_dim), weights or None)
ATTENTION_OUTPUT = SeqInfo(items=(TensorInfo(4), None))


def _deprecate_kwarg_code():
    from transformers.utils.deprecation import deprecate_kwarg

    return deprecate_kwarg("fxlora_probe_old", "999.0", new_name="fxlora_probe_new")(lambda fxlora_probe_new=None: None).__code__


def unwrap_deprecate_kwarg(fn: Callable, module: Optional[nn.Module] = None) -> Optional[tuple[Callable, frozenset[str]]]:
    """``(wrapped forward, {deprecated name})`` when `fn` is a ``deprecate_kwarg`` wrapper: it
    passes every call through unchanged unless the deprecated keyword is given."""
    if getattr(fn, "__code__", None) is not _DEPRECATE_CODE:
        return None
    names = inspect.getclosurevars(fn).nonlocals
    return fn.__wrapped__, frozenset({names["old_name"]})


def _can_return_tuple_code():
    from transformers.utils.generic import can_return_tuple

    return can_return_tuple(lambda self: None).__code__


def unwrap_can_return_tuple(fn: Callable, module: Optional[nn.Module] = None) -> Optional[tuple[Callable, frozenset[str]]]:
    """``(wrapped forward, {"return_dict"})`` when `fn` is a ``can_return_tuple`` wrapper whose
    module's ``config.return_dict`` is True (a guard of the graph, `config_guards`): it then
    returns the forward's output unchanged unless the call passes ``return_dict``."""
    if getattr(fn, "__code__", None) is not _CAN_RETURN_TUPLE_CODE or module is None:
        return None
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "return_dict", True) is not True:
        return None  # it converts the output to a tuple (None too: `not None`)
    return fn.__wrapped__, frozenset({"return_dict"})


def _checkpointing_forward_code():
    from transformers.modeling_layers import GradientCheckpointingLayer

    class _Layer(GradientCheckpointingLayer):
        def forward(self, x):
            return x

    return _Layer.forward.__code__


def is_checkpointing_layer(module: nn.Module) -> bool:
    """`module`'s forward is wrapped by ``GradientCheckpointingLayer``'s checkpointing wrapper."""
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and code is _CHECKPOINTING_CODE


def unwrap_checkpointing_layer(fn: Callable, module: Optional[nn.Module] = None) -> Optional[tuple[Callable, frozenset[str]]]:
    """``(wrapped forward, {})`` when `fn` is ``GradientCheckpointingLayer``'s wrapper and `module`
    does not checkpoint (``gradient_checkpointing`` False, a guard: `config_guards`): the wrapper
    then calls the forward with the call's arguments unchanged."""
    if getattr(fn, "__code__", None) is not _CHECKPOINTING_CODE or module is None:
        return None
    if getattr(module, "gradient_checkpointing", False) is not False:
        return None
    return fn.__wrapped__, frozenset()


@contextlib.contextmanager
def opaque_attention_functions() -> Iterator[None]:
    """While active, ``AttentionInterface.get_interface`` returns its function as an opaque leaf."""
    from transformers.modeling_utils import AttentionInterface

    original = AttentionInterface.__dict__["get_interface"]

    def get_interface(self: Any, attn_implementation: str, default: Callable) -> Callable:
        found = original(self, attn_implementation, default)
        return opaque(found, ATTENTION_OUTPUT) if tracing_here() else found

    AttentionInterface.get_interface = get_interface
    try:
        yield
    finally:
        AttentionInterface.get_interface = original


def config_guards(module: nn.Module) -> list[tuple[Any, str]]:
    """The values a traced module's graph depends on: a checkpointing layer's
    ``gradient_checkpointing`` (`unwrap_checkpointing_layer`), and its config's attention
    implementation (it selects the function) and ``return_dict`` (`unwrap_can_return_tuple`)."""
    from transformers import PretrainedConfig

    flags = [(module, "gradient_checkpointing")] if is_checkpointing_layer(module) else []
    config = module.__dict__.get("config")
    if not isinstance(config, PretrainedConfig):
        return flags
    # the property ``_attn_implementation`` reads this field (through the config's slow
    # ``__getattribute__``); guarding the field itself is the same check, faster
    stored = "_attn_implementation_internal"
    return [*flags, (config, stored if stored in vars(config) else "_attn_implementation"), (config, "return_dict")]


def _rank_preserving() -> tuple[type, ...]:
    from transformers import activations
    from transformers.pytorch_utils import Conv1D

    types = {Conv1D}
    for entry in activations.ACT2CLS.values():
        cls = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            types.add(cls)
    return tuple(types)


_DEPRECATE_CODE = None
_CAN_RETURN_TUPLE_CODE = None
_CHECKPOINTING_CODE = None
#: what traced attention code may use of a ``Cache``: ``update`` (a node called on the real cache, in
#: program order), ``is_updated`` (where it is no `CACHE_FLAGS` pattern: read only, its truth value
#: fails the trace) and ``layers`` (read: cross-attention reuses ``layers[i].keys``, nodes run on the
#: real cache). ``get_seq_length`` is not allowed in general: its result is an
#: int or a tensor depending on the cache class, and code branches on which (T5 clones a tensor);
#: `dynamic_cache_attributes` allows it for the classes where it is an int.
CACHE_ATTRIBUTES = ("update", "is_updated", "layers")
#: an ``EncoderDecoderCache``'s two caches are handles too (their types join the call pattern)
CACHE_MEMBERS = ("self_attention_cache", "cross_attention_cache")
#: an ``EncoderDecoderCache``'s per-layer "cross-attention keys computed" flags join the call
#: pattern: cross-attention branches on them (reuse the cached keys or compute them) and sets
#: its own (`fxlora.tracing.proxies.TracedFlags`)
CACHE_FLAGS = ("is_updated",)
#: Whisper tests ``if cache`` on the cross-attention cache (layers are created lazily, so it is
#: false until its first layer exists): its truth value joins the call pattern too
CACHE_TRUTH = ("cross_attention_cache",)


def dynamic_cache_attributes(cls: type, members: dict) -> tuple[str, ...]:
    """``get_seq_length`` where it returns a Python int: on a ``DynamicCache`` (not a subclass) and
    on an ``EncoderDecoderCache`` whose self-attention cache is one (T5 reads it)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    ints = cls is DynamicCache or (cls is EncoderDecoderCache and members.get("self_attention_cache") is DynamicCache)
    return ("get_seq_length",) if ints else ()


#: the activation modules of ``transformers.activations`` whose forward computes a new tensor by
#: torch functions of its input alone (``F.silu``, ``F.gelu``, tanh / erf / sigmoid formulas,
#: ``clip``, ``mish``, ``relu`` squared, ``softplus``): not xIELU, whose forward may call a custom
#: CUDA class, nor the identity (``LinearActivation`` returns its input itself)
_PURE_ACTIVATIONS = frozenset(
    {
        "SiLUActivation", "GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
        "ClippedGELUActivation", "AccurateGELUActivation", "MishActivation", "LaplaceActivation",
        "ReLUSquaredActivation", "SqrtSoftplusActivation", "GELUTanh", "PytorchGELUTanh",
    }
)


def pure_activation(module: nn.Module) -> bool:
    """One of transformers' plain activation modules (`_PURE_ACTIVATIONS`), running the class's
    own forward: not one whose forward a kernel hub (``kernels``' ``kernelize``) or anyone else
    replaced, on the class or on the instance."""
    cls = type(module)
    return (
        cls.__module__ == "transformers.activations"
        and cls.__name__ in _PURE_ACTIVATIONS
        and getattr(cls.forward, "__module__", None) == "transformers.activations"
        and "forward" not in module.__dict__
    )


def trace_hooks() -> TraceHooks:
    global _DEPRECATE_CODE
    from transformers.cache_utils import Cache

    global _CAN_RETURN_TUPLE_CODE, _CHECKPOINTING_CODE
    from transformers.utils.generic import ModelOutput

    _DEPRECATE_CODE = _deprecate_kwarg_code()
    _CAN_RETURN_TUPLE_CODE = _can_return_tuple_code()
    _CHECKPOINTING_CODE = _checkpointing_forward_code()
    register_object_type(Cache, CACHE_ATTRIBUTES, CACHE_MEMBERS, dynamic_cache_attributes, CACHE_FLAGS, ("get_seq_length",), CACHE_TRUTH)
    return TraceHooks(
        rank_preserving=_rank_preserving(),
        unwrappers=(unwrap_deprecate_kwarg, unwrap_can_return_tuple, unwrap_checkpointing_layer),
        patches=(opaque_attention_functions, traced_builtins),
        guard_sources=(config_guards,),
        example_inputs=example_inputs,
        output_types=(ModelOutput,),
        kept_whole=(is_checkpointing_layer,),
        pure_in_eval=(pure_activation,),
    )
