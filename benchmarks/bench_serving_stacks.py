"""Serving a mixed batch eagerly: computing on the adapters' weights themselves, or on stacked
copies of them (made per call, or kept between calls).

Each adapted linear layer computes its adapters on their own rows (`fxlora.core.ops.grouped_linear_update`:
per adapter two ``linear`` on its gathered rows and one ``index_add``, on the weights as they are).
Against it, in the same run and interleaved, two batched-matmul versions on the adapters' weights
stacked (ranks padded, groups padded to equal sizes: fxlora's code until the stacks were found
to go stale): with the stacks made on every call, and with the stacks kept between calls and
rebuilt when a weight's ``_version``, ``data_ptr`` or identity changes (the cache that misses
``.data`` writes and fused optimizer steps); and peft (``linear`` per adapter on its rows, in
Python modules). Each as a ratio to the base model's forward: the median of per-round ratios
and the ratio of the fastest rounds.

    PYTHONPATH=. python benchmarks/bench_serving_stacks.py [--rounds 41] [--layers 24] [--width 1024] [--adapters 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import interleaved_samples, paired_ratios, table  # noqa: E402

import fxlora  # noqa: E402
import fxlora.core.ops as ops  # noqa: E402

Weights = tuple[list[torch.Tensor], list[torch.Tensor]]


def stacked(weights: Weights) -> tuple[torch.Tensor, torch.Tensor]:
    """The K adapters' A ``(K, R, in)`` and B ``(K, out, R)``, ranks padded with zeros (a copy)."""
    lora_a, lora_b = weights
    rank = max(w.shape[0] for w in lora_a)
    return (
        torch.stack([F.pad(w.t(), (0, rank - w.shape[0])).t() for w in lora_a]),
        torch.stack([F.pad(w, (0, rank - w.shape[1])) for w in lora_b]),
    )


def padded_groups(index: tuple[torch.Tensor, ...], factors: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups' rows one after another, each padded to the largest with its first row, and
    ``(K, G, 1)`` factors (0 on padding)."""
    size = max(len(rows) for rows in index)
    flat, scale = [], []
    for rows, factor in zip(index, factors):
        rows = rows.tolist()
        flat += rows + rows[:1] * (size - len(rows))
        scale += [factor] * len(rows) + [0.0] * (size - len(rows))
    return torch.tensor(flat), torch.tensor(scale).view(len(index), size, 1)


def bmm_update(kept: Optional[dict]) -> Callable:
    """`grouped_linear_update` as two batched matmuls over stacked weights: stacked per call
    (`kept` None) or kept in `kept` and rebuilt when a weight's identity, data pointer or
    ``_version`` changes. The padded groups are made once per call, as the row plan is."""
    plans: dict[int, tuple] = {}

    def update(x: torch.Tensor, base: torch.Tensor, weights: Weights, index: tuple, factors: list[float]) -> torch.Tensor:
        key = (id(index), tuple(factors))
        if key not in plans:
            plans[key] = (index, *padded_groups(index, factors))  # holding `index` keeps its id unique
        _, flat, scale = plans[key]
        if kept is None:
            stack_a, stack_b = stacked(weights)
        else:
            stamp = tuple((id(t), t.data_ptr(), t._version) for t in (*weights[0], *weights[1]))
            entry = kept.get(id(weights[0][0]))
            if entry is None or entry[0] != stamp:
                entry = kept[id(weights[0][0])] = (stamp, stacked(weights))
            stack_a, stack_b = entry[1]
        groups = stack_a.shape[0]
        hidden = torch.bmm(x.index_select(0, flat).view(groups, -1, stack_a.shape[2]), stack_a.transpose(1, 2)) * scale
        out = torch.bmm(hidden, stack_b.transpose(1, 2))
        return base.index_add(0, flat, out.view(flat.shape[0], -1))

    return update


def models(layers: int, width: int, rank: int, names: list[str]):
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).eval()
    targets = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    fx_model = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(r=rank, target_modules=targets, init_lora_weights=False), adapter_name=names[0])
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, target_modules=targets, init_lora_weights=False), adapter_name=names[0])
    for name in names[1:]:
        fx_model.add_adapter(name, fxlora.LoraConfig(r=rank, target_modules=targets, init_lora_weights=False))
        pm.add_adapter(name, peft.LoraConfig(r=rank, target_modules=targets, init_lora_weights=False))
    return base, fx_model.eval(), pm.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    adapters = [f"a{i}" for i in range(args.adapters)]
    base, fx_model, pm = models(args.layers, args.width, args.rank, adapters)
    x = torch.randn(args.batch, args.width)
    names = [(adapters + ["__base__"])[i % (len(adapters) + 1)] for i in range(args.batch)]
    on_weights, per_call, kept = ops.grouped_linear_update, bmm_update(None), bmm_update({})

    def run(model, grouped=None, **kw):
        def f():
            ops.grouped_linear_update = grouped or on_weights
            with torch.no_grad():
                model(x, **kw)

        return f

    contenders = {
        "base": run(base),
        "on the weights (fxlora now)": run(fx_model, on_weights, adapter_names=names),
        "bmm, stacked per call": run(fx_model, per_call, adapter_names=names),
        "bmm, stacks kept (_version cache)": run(fx_model, kept, adapter_names=names),
        "peft": run(pm, adapter_names=names),
    }
    samples = interleaved_samples(contenders, args.rounds)
    ops.grouped_linear_update = on_weights
    ratios = paired_ratios(samples, "base")
    fastest = {name: min(values) * 1e3 for name, values in samples.items()}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.layers}x Linear({args.width}), r={args.rank}, "
        f"batch {args.batch}, {args.adapters} adapters + base rows, no_grad, {args.rounds} rounds"
    )
    rows = [
        {"contender": name, "fastest round (ms)": f"{fastest[name]:.2f}", "median ratio to base": f"{ratios[name][0]:.3f}x", "fastest ratio to base": f"{ratios[name][1]:.3f}x"}
        for name in contenders
    ]
    print(table(rows, ["contender", "fastest round (ms)", "median ratio to base", "fastest ratio to base"]))


if __name__ == "__main__":
    main()
