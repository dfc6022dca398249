"""Graph coverage of the test zoo: how many LoRA targets take the graph path, and why not the others.

For each tiny transformers model (PEFT's default targets and "all-linear") and each timm model
(all linear layers, all non-grouped convolutions) of ``tests/zoo.py``, prints the share of targets
on the graph path and, where it is below 1, the reason `fxlora.explain` gives for the first
eager target. Nothing is trained; models are built from configs (no downloads).

    python benchmarks/graph_share.py [--only llama gpt2 bert]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fxlora  # noqa: E402
from zoo import TIMM, TRANSFORMERS, conv_targets, linear_targets, tiny_timm  # noqa: E402


def row(model_name: str, label: str, report: fxlora.Report) -> str:
    graph, total = len(report.graph_targets), len(report.targets)
    line = f"{model_name:<18} {label:<11} {graph:>3}/{total:<3} {report.graph_share:6.1%}"
    if report.eager_targets:
        first = next(r for r in report.rows if r.role == "lora" and r.path == "eager")
        line += f"  eager e.g. {first.name}: {first.reason[:110]}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="zoo names to show")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"{'model':<18} {'targets':<11} {'graph':>7} {'share':>6}")
    for name, tiny in TRANSFORMERS.items():
        if args.only and name not in args.only:
            continue
        model = tiny.build()
        for label, targets in (("default", None), ("all-linear", "all-linear")):
            print(row(name, label, fxlora.explain(model, fxlora.LoraConfig(target_modules=targets))))
    for name in TIMM:
        if args.only and name not in args.only:
            continue
        model, _ = tiny_timm(name)
        for label, targets in (("linear", linear_targets(model)), ("conv", conv_targets(model))):
            print(row(f"timm {name}", label, fxlora.explain(model, fxlora.LoraConfig(target_modules=targets))))


if __name__ == "__main__":
    main()
