"""Forward and training-step time of fxlora against peft and against the base model.

Seed MLP (the custom-models guide's, hidden 2000) and a timm model, eager mode, measured in one run
with interleaved rounds. Ratios below 1.0 mean fxlora is faster.

    python benchmarks/bench_core.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch
import torch.nn as nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import forward, interleaved, table, train_step  # noqa: E402

import fxlora  # noqa: E402


class MLP(nn.Module):
    def __init__(self, num_units_hidden: int = 2000):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(20, num_units_hidden), nn.ReLU(), nn.Linear(num_units_hidden, num_units_hidden), nn.ReLU(),
            nn.Linear(num_units_hidden, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, X):
        return self.seq(X)


def cases():
    yield "seed MLP (batch 64)", MLP(), dict(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]), torch.randn(64, 20)
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    yield "timm vit_tiny (batch 4, qkv+fc1+fc2)", vit, dict(target_modules=r".*\.(qkv|fc1|fc2)", modules_to_save=["head"]), torch.randn(4, 3, 224, 224)


def measure(name, base, kwargs, x, rounds):
    import peft

    base.eval()
    fx_model = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(**kwargs))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    full = copy.deepcopy(base)
    for m in (fx_model, peft_model, full):
        m.train()
    loss = lambda out: out.float().square().mean()  # noqa: E731
    opt = lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)  # noqa: E731
    fwd = interleaved({"fxlora": forward(fx_model.eval(), x), "peft": forward(peft_model.eval(), x), "base": forward(full.eval(), x)}, rounds)
    for m in (fx_model, peft_model, full):
        m.train()
    step = interleaved(
        {
            "fxlora": train_step(fx_model, x, loss, opt(fx_model)),
            "peft": train_step(peft_model, x, loss, opt(peft_model)),
            "base": train_step(full, x, loss, opt(full)),
        },
        max(5, rounds // 2),
    )
    rows = []
    for what, t in (("forward", fwd), ("train step", step)):
        rows.append(
            {
                "model": name,
                "measure": what,
                "fxlora ms": f"{t['fxlora'] * 1e3:.2f}",
                "peft ms": f"{t['peft'] * 1e3:.2f}",
                "base ms": f"{t['base'] * 1e3:.2f}",
                "fxlora/peft": f"{t['fxlora'] / t['peft']:.3f}",
                "fxlora/base": f"{t['fxlora'] / t['base']:.3f}",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; base train step = full fine-tuning")
    rows = []
    for name, base, kwargs, x in cases():
        rows += measure(name, base, kwargs, x, args.rounds)
    print(table(rows, ["model", "measure", "fxlora ms", "peft ms", "base ms", "fxlora/peft", "fxlora/base"]))


if __name__ == "__main__":
    main()
