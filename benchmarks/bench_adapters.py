"""Many adapters: mixed-batch forward cost, switch latency and compilation counts, fxlora vs peft.

24 Linear(1024) layers, r=16, batch 64, 3 adapters plus base rows, eager and with every model
``torch.compile``d: each ratio is given as the median of the per-round ratios and as the ratio of
the fastest rounds (this shared machine's interference only ever slows a round down). Switch
latency on 240 targeted layers, in eval and in train mode; the cost of a forward after a
never-seen run-time scale (and what such scales leave behind); compilation counts over the sequence:
first call, same call, set_adapter to another adapter, back, disable, enable, merge, unmerge, a new
scale, a first mixed batch, a mixed batch with another row assignment. All measured in one run.

    python benchmarks/bench_adapters.py [--rounds 31]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings

import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounter

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import interleaved_samples, paired_ratios, table  # noqa: E402

import fxlora  # noqa: E402

ADAPTERS = ["a", "b", "c"]


def stack(n_layers: int, width: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n_layers)])


def with_adapters(base: nn.Module, r: int):
    import peft

    targets = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    fx_model = fxlora.transform(copy.deepcopy(base), fxlora.LoraConfig(r=r, target_modules=targets, init_lora_weights=False), adapter_name="a")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, target_modules=targets, init_lora_weights=False), adapter_name="a")
    for name in ADAPTERS[1:]:
        fx_model.add_adapter(name, fxlora.LoraConfig(r=r, target_modules=targets, init_lora_weights=False))
        pm.add_adapter(name, peft.LoraConfig(r=r, target_modules=targets, init_lora_weights=False))
    return fx_model.eval(), pm.eval()


def mixed_batch_ratios(rounds: int) -> list[dict]:
    torch.manual_seed(0)
    base = stack(24, 1024).eval()
    fx_model, pm = with_adapters(base, 16)
    x = torch.randn(64, 1024)
    names = [(ADAPTERS + ["__base__"])[i % 4] for i in range(64)]

    def run(model, **kw):
        def f():
            with torch.no_grad():
                model(x, **kw)

        return f

    eager = interleaved_samples({"base": run(base), "fxlora": run(fx_model, adapter_names=names), "peft": run(pm, adapter_names=names)}, rounds)
    # the same, every model torch.compile'd (each compiled for the mixed batch before timing)
    torch._dynamo.reset()
    cbase, cfx, cpm = (torch.compile(m) for m in (base, fx_model, pm))
    compiled = interleaved_samples({"base": run(cbase), "fxlora": run(cfx, adapter_names=names), "peft": run(cpm, adapter_names=names)}, rounds)
    torch._dynamo.reset()
    label = "mixed batch / base forward (24x Linear(1024), r=16, batch 64, 3 adapters + base rows)"
    rows = []
    for mode, samples in (("eager", eager), ("compiled", compiled)):
        ratios = paired_ratios(samples, "base")
        for stat, i in (("median of rounds", 0), ("fastest rounds", 1)):
            rows.append(
                {
                    "measure": f"{label}, {mode}, {stat}",
                    "fxlora": f"{ratios['fxlora'][i]:.3f}x",
                    "peft": f"{ratios['peft'][i]:.3f}x",
                    "goal": "<= 1.2x",
                }
            )
    return rows


def switch_latency() -> list[dict]:
    torch.manual_seed(0)
    base = stack(240, 64)
    fx_model, pm = with_adapters(base, 8)

    def per_switch(fn, n=100):
        for _ in range(5):
            fn("a"), fn("b")
        start = time.perf_counter()
        for i in range(n):
            fn(ADAPTERS[i % 2])
        return (time.perf_counter() - start) / n * 1e3

    fx_ms = per_switch(fx_model.set_adapter)
    peft_ms = per_switch(pm.set_adapter)
    fx_model.train(), pm.train()
    fx_train = per_switch(fx_model.set_adapter, 20)
    peft_train = per_switch(pm.set_adapter, 20)
    return [
        {"measure": "set_adapter, 240 targeted layers, eval mode (ms)", "fxlora": f"{fx_ms:.3f}", "peft": f"{peft_ms:.3f}", "goal": "< 0.5"},
        {"measure": "set_adapter, 240 targeted layers, train mode (ms)", "fxlora": f"{fx_train:.3f}", "peft": f"{peft_train:.3f}", "goal": "< 0.5"},
    ]


def distinct_scales(rounds: int) -> list[dict]:
    """Per-call cost of a forward after `set_adapter_scale` to a value never seen before, against
    the same value again (eager, a 3-layer MLP where the per-call overhead shows), and what the
    new values leave behind (eager codes kept, branch templates)."""
    import importlib

    from fxlora.runtime.forwards import GraphForward, installed_forward

    templates = importlib.import_module("fxlora.passes.insert_lora")._TEMPLATES
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    fx_model, _ = with_adapters(base, 4)
    x = torch.randn(4, 32)
    counter = iter(range(10**9))

    def same():
        fx_model.set_adapter_scale("a", 0.5)
        with torch.no_grad():
            fx_model(x)

    def new():
        fx_model.set_adapter_scale("a", 0.5 + next(counter) * 1e-6)
        with torch.no_grad():
            fx_model(x)

    same(), new()
    codes_before = sum(len(f._eager) for f in map(installed_forward, fx_model.model.modules()) if isinstance(f, GraphForward))
    templates_before = len(templates)
    samples = interleaved_samples({"same scale": same, "new scale": new}, rounds * 10)
    ratio = paired_ratios(samples, "same scale")["new scale"][0]
    codes = sum(len(f._eager) for f in map(installed_forward, fx_model.model.modules()) if isinstance(f, GraphForward))
    return [
        {"measure": f"forward after a never-seen scale / same scale ({next(counter)} new values)", "fxlora": f"{ratio:.3f}x", "peft": "", "goal": "<= 2x"},
        {
            "measure": "eager codes / branch templates kept, before -> after those scales",
            "fxlora": f"{codes_before}/{templates_before} -> {codes}/{len(templates)}",
            "peft": "",
            "goal": "flat",
        },
    ]


def compile_counts() -> list[dict]:
    def sequence(model, merge, unmerge, set_scale):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter)
        x = torch.randn(4, 32)
        names_1, names_2 = ["a", "b", "__base__", "a"], ["b", "__base__", "a", "a"]
        compiled(x), compiled(x)
        model.set_adapter("b"), compiled(x)
        model.set_adapter("a"), compiled(x)
        with model.disable_adapter():
            compiled(x)
        compiled(x)
        merge(), compiled(x)
        unmerge(), compiled(x)
        set_scale(), compiled(x)
        compiled(x, adapter_names=names_1)
        compiled(x, adapter_names=names_2)
        return counter.frame_count

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    fx_model, pm = with_adapters(base, 4)
    fx_frames = sequence(
        fx_model,
        lambda: fx_model.merge_adapter(),
        lambda: fx_model.unmerge_adapter(),
        lambda: fx_model.set_adapter_scale("a", 0.5),
    )

    def peft_scale():
        for m in pm.modules():
            if hasattr(m, "set_scale"):
                m.set_scale("a", 0.5)

    peft_frames = sequence(pm, lambda: pm.merge_adapter(), lambda: pm.unmerge_adapter(), peft_scale)
    return [{"measure": "compilations over the 11-step sequence (3-layer MLP)", "fxlora": str(fx_frames), "peft": str(peft_frames), "goal": "<= 2"}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, eager mode unless stated")
    rows = mixed_batch_ratios(args.rounds) + switch_latency() + distinct_scales(args.rounds) + compile_counts()
    print(table(rows, ["measure", "fxlora", "peft", "goal"]))


if __name__ == "__main__":
    main()
