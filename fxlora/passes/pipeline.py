"""The order of the passes, as data.

`PIPELINE` lists every pass `fxlora.passes.rewrite` may run, in order, each in a `Stage` with the
`PassOptions` switch that turns it on (None: always runs) and the condition on the code being
built under which it applies. The passes that add LoRA come first (`call_weight_reads`, which
turns a parent's ``F.linear`` on an adapted layer's weight into a call of the layer,
`adapt_weight_uses`, which hands other code using such a weight the adapted weight, `swap_saved_modules`, `insert_lora`, `mark_base_calls`), the optimisations after; the opt-in `guard_idle_branches` runs
before `insert_lora`, on gated evaluation code only. Each pass's `requires` holds on the output
of the stages before it (`tests/passes/test_pipeline.py` checks it on real models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.passes.base import Pass, PassContext, PassResult, checks_enabled
from fxlora.passes.base_calls import MARK_BASE_CALLS
from fxlora.passes.fold_scaling import FOLD_SCALING
from fxlora.passes.guard_idle import GUARD_IDLE_BRANCHES, gated_evaluation
from fxlora.passes.insert_lora import INSERT_LORA
from fxlora.passes.share_lora_a import SHARE_LORA_A
from fxlora.passes.weight_uses import ADAPT_WEIGHT_USES
from fxlora.passes.skip_dropout import SKIP_DROPOUT
from fxlora.passes.swap_saved import SWAP_SAVED
from fxlora.passes.weight_reads import CALL_WEIGHT_READS

__all__ = ["Stage", "PIPELINE", "run_pipeline", "always"]


def always(ctx: PassContext) -> bool:
    """The condition of a stage that applies to any code."""
    return True


@dataclass(frozen=True)
class Stage:
    """A pass of the pipeline, the `PassOptions` field switching it on (None: no switch) and the
    condition on the code being built under which it runs."""

    pass_: Pass
    option: Optional[str] = None
    when: Callable[[PassContext], bool] = always

    def applies(self, ctx: PassContext) -> bool:
        return (self.option is None or getattr(ctx.options, self.option)) and self.when(ctx)


PIPELINE: tuple[Stage, ...] = (
    Stage(CALL_WEIGHT_READS),
    Stage(ADAPT_WEIGHT_USES),
    Stage(SWAP_SAVED),
    Stage(GUARD_IDLE_BRANCHES, option="guard_idle", when=gated_evaluation),
    Stage(INSERT_LORA),
    Stage(MARK_BASE_CALLS),
    Stage(SKIP_DROPOUT, option="skip_dropout"),
    Stage(SHARE_LORA_A, option="share_lora_a"),
    Stage(FOLD_SCALING, option="fold_scaling"),
)


def run_pipeline(
    graph: fx.Graph,
    root: nn.Module,
    ctx: PassContext,
    check: Optional[bool] = None,
    stages: tuple[Stage, ...] = PIPELINE,
) -> tuple[PassResult, ...]:
    """Run the `stages` that apply to `ctx` in order on `graph` (in place); with `check` (default:
    `fxlora.passes.base.checks_enabled`) each checks its contracts. Returns their results."""
    check = checks_enabled() if check is None else check
    return tuple(stage.pass_(graph, root, ctx, check) for stage in stages if stage.applies(ctx))
