"""The ``embedding`` kind: ``nn.Embedding``.

A is ``(r, num_embeddings)``, B is ``(embedding_dim, r)``, both plain parameters
(``lora_embedding_A`` / ``lora_embedding_B``, PEFT's names); the update looks ids up in ``A.T``
with the base layer's options (padding_idx, max_norm, ...) and multiplies by ``B.T``. No dropout
and no B bias. Init (PEFT's): A zero, B standard normal. The delta is ``(B @ A).T``, shaped like
the weight (num_embeddings, embedding_dim); with ``max_norm`` the base renormalises the rows it
looks up, which does not commute with adding the update, so such a layer takes no merge. Nor does
a subclass with its own forward (transformers' scaled and positional embeddings) unless it is
declared linear in the weight (`fxlora.kinds.subclasses`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxlora.kinds.registry import Factors, Init, KindBase, register_kind
from fxlora.kinds.subclasses import own_forward_merge_obstacle
from fxlora.kinds.weight_inits import refuse_weight_init

if TYPE_CHECKING:
    from fxlora.core.layers import AdapterSpec

__all__ = ["EMBEDDING"]


class EmbeddingKind(KindBase):
    name = "embedding"
    layer_types = "nn.Embedding"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def check_spec(self, where: str, module: nn.Module, spec: "AdapterSpec") -> None:
        if spec.lora_bias:
            raise ValueError(f"lora_bias=True is not supported for the Embedding {where}; set lora_bias=False")

    def factor_shapes(self, module: nn.Module, spec: "AdapterSpec") -> dict[str, tuple[int, ...]]:
        shapes = {"lora_embedding_A": (spec.r, module.num_embeddings), "lora_embedding_B": (module.embedding_dim, spec.r)}
        return self.shapes_with_magnitude(module, spec, shapes)

    def make_factors(
        self, module: nn.Module, spec: "AdapterSpec", init: Init, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Union[nn.Module, nn.Parameter]]:
        refuse_weight_init(type(module).__name__, init)
        a = nn.Parameter(torch.randn(spec.r, module.num_embeddings))
        b = nn.Parameter(torch.randn(module.embedding_dim, spec.r))
        if init is not False:
            nn.init.zeros_(a)
            nn.init.normal_(b)
        return {
            "lora_embedding_A": nn.Parameter(a.detach().to(device=device, dtype=dtype)),
            "lora_embedding_B": nn.Parameter(b.detach().to(device=device, dtype=dtype)),
        }

    def update(self, module: nn.Module, adapter: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        lora_a = module.lora_embedding_A[adapter]
        lora_b = module.lora_embedding_B[adapter]
        after_a = F.embedding(
            x, lora_a.T, module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse
        )
        return after_a @ lora_b.T

    def template_key(self, module: nn.Module) -> Hashable:
        return (module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse)

    def bias(self, module: nn.Module, adapter: str) -> Optional[torch.Tensor]:
        return None

    def merge_obstacle(self, module: nn.Module) -> Optional[str]:
        own = own_forward_merge_obstacle(module, [nn.Embedding], "a lookup")
        if own is not None:
            return own
        if module.max_norm is None:
            return None
        return (
            f"the embedding renormalises rows (max_norm={module.max_norm}), so the merged lookup would differ "
            "from base + update; keep this adapter unmerged"
        )

    def as_matrices(self, module: nn.Module, adapter: str) -> Factors:
        return Factors(module.lora_embedding_A[adapter], module.lora_embedding_B[adapter])

    def weight_from_matrix(self, module: nn.Module, matrix: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
        return matrix.T

    def write_matrices(self, module: nn.Module, adapter: str, factors: Factors, bias: Optional[torch.Tensor]) -> None:
        module.lora_embedding_A[adapter].copy_(factors.a)
        module.lora_embedding_B[adapter].copy_(factors.b)


    # ---------------------------------------------------------------- DoRA
    def dora_obstacle(self, module: nn.Module) -> Optional[str]:
        return self.merge_obstacle(module)

    def magnitude_shape(self, module: nn.Module) -> tuple[int, ...]:
        return (module.embedding_dim,)

    def dora_norm(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight.T, dim=1)

    def dora_on_weight(self, module: nn.Module, values: torch.Tensor) -> torch.Tensor:
        return values.view(1, -1)

    def dora_terms(self, module: nn.Module, adapter: str, x: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.update(module, adapter, x, base), base  # no dropout, no bias


EMBEDDING = register_kind(EmbeddingKind())
