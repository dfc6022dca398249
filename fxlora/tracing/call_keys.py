"""Call patterns: what one traced graph of a root is specialised to.

A *call pattern* (`CallKey`) is the root's ``training`` flag plus, per argument, its *kind*: a
tensor (a placeholder; optionally of a fixed rank), a concrete Python value (``None``, a bool, an
int, a float or a str, baked in), a tuple or list of such, or a registered handle object of a
given type (`fxlora.tracing.integrations.register_object_type`, e.g. a transformers ``Cache``: a
placeholder too). `call_key` computes the pattern of a call; a call with any other kind of
argument has none (it runs the original forward eagerly).

*Ranked* patterns also fix each tensor argument's rank, so that code such as
``x.view(*x.shape[:-1], h, d)`` traces (`fxlora.tracing.proxies` derives what follows from the
ranks); a root only uses ranked patterns when its plain trace fails.

*Sized* patterns (``sized=True``, implying ranked) also fix the *size class* of each dimension of
each tensor argument: 0, 1 or "2 or more" (`size_class`), so that code branching on
``x.size(1) == 1`` (RWKV's one-token step) traces: the comparison is decided by the pattern, and
holds for every call of that pattern (the graph is then traced again for a call with other
classes, as torch.compile specialises sizes 0 and 1). A root only uses sized patterns when its
ranked trace fails.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Hashable, NamedTuple, Optional, Union

import torch
import torch.nn as nn

from fxlora.tracing.integrations import object_kind

__all__ = [
    "CallKey", "Source", "SELF", "TENSOR", "OBJECT", "MANY", "size_class", "is_ranked_tensor", "call_key", "canonical_key",
    "key_is_ranked", "key_is_sized", "key_has_handles", "erase_ranks", "erase_sizes", "key_in_form", "with_training", "gather_inputs",
]

TENSOR = "T"


OBJECT = "obj"


class CallKey(NamedTuple):
    """A call pattern: the root's mode, each positional argument's kind, and each keyword
    argument's ``(name, kind)`` in name order."""

    training: bool
    positional: tuple
    named: tuple



Source = Union[int, str, tuple]


#: input source meaning "the root module itself" (passed to opaque functions that take it)
SELF: tuple = ("<root module>",)


_MAX_ITEMS = 16

#: the size class of every dimension of size 2 or more (`size_class`)
MANY = 2


def size_class(size: int) -> int:
    """A dimension's size class in a sized pattern: 0, 1, or `MANY` (2 or more)."""
    return size if size < MANY else MANY


# ------------------------------------------------------------------ call patterns
def _kind(value: Any, ranked: bool, sized: bool = False) -> Optional[Hashable]:
    if isinstance(value, torch.Tensor):
        if sized:
            return (TENSOR, value.dim(), tuple(s if s < MANY else MANY for s in value.shape))  # `size_class`, inline: run per call
        return (TENSOR, value.dim()) if ranked else TENSOR
    if value is None or isinstance(value, (bool, int, str)):
        return (type(value).__name__, value)
    if isinstance(value, float):
        return ("float", value) if value == value else None
    if type(value) in (tuple, list) and len(value) <= _MAX_ITEMS:
        items = tuple(_kind(v, ranked, sized) for v in value)
        return None if None in items else (type(value).__name__, items)
    kind = object_kind(value)
    if kind is not None:
        return (OBJECT, type(value), kind.member_types(value))
    return None


def call_key(training: bool, args: tuple, kwargs: dict, ranked: bool = False, sized: bool = False) -> Optional[CallKey]:
    """The call pattern of ``forward(*args, **kwargs)``, or None when an argument is of no
    supported kind (such calls are not traced). With `ranked`, tensor kinds include the rank;
    with `sized`, the rank and each dimension's `size_class`."""
    kinds = []
    for a in args:
        k = _kind(a, ranked, sized)
        if k is None:
            return None
        kinds.append(k)
    named = []
    for name in sorted(kwargs):
        k = _kind(kwargs[name], ranked, sized)
        if k is None:
            return None
        named.append((name, k))
    return CallKey(training, tuple(kinds), tuple(named))


def _map_kinds(key: CallKey, fn: Callable[[Any], Any]) -> CallKey:
    def walk(kind: Any) -> Any:
        if type(kind) is tuple and kind and kind[0] in ("tuple", "list"):
            return (kind[0], tuple(walk(k) for k in kind[1]))
        return fn(kind)

    training, positional, named = key
    return CallKey(training, tuple(walk(k) for k in positional), tuple((n, walk(k)) for n, k in named))


def is_ranked_tensor(kind: Any) -> bool:
    """A tensor kind fixing the rank (and perhaps the size classes)."""
    return type(kind) is tuple and len(kind) in (2, 3) and kind[0] == TENSOR


def _is_sized_tensor(kind: Any) -> bool:
    return type(kind) is tuple and len(kind) == 3 and kind[0] == TENSOR


def _any_kind(key: CallKey, test: Callable[[Any], bool]) -> bool:
    found = []
    _map_kinds(key, lambda k: found.append(test(k)) or k)
    return any(found)


def key_is_ranked(key: CallKey) -> bool:
    """True when `key` fixes the rank of some tensor argument."""
    return _any_kind(key, is_ranked_tensor)


def key_is_sized(key: CallKey) -> bool:
    """True when `key` fixes the size classes of some tensor argument."""
    return _any_kind(key, _is_sized_tensor)


def key_has_handles(key: CallKey) -> bool:
    """True when some argument of `key` is a registered handle object (a placeholder that is no tensor)."""
    return _any_kind(key, lambda k: type(k) is tuple and len(k) == 3 and k[0] == OBJECT)


def erase_ranks(key: CallKey) -> CallKey:
    """`key` with every tensor's rank (and size classes) forgotten."""
    return _map_kinds(key, lambda k: TENSOR if is_ranked_tensor(k) else k)


def erase_sizes(key: CallKey) -> CallKey:
    """`key` with every tensor's size classes forgotten (ranks kept)."""
    return _map_kinds(key, lambda k: k[:2] if _is_sized_tensor(k) else k)


def key_in_form(key: CallKey, ranked: bool, sized: bool) -> CallKey:
    """`key` as a root whose calls are keyed with or without ranks and size classes looks it up
    (`call_key`'s `ranked` and `sized`)."""
    return key if sized else erase_sizes(key) if ranked else erase_ranks(key)


def with_training(key: CallKey, training: bool) -> CallKey:
    return CallKey(training, key.positional, key.named)


def gather_inputs(sources: tuple[Source, ...], root: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    """The values of a variant's placeholders for the call ``(args, kwargs)`` (see `TracedVariant`)."""
    values = []
    for src in sources:
        kind = type(src)
        if kind is int:
            values.append(args[src])
        elif kind is str:
            values.append(kwargs[src])
        elif src == SELF:
            values.append(root)
        else:
            head = src[0]
            value = args[head] if type(head) is int else kwargs[head]
            for i in src[1:]:
                value = value[i]
            values.append(value)
    return values


def _forward_parameters(module: nn.Module) -> list[inspect.Parameter]:
    return list(inspect.signature(type(module).forward).parameters.values())[1:]


def canonical_key(module: nn.Module, training: bool) -> CallKey:
    """The pattern of the plainest call: every parameter without a default given a tensor, in order."""
    required = [
        p
        for p in _forward_parameters(module)
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return CallKey(training, (TENSOR,) * len(required), ())
