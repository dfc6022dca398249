"""Fine-tune a timm model with LoRA on a small generated image set.

The images (32x32, three classes: horizontal stripes, vertical stripes, a checkerboard, each with a
random phase, period, colour and noise) are generated here, so nothing is downloaded. The model is
a timm architecture built with ``pretrained=False``; LoRA adapts its convolutions and the
classifier head is trained in full as a ``modules_to_save`` copy. Prints the plan (every target on
the graph path), the trainable-parameter line, and the accuracy before and after.

    python examples/timm_image_classifier.py [--model resnet10t] [--epochs 4] [--images 768]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

import fxlora


def make_images(n: int, generator: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(3, size, size)`` and their labels: 0 horizontal stripes, 1 vertical stripes,
    2 checkerboard."""
    labels = torch.randint(0, 3, (n,), generator=generator)
    period = torch.randint(3, 7, (n, 1, 1), generator=generator).float()
    phase = torch.rand(n, 1, 1, generator=generator) * period
    grid = torch.arange(size).float()
    rows = ((grid.view(1, -1, 1) + phase) / period).floor() % 2  # varies down the image
    cols = ((grid.view(1, 1, -1) + phase) / period).floor() % 2  # varies across it
    pattern = torch.where(labels.view(-1, 1, 1) == 0, rows.expand(-1, -1, size), cols.expand(-1, size, -1))
    pattern = torch.where(labels.view(-1, 1, 1) == 2, (rows + cols) % 2, pattern)
    colour = torch.rand(n, 3, 1, 1, generator=generator) * 0.8 + 0.2
    images = pattern.unsqueeze(1) * colour + 0.25 * torch.randn(n, 3, size, size, generator=generator)
    return images, labels


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(-1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t", help="any timm model name (built with pretrained=False)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=768, help="training images (a third as many are held out)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    import timm

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    train_x, train_y = make_images(args.images, generator)
    test_x, test_y = make_images(args.images // 3, generator)

    base = timm.create_model(args.model, pretrained=False, num_classes=3)
    head = base.default_cfg.get("classifier", "fc")
    convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    config = fxlora.LoraConfig(target_modules=convs, r=8, lora_alpha=16, modules_to_save=[head])
    report = fxlora.explain(base, config)
    print(
        f"{args.model}: {len(report.targets)} convolutions adapted, graph share {report.graph_share:.2f}, "
        f"graph roots: {', '.join(r or '<model>' for r in report.graph_roots)}"
    )
    model = fxlora.transform(base, config)
    model.print_trainable_parameters()

    before = accuracy(model, test_x, test_y)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total, steps = 0.0, 0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = loss_fn(model(train_x[idx]), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        print(f"epoch {epoch}/{args.epochs}: loss {total / steps:.4f} ({time.perf_counter() - start:.1f}s)")

    after = accuracy(model, test_x, test_y)
    print(f"accuracy before: {before:.3f} | after: {after:.3f}")
    with model.disable_adapter():
        print(f"accuracy with the adapter disabled (the base model): {accuracy(model, test_x, test_y):.3f}")


if __name__ == "__main__":
    main()
