"""Which optimisation passes run after the LoRA branches are inserted (all on by default)."""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["PassOptions"]


@dataclass(frozen=True)
class PassOptions:
    """Switches for the graph-only optimisations. Each keeps the computed values equal (up to
    float rounding) and can be turned off on its own, e.g. to compare or debug:

    - ``skip_dropout``: drop the dropout node of a branch whose dropout probability is 0.
    - ``share_lora_a``: layers that read the same input (q/k/v, gate/up projections) compute their
      A products in one matmul on the concatenated A weights, then split.
    - ``fold_scaling``: scale the rank-r hidden (not the layer's output) and, for linear layers, add
      the B product to the base output in one ``addmm``.
    - ``guard_idle`` (off by default): in gated evaluation code (what ``torch.compile`` sees in
      eval mode), each adapted layer runs its branches under ``torch.cond`` on its gates, so merged,
      disabled and inactive adapters skip their branches compiled, still without recompiling on a
      state change. Each ``torch.cond`` costs a host sync and a sub-graph call per layer: on this
      CPU a compiled merged model ran 8% faster with it and an unmerged one 3-7% slower
      (`benchmarks/suite.py`), so switch it on for serving mostly merged or disabled adapters.
      Refused by ``set_optimizations`` on a torch whose dynamo drops a compiled frame's state
      updates across a ``torch.cond`` (torch 2.14: `fxlora.runtime.cond_support`).
    """

    skip_dropout: bool = True
    share_lora_a: bool = True
    fold_scaling: bool = True
    guard_idle: bool = False

    @classmethod
    def none(cls) -> "PassOptions":
        return cls(**{f.name: False for f in fields(cls)})
