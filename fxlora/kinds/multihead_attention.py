"""The ``multihead_attention`` kind: ``nn.MultiheadAttention`` (PEFT's ``lora.MultiheadAttention``).

``nn.MultiheadAttention`` has no projection module to put a branch on: its forward hands
``in_proj_weight`` (the fused (3 * embed_dim, embed_dim) q, k, v weight) and ``out_proj.weight``
to ``F.multi_head_attention_forward`` (or a fused kernel) and never calls ``out_proj``. An adapter
on it therefore changes both weights, as PEFT's does:

- ``lora_A`` / ``lora_B``: ``nn.Linear(embed_dim, r)`` and ``nn.Linear(r, 3 * embed_dim)`` on the layer,
  the update of ``in_proj_weight``;
- ``out_proj.lora_A`` / ``out_proj.lora_B``: ``nn.Linear(embed_dim, r)`` and ``nn.Linear(r, embed_dim)``
  under the layer's ``out_proj``, the update of ``out_proj.weight``.

File keys (PEFT's): ``<name>.lora_A.weight``, ``<name>.lora_B.weight``,
``<name>.base_layer.out_proj.lora_A.weight``, ``<name>.base_layer.out_proj.lora_B.weight``.

The output is not the base output plus an update, so the kind computes the adapted call itself
(`LayerKind.own_call`): the layer's own class forward, run on a view of the layer whose two weights
are ``weight + (B @ A) * scaling * gate`` summed over its adapters in order (PEFT's forward
computes ``weight + (B @ A) * scaling`` the same way). The layer itself is never written, so calls
in several threads do not disturb each other, and torch.compile traces it without a graph break.
Each update is applied once: PEFT 0.21.2 adds the ``out_proj`` delta twice (in its forward and in
its merge, while its gradient sees it once); fxlora does not copy that, so a PEFT-trained adapter
whose ``out_proj`` factors are non-zero computes differently in PEFT.

Refused at transform (`UnsupportedTargetError`): separate q/k/v weights (``kdim`` / ``vdim`` other
than ``embed_dim``: PEFT refuses them too), an ``out_proj`` that is not an ``nn.Linear``, a subclass
with its own forward, ``lora_bias`` and ``lora_dropout`` (PEFT ignores both on this layer, silently:
its merged-weight forward has no place for them).

Mixed batches (``adapter_names``, which PEFT refuses on this layer): a weight cannot differ per row,
so a ``batch_first=True`` layer is called once per adapter some row uses and once without adapters,
and each row's outputs are taken from its adapter's call (`fxlora.core.own_rows`); a
``batch_first=False`` layer (rows on dim 1) is refused.

Init, in PEFT's random order: A kaiming-uniform with ``a=sqrt(5)``, B zero. PEFT builds the
``out_proj`` factors of a layer's first adapter twice (the second ones are kept), and fxlora draws
the same numbers, so seeded runs start from PEFT's weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.fx
import torch.nn as nn

from fxlora.errors import UnsupportedTargetError
from fxlora.kinds.low_rank import ModulePairKind
from fxlora.kinds.registry import Factors, Init, KindBase, WeightView, register_kind

if TYPE_CHECKING:
    from fxlora.core.layers import AdapterSpec

__all__ = ["MULTIHEAD_ATTENTION", "with_weights"]

#: where the out_proj factors hang, relative to the layer (`fxlora.core.layers.attach_adapter`)
OUT_A, OUT_B = "out_proj.lora_A", "out_proj.lora_B"


def with_weights(module: nn.MultiheadAttention, in_proj_weight: torch.Tensor, out_weight: torch.Tensor) -> Any:
    """`module` as its forward sees it, with ``in_proj_weight`` and ``out_proj.weight`` replaced
    (nothing of `module` changes)."""
    out_proj = WeightView(module.out_proj, {"weight": out_weight})
    return WeightView(module, {"in_proj_weight": in_proj_weight, "out_proj": out_proj})


def _updated(weight: torch.Tensor, lora_a: nn.Module, lora_b: nn.Module, multiplier: Any) -> torch.Tensor:
    """``weight + (B @ A) * multiplier`` with the product rounded into the weight's dtype once;
    `multiplier` is a Python number or ``(scaling, gate)`` (gate: a 0-d tensor)."""
    delta = lora_b.weight @ lora_a.weight
    if isinstance(multiplier, tuple):
        scaling, gate = multiplier
        delta = delta * scaling * gate.to(delta.dtype)
    else:
        delta = delta * multiplier
    return weight + delta.to(weight.dtype)


class MultiheadAttentionKind(ModulePairKind):
    name = "multihead_attention"
    layer_types = "nn.MultiheadAttention"
    own_call = True

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def reference_weight(self, module: nn.Module) -> torch.Tensor:
        return module.in_proj_weight

    def dora_obstacle(self, module: nn.Module) -> Optional[str]:
        return KindBase.dora_obstacle(self, module)  # PEFT has no DoRA for nn.MultiheadAttention either

    def mixed_batch_obstacle(self, module: nn.Module) -> Optional[str]:
        if module.batch_first:
            return None  # (batch, seq, embed): each row's outputs, along dim 0, depend on that row alone
        return (
            "an nn.MultiheadAttention with batch_first=False takes (seq, batch, embed), so its rows are not on dim 0, "
            "and its adapters change its weights, which cannot differ per row"
        )

    def check_spec(self, where: str, module: nn.Module, spec: "AdapterSpec") -> None:
        cls = type(module).__name__
        if type(module).forward is not nn.MultiheadAttention.forward:
            raise UnsupportedTargetError(
                f"cannot adapt {where} ({cls}): the class has its own forward, which fxlora cannot tell the "
                "computation of; exclude it (exclude_modules) or adapt a plain nn.MultiheadAttention"
            )
        if not module._qkv_same_embed_dim:
            raise UnsupportedTargetError(
                f"cannot adapt {where} ({cls}): its query, key and value have separate weights (kdim/vdim other "
                "than embed_dim); only a fused in_proj_weight takes LoRA (as in PEFT); exclude it (exclude_modules)"
            )
        if not isinstance(module.out_proj, nn.Linear):
            raise UnsupportedTargetError(
                f"cannot adapt {where} ({cls}): its out_proj is a {type(module.out_proj).__name__}, not an nn.Linear"
            )
        for option, value, meaning in (("lora_bias", spec.lora_bias, "True"), ("lora_dropout", spec.dropout, str(spec.dropout))):
            if value:
                raise ValueError(
                    f"cannot adapt {where} ({cls}) with {option}={meaning}: its update is folded into the attention's "
                    f"weights at each call, which has no place for {option.replace('lora_', 'a LoRA ')} (PEFT ignores it "
                    f"on this layer); use {option}={'False' if option == 'lora_bias' else '0.0'} for it (rank_pattern "
                    "cannot set this per layer: use a separate adapter), or exclude it (exclude_modules)"
                )

    def factor_shapes(self, module: nn.Module, spec: "AdapterSpec") -> dict[str, tuple[int, ...]]:
        dim = module.embed_dim
        return {
            "lora_A.weight": (spec.r, dim),
            "lora_B.weight": (3 * dim, spec.r),
            "base_layer.out_proj.lora_A.weight": (spec.r, dim),
            "base_layer.out_proj.lora_B.weight": (dim, spec.r),
        }

    def factor_modules(self, module: nn.Module, spec: "AdapterSpec") -> tuple[nn.Module, nn.Module]:
        return nn.Linear(module.embed_dim, spec.r, bias=False), nn.Linear(spec.r, 3 * module.embed_dim, bias=False)

    def _out_pair(self, module: nn.Module, spec: "AdapterSpec", init: Init) -> tuple[nn.Module, nn.Module]:
        lora_a, lora_b = nn.Linear(module.embed_dim, spec.r, bias=False), nn.Linear(spec.r, module.embed_dim, bias=False)
        self._init(lora_a, lora_b, init, spec.r)
        return lora_a, lora_b

    def make_factors(
        self, module: nn.Module, spec: "AdapterSpec", init: Init, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Union[nn.Module, nn.Parameter]]:
        self.check_spec(type(module).__name__, module, spec)
        if not module._modules.get("lora_A"):
            self._out_pair(module, spec, init)  # PEFT builds a first adapter's out_proj factors twice
        made = super().make_factors(module, spec, init, device, dtype)
        out_a, out_b = self._out_pair(module, spec, init)
        made[OUT_A], made[OUT_B] = out_a.to(device=device, dtype=dtype), out_b.to(device=device, dtype=dtype)
        return made

    def update(self, module: nn.Module, adapter: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        raise TypeError("nn.MultiheadAttention has no additive update: its kind computes the adapted call (adapted_call)")

    def adapted_call(self, module: nn.Module, args: tuple, kwargs: dict, multipliers: dict[str, Any]) -> Any:
        in_weight, out_weight = module.in_proj_weight, module.out_proj.weight
        out_holder_a, out_holder_b = module.out_proj.lora_A, module.out_proj.lora_B
        for adapter, multiplier in multipliers.items():
            in_weight = _updated(in_weight, module.lora_A[adapter], module.lora_B[adapter], multiplier)
            out_weight = _updated(out_weight, out_holder_a[adapter], out_holder_b[adapter], multiplier)
        return type(module).forward(with_weights(module, in_weight, out_weight), *args, **kwargs)

    def merged_weights(self, module: nn.Module) -> tuple[str, ...]:
        return ("in_proj_weight", "out_proj.weight")

    def weight_matrices(self, module: nn.Module, adapter: str) -> dict[str, Factors]:
        out = module.out_proj
        return {
            "in_proj_weight": self.as_matrices(module, adapter),
            "out_proj.weight": Factors(out.lora_A[adapter].weight, out.lora_B[adapter].weight),
        }

    def weight_from_matrix(self, module: nn.Module, matrix: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
        return matrix

    def combine_obstacle(self, module: nn.Module, combination: str) -> Optional[str]:
        return (
            "an nn.MultiheadAttention adapter is two updates (in_proj and out_proj), which add_weighted_adapter "
            "does not combine; leave the layer out of the combined adapters"
        )


MULTIHEAD_ATTENTION = register_kind(MultiheadAttentionKind())
