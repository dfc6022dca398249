"""Graph passes. Each pass states what it requires of a graph and what it guarantees after, as
code that runs (`Pass.requires` / `Pass.ensures`, raising `PassContractError`; checked when
``FXLORA_CHECK_PASSES=1``), and finds its nodes by the tags passes leave on them
(`fxlora.passes.tags`).

`rewrite` walks `PIPELINE` (`fxlora.passes.pipeline`), which turns a traced base graph into the
adapted model's graph: the passes that add LoRA (`call_weight_reads`, `swap_saved_modules`,
`insert_lora`, `mark_base_calls`), then the optimisations switched on in `PassOptions` (`skip_dropout`,
`share_lora_a`, `fold_scaling`). The opt-in `guard_idle_branches` runs before `insert_lora` on
gated evaluation code: it marks the layer calls whose branches the layers then compute
themselves, under ``torch.cond``.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.core.gates import EagerKey
from fxlora.passes.base import Pass, PassContext, PassResult, checks_enabled
from fxlora.passes.base_calls import mark_base_calls
from fxlora.passes.fold_scaling import fold_scaling
from fxlora.passes.gates_input import gates_input
from fxlora.passes.guard_idle import guard_idle_branches
from fxlora.passes.insert_lora import insert_lora
from fxlora.passes.options import PassOptions
from fxlora.passes.pipeline import PIPELINE, Stage, run_pipeline
from fxlora.passes.share_lora_a import share_lora_a
from fxlora.passes.skip_dropout import skip_dropout
from fxlora.passes.swap_saved import swap_saved_modules
from fxlora.passes.weight_reads import call_weight_reads
from fxlora.passes.tags import NodeTag, Role, tag_of

__all__ = [
    "rewrite",
    "PassOptions",
    "Pass",
    "PassContext",
    "PassResult",
    "PIPELINE",
    "Stage",
    "run_pipeline",
    "checks_enabled",
    "NodeTag",
    "Role",
    "tag_of",
    "mark_base_calls",
    "insert_lora",
    "swap_saved_modules",
    "skip_dropout",
    "share_lora_a",
    "fold_scaling",
    "guard_idle_branches",
    "call_weight_reads",
]


def rewrite(
    graph: fx.Graph,
    root: nn.Module,
    options: Optional[PassOptions] = None,
    eager: Optional[EagerKey] = None,
    training: bool = True,
) -> fx.Graph:
    """Apply the `PIPELINE` stages that apply to `graph` (in place) and return it, linted. The
    result takes the call's gates as its first input (`gates_input`).

    `eager` is None for code that reads the adapter state from gate tensors only (what
    torch.compile sees), or the `fxlora.core.gates.EagerKey` of eager code that runs only the branches
    and copies in use. `training` says which mode the graph was traced for (gated evaluation code
    guards idle branches, see `guard_idle_branches`).

    Requires: `graph` traced from `root` by `fxlora.tracing.traced.trace_variant`.
    """
    gates_input(graph)
    run_pipeline(graph, root, PassContext.of(options, eager, training))
    graph.lint()
    return graph
