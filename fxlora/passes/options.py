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
    """

    skip_dropout: bool = True
    share_lora_a: bool = True
    fold_scaling: bool = True

    @classmethod
    def none(cls) -> "PassOptions":
        return cls(**{f.name: False for f in fields(cls)})
