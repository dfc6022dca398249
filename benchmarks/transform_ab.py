"""Transform time of fxlora against peft, alternating in one process: the measure of a change.

For each of the suite's models (`suite.cases`), ``fxlora.transform`` and ``peft.get_peft_model``
each adapt a fresh copy of one base model in eval mode, in turn, round after round (a garbage
collection before each timing); the ratio of their fastest rounds is printed (on a shared machine
interference only ever slows a round down). ``--fxlora PATH`` imports fxlora from another checkout
(``git worktree add /tmp/before <rev>``), for before / after figures of one change.

    python benchmarks/transform_ab.py [--models mlp,llama] [--rounds 15] [--fxlora PATH]
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,linear24,vit,llama,llama7b-meta")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--fxlora", default=None, help="a checkout to import fxlora from")
    args = parser.parse_args()
    if args.fxlora:
        sys.path.insert(0, args.fxlora)
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    warnings.simplefilter("ignore")
    import peft
    import torch

    import fxlora
    import suite

    print(f"fxlora from {fxlora.__file__}")
    cases = suite.cases()
    for name in args.models.split(","):
        case = cases[name]
        torch.manual_seed(0)
        base = case.make_base().eval()
        adapt = {
            "fxlora": lambda m: fxlora.transform(m, fxlora.LoraConfig(**case.lora)),
            "peft": lambda m: peft.get_peft_model(m, peft.LoraConfig(**case.lora)),
        }
        best = {k: float("inf") for k in adapt}
        for _ in range(args.rounds if not case.transform_only else max(3, args.rounds // 3)):
            for library, fn in adapt.items():
                model = copy.deepcopy(base)
                gc.collect()
                start = time.perf_counter()
                fn(model)
                best[library] = min(best[library], time.perf_counter() - start)
                del model
        print(f"{case.name}: fxlora {best['fxlora'] * 1e3:.2f} ms, peft {best['peft'] * 1e3:.2f} ms, ratio {best['fxlora'] / best['peft']:.2f}", flush=True)


if __name__ == "__main__":
    main()
