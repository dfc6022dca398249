"""Alike blocks computed once per call in the probe (`fxlora.tracing.probe`).

The probe's forward pass is there to record call patterns, and most of its time goes to the
blocks of a deep model: a 7B-shaped llama on the meta device spends about 300 ms in its 32 decoder
layers for each example, a tiny llama a millisecond per layer. Alike blocks called alike are
called alike inside as well, so `AlikeBlocks` computes each such call once:

- **Alike blocks** are the children of one container (``nn.ModuleList``, ``nn.Sequential``,
  ``nn.ModuleDict``) with the same class and the same tree: the same relative module names and
  classes, and the same tensors (names, shapes, dtypes, devices) in each module.
- **Called alike**: the same call pattern (`fxlora.tracing.call_keys.call_key`, ranked and sized)
  and the same shape, dtype and device of every tensor in the arguments (looking into tuples,
  lists and dicts).
- The first block called so runs its forward; the calls recorded inside it are kept by relative
  name. Each later block called so returns that output (the same object) and records the same
  calls for its own modules, without computing.

What this gives up: a block whose forward branches on a value of its own that the tree does not
show (a ``layer_idx`` read in an ``if``) is recorded as its first alike sibling was called. The
probe's records only choose which patterns are traced ahead; a call with any other pattern is
traced when it first comes (`fxlora.runtime.forwards.GraphForward`), so no result depends on them.
An example that fails with blocks skipped is run again with every block computed
(`fxlora.tracing.probe.observe_calls`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Hashable, NamedTuple, Optional

import torch
import torch.nn as nn

from fxlora.tracing.call_keys import call_key
from fxlora.tracing.reuse import module_tensors
from fxlora.tracing.submodules import BLOCK_CONTAINERS, named_submodules

__all__ = ["AlikeBlocks"]

#: what a probe hook records: (id of the module called, its call pattern)
Record = tuple[int, Hashable]


class _Computed(NamedTuple):
    """One computed call of a block: its output and the calls recorded inside it, by relative name."""

    output: Any
    inner: list[tuple[str, Hashable]]


class _Block(NamedTuple):
    module: nn.Module
    group: dict  # signature -> _Computed, shared by the alike blocks of one container
    names: dict[int, str]  # id of a module of the block -> its relative name
    ids: dict[str, int]  # and back


def _tree(module: nn.Module) -> tuple[list[tuple[str, nn.Module]], Hashable]:
    named = named_submodules(module)
    return named, tuple((name, type(m), module_tensors(m)) for name, m in named)


def _tensor_layout(value: Any, out: list) -> None:
    if isinstance(value, torch.Tensor):
        out.append((tuple(value.shape), value.dtype, value.device))
    elif type(value) in (tuple, list):
        for v in value:
            _tensor_layout(v, out)
    elif type(value) is dict:
        for k in sorted(value, key=str):
            _tensor_layout(value[k], out)


def _signature(args: tuple, kwargs: dict) -> Optional[Hashable]:
    key = call_key(False, args, kwargs, ranked=True, sized=True)
    if key is None:
        return None
    layout: list = []
    _tensor_layout((args, kwargs), layout)
    return key, tuple(layout)


class AlikeBlocks:
    """A context manager for the probe's forward passes: while it is entered, each block with
    alike siblings (module docstring) has a forward that computes once per signature for its
    group and replays the calls recorded inside into `records` (the probe hooks' list).
    `hooked`: the ids of the modules whose calls the probe records (None: all); alike blocks
    also have them at the same relative names. Enter it once per example (one forward pass);
    leaving puts every forward back and forgets the example's outputs."""

    def __init__(self, model: nn.Module, records: list[Record], hooked: Optional[set[int]] = None) -> None:
        self.records = records
        self._hooked = hooked
        self._groups: list[dict] = []
        self._blocks: list[_Block] = []
        for container in model.modules():
            if isinstance(container, BLOCK_CONTAINERS):
                self._add_groups(container)
        self._saved: list[tuple[nn.Module, Optional[Callable]]] = []
        #: calls answered without computing in the example entered last
        self.replayed = 0

    def _add_groups(self, container: nn.Module) -> None:
        by_tree: dict[Hashable, list[tuple[nn.Module, list]]] = defaultdict(list)
        for child in dict.fromkeys(container.children()):
            named, tree = _tree(child)
            hooked = None if self._hooked is None else tuple(n for n, m in named if id(m) in self._hooked)
            by_tree[(type(child), tree, hooked)].append((child, named))
        for members in by_tree.values():
            if len(members) < 2:
                continue
            group: dict = {}
            self._groups.append(group)
            for child, named in members:
                names = {id(m): n for n, m in named}
                self._blocks.append(_Block(child, group, names, {n: i for i, n in names.items()}))

    def __bool__(self) -> bool:
        return bool(self._blocks)

    def __enter__(self) -> "AlikeBlocks":
        self.replayed = 0
        for block in self._blocks:
            module = block.module
            self._saved.append((module, module.__dict__.get("forward")))
            module.__dict__["forward"] = self._forward(block, module.forward)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, previous in reversed(self._saved):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        self._saved.clear()
        for group in self._groups:  # the outputs kept are the example's: not kept past it
            group.clear()

    def _forward(self, block: _Block, original: Callable) -> Callable:
        records = self.records

        def forward(*args: Any, **kwargs: Any) -> Any:
            signature = _signature(args, kwargs)
            computed = None if signature is None else block.group.get(signature)
            if computed is not None:
                self.replayed += 1
                records.extend((block.ids[name], key) for name, key in computed.inner)
                return computed.output
            start = len(records)
            output = original(*args, **kwargs)
            if signature is not None:
                inner = [(block.names[i], key) for i, key in records[start:] if i in block.names]
                block.group[signature] = _Computed(output, inner)
            return output

        return forward
