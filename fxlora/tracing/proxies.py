"""What the tracer may know about a traced value besides its node: ranks and lengths.

Plain torch.fx knows nothing about a `Proxy`, so ``(*x.shape[:-1], -1, d)``, ``len(x.shape)`` or
``for t in x.split(n)`` fail: iterating a proxy needs a length. fxlora traces one *call pattern*
at a time, and a pattern may fix the rank of every tensor argument (`fxlora.tracing.call_keys.call_key`
with ``ranked=True``). From those ranks, `infer` derives facts about results with rules that hold
for *every* input of that pattern — never from example sizes:

- `TensorInfo(rank)`: a tensor of known rank (its sizes stay symbolic);
- `SizesInfo(length)`: ``x.shape`` / ``x.size()`` of such a tensor, or a slice of one;
- `SeqInfo`: a tuple of known items, or of unknown length with items all alike (``x.split(n)``);
- ``"scalar"``: a Python number, or a symbolic size such as ``x.shape[0]``;
- `DimInfo(size_class)`: a symbolic size of a tensor argument of a *sized* pattern
  (`fxlora.tracing.call_keys`), which fixes whether it is 0, 1 or 2-or-more: comparing it with
  a number is then decided at trace time where the class decides it (`decide_comparison`).

With a length known, a proxy can be unpacked, iterated and measured: each item is a
``getitem`` node, evaluated on the real value when the code runs. A rule is only given where the
result's rank or length follows from the ranks alone; ``squeeze()`` (which depends on sizes) or
any op without a rule gives "unknown", and code that needs the length of an unknown then fails
to trace (the module runs eagerly) instead of guessing.

Registered handle objects have their own proxies (`fxlora.tracing.handles`). A proxy unpacked by
its caller (``b, n, c = x.shape``) reads the caller's bytecode once per code object (`_unpack_sizes`).
"""

from __future__ import annotations

import dis
import functools
import inspect
import operator
import sys
import types
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TensorInfo", "SizesInfo", "SeqInfo", "DimInfo", "Info", "InfoProxy", "AttributeProxy", "info_of", "infer", "decide_comparison", "NotTraceable"]


class NotTraceable(Exception):
    """Raised inside a trace for a use fxlora cannot capture faithfully (not an AttributeError,
    so ``getattr(x, name, default)`` / ``hasattr`` cannot swallow it)."""


@dataclass(frozen=True)
class TensorInfo:
    rank: int
    #: each dimension's size class (0, 1, 2 = two or more), for a tensor argument of a sized pattern
    classes: Optional[tuple[int, ...]] = None


@dataclass(frozen=True)
class SizesInfo:
    length: int
    classes: Optional[tuple[int, ...]] = None  # as `TensorInfo.classes`


@dataclass(frozen=True)
class DimInfo:
    """A symbolic size whose class the pattern fixes: 0, 1, or 2 (two or more)."""

    size_class: int


@dataclass(frozen=True)
class SeqInfo:
    items: Optional[tuple[Optional["Info"], ...]] = None  # known length
    item: Optional["Info"] = None  # unknown length, every item alike

    @property
    def length(self) -> Optional[int]:
        return None if self.items is None else len(self.items)

    def at(self, index: Any) -> Optional["Info"]:
        if self.items is not None:
            return self.items[index] if isinstance(index, int) and -len(self.items) <= index < len(self.items) else None
        return self.item if isinstance(index, int) else None


Info = Union[TensorInfo, SizesInfo, SeqInfo]
_SCALAR = "scalar"  # a Python number: broadcasts without changing a tensor's rank


class InfoProxy(fx.Proxy):
    """A `torch.fx.Proxy` that may carry an `Info`."""

    info: Optional[Info] = None

    @property
    def keys(self) -> fx.Proxy:
        """``x.keys`` read as a value (a cache layer's key tensor) is an attribute node; calling
        it (``**x``, ``x.keys()``) records the same call as torch.fx's own ``keys``."""
        return AttributeProxy(self, "keys")

    def __iter__(self) -> Iterator[Any]:
        """Items of a traced value: by its known length, else by the unpacking the calling code
        does (``a, b = proxy``), else the tracer's ``iter`` (module docstring)."""
        return _items(self, _length(self.info), inspect.currentframe().f_back)

    def __setitem__(self, index: Any, value: Any) -> None:
        """``x[index] = value`` on a traced tensor: one ``operator.setitem`` node, run in program
        order on the real tensor (fx keeps such nodes: they have side effects)."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, index, value), {})

    def __len__(self) -> int:
        length = _length(self.info)
        if length is None:
            raise NotTraceable("len() of a traced value of unknown length")
        return length

    def __getattr__(self, name: str) -> Any:
        if isinstance(self.info, TensorInfo):
            if name == "ndim":
                return self.info.rank
            if name == "dim":
                rank = self.info.rank
                return lambda: rank
            if name == "shape":
                proxy = self.tracer.create_proxy("call_function", getattr, (self, "shape"), {})
                proxy.info = SizesInfo(self.info.rank, self.info.classes)
                return proxy
        return AttributeProxy(self, name)  # what torch.fx's __getattr__ gives, unpacked as above


class AttributeProxy(fx.proxy.Attribute):
    """torch.fx's attribute proxy (``x.shape``), unpacked as `InfoProxy` unpacks (module docstring)."""

    def __iter__(self) -> Iterator[Any]:
        return _items(self, None, inspect.currentframe().f_back)


def _items(proxy: fx.Proxy, length: Optional[int], caller: types.FrameType) -> Iterator[Any]:
    """`length` items of `proxy`, else as many as the `caller` unpacks, else the tracer's ``iter``."""
    if length is None:
        offset = caller.f_lasti if sys.version_info >= (3, 11) else 2 * caller.f_lasti
        length = _unpack_sizes(caller.f_code).get(offset)
        if length is None:
            return proxy.tracer.iter(proxy)
    return iter([proxy[i] for i in range(length)])


@functools.lru_cache(maxsize=1024)
def _unpack_sizes(code: types.CodeType) -> dict[int, int]:
    """Offset -> item count of every ``UNPACK_SEQUENCE`` instruction of `code`."""
    return {i.offset: i.argval for i in dis.get_instructions(code) if i.opname == "UNPACK_SEQUENCE"}


def _length(info: Optional[Info]) -> Optional[int]:
    if isinstance(info, SizesInfo):
        return info.length
    if isinstance(info, SeqInfo):
        return info.length
    return None


def info_of(value: Any) -> Any:
    """The `Info` of a traced or concrete value; ``"scalar"`` for a Python number; None if unknown."""
    if isinstance(value, InfoProxy):
        return value.info
    if isinstance(value, fx.Proxy):
        return None
    if isinstance(value, torch.Tensor):
        return TensorInfo(value.dim())
    if isinstance(value, (bool, int, float)):
        return _SCALAR
    if isinstance(value, torch.Size):
        return SizesInfo(len(value))
    if isinstance(value, (tuple, list)):
        return SeqInfo(items=tuple(info_of(v) for v in value))
    return None


# ---------------------------------------------------------------------- rules
_SAME_RANK_METHODS = frozenset(
    """contiguous to float half double bfloat16 int long bool type type_as clone detach softmax log_softmax
    transpose permute flip roll tril triu exp log sqrt rsqrt abs neg sigmoid tanh relu gelu clamp clamp_min
    clamp_max cumsum expand_as view_as reshape_as masked_fill_ requires_grad_ float_power reciprocal sin cos
    __neg__ __abs__ __invert__""".split()
)
_BROADCAST_METHODS = frozenset("add sub mul div pow masked_fill where maximum minimum __add__ __sub__ __mul__ __truediv__".split())
_SAME_RANK_FUNCTIONS = {
    operator.neg, operator.pos, operator.invert, operator.abs,
    torch.tanh, torch.sigmoid, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.neg, torch.relu,
    torch.softmax, torch.log_softmax, torch.clamp, torch.transpose, torch.permute, torch.flip, torch.roll, torch.cumsum,
    F.relu, F.gelu, F.silu, F.mish, F.softmax, F.log_softmax, F.dropout, F.layer_norm, F.group_norm, F.normalize,
    F.linear, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.softplus, F.tanh, F.sigmoid,
}
_BROADCAST_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.mod,
    operator.and_, operator.or_, operator.xor, operator.lt, operator.le, operator.gt, operator.ge,
    torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.where, torch.maximum, torch.minimum,
}
_SCALAR_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg}
#: leaf module types whose output has the rank of their (first) input, for every input
RANK_PRESERVING_MODULES: tuple[type, ...] = (
    nn.Linear, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softmax, nn.LeakyReLU, nn.ELU,
    nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.PReLU,
)


def _is_scalar(info: Any) -> bool:
    return info == _SCALAR or isinstance(info, DimInfo)


def _dim(classes: Optional[tuple[int, ...]], index: Any) -> Any:
    """The info of size `index` of a shape whose size classes are `classes` (None: unknown)."""
    if classes is not None and isinstance(index, int) and -len(classes) <= index < len(classes):
        return DimInfo(classes[index])
    return _SCALAR


_COMPARISONS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge}
_MIRRORED = {operator.lt: operator.gt, operator.le: operator.ge, operator.gt: operator.lt, operator.ge: operator.le}


def decide_comparison(target: Any, args: tuple) -> Optional[bool]:
    """The value of ``target(*args)`` (a comparison of a `DimInfo` size with a Python int) where the
    size class decides it for every size of that class; None otherwise (a node is recorded)."""
    if target not in _COMPARISONS or len(args) != 2:
        return None
    left, right = args
    if not isinstance(info_of(left), DimInfo):
        left, right, target = right, left, _MIRRORED.get(target, target)
    info = info_of(left)
    if not isinstance(info, DimInfo) or type(right) is not int:
        return None
    if info.size_class < 2:  # the size itself is known
        return bool(target(info.size_class, right))
    # two or more: decided when every size >= 2 compares alike with `right` (then 2 and 3 do)
    if right > 2:
        return None
    low, high = target(2, right), target(3, right)
    return bool(low) if low == high else None


def _tensor_rank(info: Any) -> Optional[int]:
    return info.rank if isinstance(info, TensorInfo) else None


def _broadcast(values: list[Any]) -> Optional[Info]:
    """Elementwise result: the largest rank among tensor operands (Python numbers do not count)."""
    ranks = []
    for v in values:
        info = info_of(v)
        if _is_scalar(info) or v is None:
            continue
        if not isinstance(info, TensorInfo):
            return None
        ranks.append(info.rank)
    return TensorInfo(max(ranks)) if ranks else None


def _sizes_count(sizes: tuple) -> Optional[int]:
    """Number of dimensions a ``view``/``reshape`` size argument list describes: several arguments
    are one size each; a single one is a size (an int) or a sequence of sizes."""
    if len(sizes) != 1:
        return len(sizes)
    info = info_of(sizes[0])
    if _is_scalar(info):
        return 1
    return _length(info)


def _index_rank(rank: int, index: Any) -> Optional[int]:
    """Rank of ``x[index]`` for basic indexing (ints, slices, None, Ellipsis); None otherwise."""
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (fx.Proxy, torch.Tensor, list)) for i in items):
        return None  # advanced (tensor) indexing: depends on the index's shape
    consumed = sum(1 for i in items if isinstance(i, (int, slice)))
    if consumed > rank or sum(1 for i in items if i is Ellipsis) > 1:
        return None
    return rank - sum(1 for i in items if isinstance(i, int)) + sum(1 for i in items if i is None)


def _getitem(container: Any, index: Any) -> Optional[Info]:
    info = info_of(container)
    if isinstance(info, SeqInfo):
        return info.at(index)
    if isinstance(info, SizesInfo):
        if isinstance(index, slice) and not any(isinstance(v, fx.Proxy) for v in (index.start, index.stop, index.step)):
            return SizesInfo(len(range(info.length)[index]), None if info.classes is None else info.classes[index])
        return _dim(info.classes, index) if isinstance(index, int) else None
    if isinstance(info, TensorInfo):
        rank = _index_rank(info.rank, index)
        return None if rank is None else TensorInfo(rank)
    return None


def _dim_arg(args: tuple, kwargs: dict, position: int, name: str, default: Any) -> Any:
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


def _method(name: str, args: tuple, kwargs: dict) -> Optional[Info]:
    rank = _tensor_rank(info_of(args[0])) if args else None
    if rank is None:
        return None
    rest = args[1:]
    if name in _SAME_RANK_METHODS:
        return TensorInfo(rank)
    if name in _BROADCAST_METHODS:
        return _broadcast(list(args) + list(kwargs.values()))
    if name == "size":
        if not rest and "dim" not in kwargs:
            return SizesInfo(rank, info_of(args[0]).classes)
        return _dim(info_of(args[0]).classes, rest[0] if rest else kwargs["dim"])
    if name == "numel":
        return _SCALAR
    if name in ("view", "reshape", "expand", "repeat", "new_zeros", "new_ones", "new_empty"):
        if any(isinstance(s, torch.dtype) for s in rest) or kwargs.keys() - {"dtype", "device"}:
            return None
        count = _sizes_count(rest) if rest else None
        return None if count is None else TensorInfo(count)
    if name == "unsqueeze":
        return TensorInfo(rank + 1)
    if name in ("split", "chunk", "tensor_split"):
        return SeqInfo(item=TensorInfo(rank))
    if name == "unbind":
        return SeqInfo(item=TensorInfo(rank - 1))
    if name == "flatten":
        start = _dim_arg(rest, kwargs, 0, "start_dim", 0)
        end = _dim_arg(rest, kwargs, 1, "end_dim", -1)
        if not (isinstance(start, int) and isinstance(end, int)) or rank == 0:
            return None
        start, end = start % rank, end % rank
        return TensorInfo(rank - (end - start)) if start <= end else None
    if name in ("matmul", "__matmul__", "bmm"):
        return _matmul(args)
    if name == "__getitem__":
        return _getitem(args[0], rest[0]) if rest else None
    return None


def _matmul(args: tuple) -> Optional[Info]:
    ranks = [_tensor_rank(info_of(a)) for a in args[:2]]
    if None in ranks or min(ranks) < 2:
        return None
    return TensorInfo(max(ranks))


def _function(target: Any, args: tuple, kwargs: dict) -> Optional[Info]:
    if target is operator.getitem:
        return _getitem(args[0], args[1])
    if target is getattr and len(args) == 2 and args[1] == "shape":
        info = info_of(args[0])
        return SizesInfo(info.rank, info.classes) if isinstance(info, TensorInfo) else None
    if target is operator.add and all(isinstance(info_of(a), (SizesInfo, SeqInfo)) for a in args):
        lengths = [_length(info_of(a)) for a in args]
        return None if None in lengths else SizesInfo(sum(lengths))
    if target in _SCALAR_FUNCTIONS and all(_is_scalar(info_of(a)) for a in args):
        return _SCALAR
    if target in _BROADCAST_FUNCTIONS:
        return _broadcast(list(args) + [v for k, v in kwargs.items() if k in ("other", "input", "condition")])
    if target in _SAME_RANK_FUNCTIONS:
        rank = _tensor_rank(info_of(args[0])) if args else None
        return None if rank is None else TensorInfo(rank)
    if target in (operator.matmul, torch.matmul):
        return _matmul(args)
    if target in (torch.cat, torch.concat, torch.stack) and args and isinstance(args[0], (tuple, list)) and args[0]:
        ranks = {_tensor_rank(info_of(t)) for t in args[0]}
        if len(ranks) != 1 or None in ranks:
            return None
        rank = ranks.pop()
        return TensorInfo(rank + 1 if target is torch.stack else rank)
    if target is torch.unsqueeze:
        rank = _tensor_rank(info_of(args[0]))
        return None if rank is None else TensorInfo(rank + 1)
    if target in (torch.split, torch.chunk):
        rank = _tensor_rank(info_of(args[0]))
        return None if rank is None else SeqInfo(item=TensorInfo(rank))
    return None


def infer(kind: str, target: Any, args: tuple, kwargs: dict, module: Optional[nn.Module], rank_preserving: tuple) -> Optional[Info]:
    """The `Info` of a node's result from its operation and its inputs' infos (None: unknown)."""
    try:
        if kind == "call_method":
            return _method(target, args, kwargs)
        if kind == "call_function":
            return _function(target, args, kwargs)
        if kind == "call_module" and module is not None and isinstance(module, RANK_PRESERVING_MODULES + rank_preserving):
            x = args[0] if args else next(iter(kwargs.values()), None)
            rank = _tensor_rank(info_of(x))
            return None if rank is None else TensorInfo(rank)
        if kind == "call_module" and isinstance(module, nn.Embedding):
            rank = _tensor_rank(info_of(args[0] if args else None))
            return None if rank is None else TensorInfo(rank + 1)
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        return None
    return None
