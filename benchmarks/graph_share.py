"""Graph coverage: how many LoRA targets take the graph path, and why not the others.

Three tables, each model built from a config (no downloads, nothing trained):

- the transformers sweep (`tests/zoo_sweep.py`, 44 model types): default targets (PEFT's table,
  else the attention's query and value projections) and "all-linear";
- timm (`tests/zoo.py`): all linear layers, all non-grouped convolutions;
- diffusers (`tests/zoo_diffusers.py`): the Stable Diffusion targets ``to_q, to_k, to_v, to_out.0``.

Each row gives the share of targets on the graph path and, where it is below 1, the reason
`fxlora.explain` gives for the first eager target; each table ends with its total.

    python benchmarks/graph_share.py [--only llama vit unet] [--tables sweep timm diffusers]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fxlora  # noqa: E402

Row = tuple[str, str, Callable[[], tuple]]  # model name, target label, () -> (model, targets, excluded)


def row(model_name: str, label: str, report: fxlora.Report) -> str:
    graph, total = len(report.graph_targets), len(report.targets)
    line = f"{model_name:<22} {label:<11} {graph:>3}/{total:<3} {report.graph_share:6.1%}"
    if report.eager_targets:
        first = next(r for r in report.rows if r.role == "lora" and r.path == "eager")
        line += f"  eager e.g. {first.name}: {first.reason[:110]}"
    return line


def sweep_rows(only: set[str]) -> Iterator[Row]:
    from zoo_sweep import SWEEP, build

    for name, entry in SWEEP.items():
        if not only or name in only:
            yield name, "default", lambda name=name, entry=entry: (build(name), entry.targets, ())
            yield name, "all-linear", lambda name=name, entry=entry: (build(name), "all-linear", entry.exclude)


def timm_rows(only: set[str]) -> Iterator[Row]:
    from zoo import TIMM, conv_targets, linear_targets, tiny_timm

    for name in TIMM:
        if not only or name in only:
            for label, targets in (("linear", linear_targets), ("conv", conv_targets)):
                yield f"timm {name}", label, lambda name=name, targets=targets: _with(tiny_timm(name)[0], targets)


def diffusers_rows(only: set[str]) -> Iterator[Row]:
    from zoo_diffusers import DIFFUSERS, SD_TARGETS

    for name, build in DIFFUSERS.items():
        if not only or name in only:
            yield name, "sd", lambda build=build: (build(), SD_TARGETS, ())


def _with(model, targets_of) -> tuple:
    return model, targets_of(model), ()


TABLES = {"sweep": sweep_rows, "timm": timm_rows, "diffusers": diffusers_rows}


def table(name: str, rows: Iterable[Row]) -> None:
    totals: dict[str, list[int]] = {}
    for model_name, label, make in rows:
        try:
            model, targets, excluded = make()
            config = fxlora.LoraConfig(target_modules=targets, exclude_modules=list(excluded) or None)
            report = fxlora.explain(model, config)
        except Exception as exc:  # a model this environment cannot build: say so, count nothing
            print(f"{model_name:<22} {label:<11} not built: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        print(row(model_name, label, report), flush=True)
        total = totals.setdefault(label, [0, 0, 0, 0])
        total[0] += len(report.graph_targets)
        total[1] += len(report.targets)
        total[2] += report.graph_share == 1.0
        total[3] += 1
    for label, (graph, count, whole, models) in totals.items():
        share = graph / count if count else 0.0
        print(f"== {name} {label}: {graph}/{count} targets in a graph ({share:.1%}); {whole}/{models} models wholly in a graph")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="model names to show")
    parser.add_argument("--tables", nargs="*", default=list(TABLES), choices=list(TABLES))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    print(f"{'model':<22} {'targets':<11} {'graph':>7} {'share':>6}")
    for name in args.tables:
        table(name, TABLES[name](set(args.only)))


if __name__ == "__main__":
    main()
