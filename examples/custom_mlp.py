"""Main example: PEFT's "custom models" workflow with fxlora.

Trains LoRA adapters on the guide's MLP (20 -> 2000 -> 2000 -> 2) for a generated two-class problem,
with the last layer fully trained as a `modules_to_save` copy. Prints the trainable-parameter line,
a progress bar while training, and the accuracy before and after.

    python examples/custom_mlp.py [--epochs 6] [--hidden 2000]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn as nn

import fxlora


class MLP(nn.Module):
    def __init__(self, num_units_hidden: int = 2000):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(20, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, num_units_hidden),
            nn.ReLU(),
            nn.Linear(num_units_hidden, 2),
            nn.LogSoftmax(dim=-1),
        )

    def forward(self, X):
        return self.seq(X)


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes that no linear rule separates: the label is the sign of a product of features."""
    x = torch.randn(n, 20, generator=generator)
    y = ((x[:, 0] * x[:, 1] + 0.5 * x[:, 2] ** 2 - 0.5) > 0).long()
    return x, y


class ProgressBar:
    """A one-line text progress bar (redrawn in a terminal, one line per epoch otherwise)."""

    def __init__(self, total: int, label: str, width: int = 30):
        self.total, self.label, self.width = total, label, width
        self.start = time.perf_counter()
        self.tty = sys.stdout.isatty()

    def update(self, done: int, note: str = "") -> None:
        if not self.tty and done != self.total:
            return
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        line = f"{self.label} [{bar}] {done}/{self.total} {time.perf_counter() - self.start:5.1f}s {note}"
        print(("\r" if self.tty else "") + line, end="" if self.tty and done != self.total else "\n", flush=True)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x_train, y_train = make_data(2048, generator)
    x_test, y_test = make_data(1024, generator)

    config = fxlora.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])
    base = MLP(args.hidden)
    print(fxlora.explain(base, config))  # dry run: what will be adapted, and how
    print()
    model = fxlora.transform(base, config)
    model.print_trainable_parameters()
    print("targeted modules:", model.targeted_module_names)

    before = accuracy(model, x_test, y_test)
    print(f"accuracy before training: {before:.3f}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    loss_fn = nn.NLLLoss()
    steps = (len(x_train) + args.batch_size - 1) // args.batch_size
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        bar = ProgressBar(steps, f"epoch {epoch}/{args.epochs}")
        total = 0.0
        for step in range(steps):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            bar.update(step + 1, f"loss {total / (step + 1):.4f}")

    after = accuracy(model, x_test, y_test)
    print(f"accuracy before: {before:.3f} | after: {after:.3f}")
    with model.disable_adapter():
        print(f"accuracy with the adapter disabled (the base model): {accuracy(model, x_test, y_test):.3f}")


if __name__ == "__main__":
    main()
