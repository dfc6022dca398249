"""EVA's math (PEFT 0.21.2's ``init_lora_weights="eva"``, explained variance adaptation): an
incremental SVD of each target's inputs, batch by batch, and the split of the total rank among
the targets by explained variance (`fxlora.initialize_lora_eva_weights` runs the data).

`IncrementalSVD` is incremental PCA (scikit-learn's algorithm, in PEFT's torch form with its
randomized SVD ``torch.svd_lowrank(q=2k, niter=4)`` seeded with 42 in a forked generator, so the
caller's random numbers are untouched): after each batch it holds the top ``k`` right singular
vectors of all inputs seen so far, centred (``components``, signs fixed so that each row's largest
entry is positive), their singular values, and the fraction of the total variance each explains.
The arithmetic (float64 sums, float32 batches) is PEFT's, so the same batches give PEFT's bits.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import torch

__all__ = ["IncrementalSVD", "rank_distribution"]

_SEED = 42
_NITER = 4


class IncrementalSVD:
    """Top-`k` principal directions of the rows fed to `update`, one batch at a time."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.components: Optional[torch.Tensor] = None  # (k, features)
        self.singular_values: Optional[torch.Tensor] = None
        self.explained_variance_ratio: Optional[torch.Tensor] = None
        self._mean: Optional[torch.Tensor] = None  # float64
        self._var: Optional[torch.Tensor] = None  # float64
        self._seen: Optional[torch.Tensor] = None  # int64, shape (1,)

    def _moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, variance, count) of all rows seen including `x` (Chan et al.'s update)."""
        count = torch.tensor([x.shape[0]], device=x.device)
        seen = self._seen if self._seen is not None else torch.tensor([0], device=x.device)
        total = seen + count
        old_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if self._mean is None else self._mean * seen
        new_sum = x.sum(dim=0, dtype=torch.float64)
        mean = (old_sum + new_sum) / total
        centred = x - new_sum / count
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        spread = centred.square().sum(dim=0, dtype=torch.float64) - correction / count
        if self._var is None:
            return mean, spread / total, total
        ratio = seen.double() / count
        spread = self._var * seen + spread + ratio / total * (old_sum / ratio - new_sum).square()
        return mean, spread / total, total

    def _svd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(singular values, right singular vectors as rows) with each row's largest entry positive."""
        with torch.random.fork_rng():
            torch.manual_seed(_SEED)
            _, s, v = torch.svd_lowrank(x, q=2 * self.k, niter=_NITER)
        vt = v.mH
        signs = torch.sign(vt[range(vt.shape[0]), torch.argmax(torch.abs(vt), dim=1)])
        return s, vt * signs.view(-1, 1)

    def update(self, batch: torch.Tensor) -> None:
        """Take the rows of the float32 (n, features) `batch` (n >= k) into the decomposition."""
        x = batch.clone()
        mean, var, total = self._moments(x)
        if self.components is None:
            x -= mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            shift = torch.sqrt((self._seen.double() / total) * x.shape[0]) * (self._mean - batch_mean)
            x = torch.vstack((self.singular_values.view(-1, 1) * self.components, x, shift))
        s, vt = self._svd(x)
        self.components, self.singular_values = vt[: self.k], s[: self.k]
        self.explained_variance_ratio = (s**2 / torch.sum(var * total))[: self.k]
        self._mean, self._var, self._seen = mean, var, total


def rank_distribution(
    ratios: dict[str, torch.Tensor], owners: dict[str, str], shared: dict[str, str], budget: int
) -> dict[str, int]:
    """{layer: rank}: the `budget` components with the largest explained-variance ratio over all
    layers go to their layers. `ratios`: each decomposed layer's ratios (as many as it may take);
    `owners`: {layer: the layer whose decomposition it uses}; `shared`: the layers that use
    another's (their owner is given the larger of the two ranks, as PEFT does)."""
    keys, values = zip(*[(layer, value) for layer, owner in owners.items() for value in ratios[owner]])
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget])
    ranks = {layer: counts.get(layer, 0) for layer in owners}
    for layer, owner in shared.items():
        if ranks[owner] < ranks[layer]:
            ranks[owner], ranks[layer] = ranks[layer], ranks[owner]
    return ranks
