"""`Code`: what a graph root runs for one call pattern."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch.nn as nn

from fxlora.runtime.idle import IdleCode
from fxlora.tracing.boundaries import BaseLayers

__all__ = ["Code", "MAX_EAGER_CODES"]


class Code(NamedTuple):
    """Generated code of one call pattern, where its inputs come from (None: the call's
    positional arguments as they are, the common case; else `fxlora.tracing.call_keys.Source`s),
    and the layers it calls for their base output only (while one has hooks or a new forward,
    the call runs the root's own forward: `fxlora.tracing.boundaries.BaseLayers`)."""

    fn: Callable[..., Any]
    inputs: Optional[tuple]
    base: BaseLayers
    #: gated evaluation code only: the base model's code for `fxlora.runtime.idle.run_gated`
    idle: Optional[IdleCode] = None
    #: the type the call rebuilds from the graph's dict output (`TracedVariant.output_type`)
    output: Optional[type] = None
    #: the graph roots of their own the code tells which code to run (`NESTED_CODE`), with the
    #: forwards they had: while one has another, the call runs the root's own forward
    nested: tuple[tuple[nn.Module, Any], ...] = ()


#: eager codes kept per graph root (least recently used dropped first); each is code for one
#: `EagerKey` (a set of live adapter names), so a handful covers any serving pattern
MAX_EAGER_CODES = 16
