"""`fxlora.explain`: the dry run. What a config would adapt, how, and at what cost — nothing changes.

It is PEFT's custom-models workflow ("find the layer names, then verify") in one call::

    report = fxlora.explain(model, config)
    print(report)            # a table: module, type, rank, alpha, params, path (graph/eager, and why)
    report.targets           # the names transform() would adapt
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn

from fxlora.config import LoraConfig
from fxlora.planning.plan import Plan, TracePolicy, make_plan

__all__ = ["explain", "Report", "ReportRow"]


@dataclass(frozen=True)
class ReportRow:
    name: str
    type: str
    role: str  # "lora" | "modules_to_save"
    rank: Optional[int]
    alpha: Optional[float]
    params: int
    path: str  # "graph" | "eager"
    root: Optional[str]
    reason: str
    calls: Optional[int] = None


@dataclass(frozen=True)
class Report:
    """Result of `explain`: one row per adapted / saved module plus totals; ``str()`` is a table."""

    model_type: str
    adapter: str
    rows: tuple[ReportRow, ...]
    graph_roots: tuple[str, ...]
    trainable_params: int
    all_params: int
    warnings: tuple[str, ...] = field(default_factory=tuple)
    #: call patterns traced by planning, and those the probe saw that are traced when first met
    #: by a call or when torch.compile compiles (`fxlora.planning.roots.trace_root`), over all roots
    traced_patterns: int = 0
    pending_patterns: int = 0

    @property
    def targets(self) -> list[str]:
        return [r.name for r in self.rows if r.role == "lora"]

    @property
    def modules_to_save(self) -> list[str]:
        return [r.name for r in self.rows if r.role == "modules_to_save"]

    @property
    def graph_targets(self) -> list[str]:
        return [r.name for r in self.rows if r.role == "lora" and r.path == "graph"]

    @property
    def eager_targets(self) -> list[str]:
        return [r.name for r in self.rows if r.role == "lora" and r.path == "eager"]

    @property
    def graph_share(self) -> float:
        """Fraction of LoRA targets on the graph path."""
        return len(self.graph_targets) / len(self.targets) if self.targets else 0.0

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable_params / self.all_params if self.all_params else 0.0

    def __str__(self) -> str:
        head = ("module", "type", "r", "alpha", "params", "path")
        lines = []
        for r in self.rows:
            path = r.path if r.path == "graph" else f"eager: {r.reason}"
            if r.path == "graph" and r.root:
                path = f"graph ({r.root})"
            rank = "" if r.rank is None else str(r.rank)
            alpha = "" if r.alpha is None else f"{r.alpha:g}"
            kind = r.type if r.role == "lora" else f"{r.type} [saved copy]"
            lines.append((r.name, kind, rank, alpha, f"{r.params:,d}", path))
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head[:-1])]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        out = [
            f"fxlora plan for {self.model_type} (adapter {self.adapter!r}): "
            f"{len(self.targets)} LoRA targets ({len(self.graph_targets)} graph, {len(self.eager_targets)} eager), "
            f"{len(self.modules_to_save)} modules_to_save",
            fmt.format(*head),
            fmt.format(*("-" * w for w in widths), "-" * 4),
        ]
        out += [fmt.format(*line) for line in lines]
        out.append(
            f"trainable params: {self.trainable_params:,d} || all params: {self.all_params:,d} || "
            f"trainable%: {self.trainable_percent:.4f}"
        )
        if self.graph_roots:
            out.append("graph roots: " + ", ".join(r or "<model>" for r in self.graph_roots))
        if self.pending_patterns:
            out.append(
                f"call patterns: {self.traced_patterns} traced, {self.pending_patterns} more seen by the example forward pass "
                "traced when a call first meets one or torch.compile compiles"
            )
        out += [f"warning: {w}" for w in self.warnings]
        return "\n".join(out)

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython
        printer.text(str(self))


def report_from_plan(plan: Plan) -> Report:
    rows = [
        ReportRow(t.name, type(t.module).__name__, "lora", t.spec.r, t.spec.alpha, t.added_params, t.path, t.root, t.reason, t.calls)
        for t in plan.targets
    ]
    rows += [
        ReportRow(s.name, type(s.module).__name__, "modules_to_save", None, None, s.params, s.path, s.root, s.reason)
        for s in plan.saved
    ]
    rows.sort(key=lambda r: plan.order.get(r.name, 0))
    return Report(
        model_type=plan.model_type,
        adapter=plan.adapter,
        rows=tuple(rows),
        graph_roots=tuple(r.name for r in plan.roots),
        trainable_params=plan.trainable_params,
        all_params=plan.all_params,
        warnings=tuple(plan.warnings),
        traced_patterns=sum(len(r.variants) for r in plan.roots),
        pending_patterns=sum(len(r.pending) for r in plan.roots),
    )


def explain(model: nn.Module, config: LoraConfig, adapter_name: str = "default", *, trace: TracePolicy = "auto") -> Report:
    """Dry run of `fxlora.transform(model, config)`: returns a `Report`; changes nothing.

    Raises exactly the errors `transform` would raise for this model and config.
    """
    return report_from_plan(make_plan(model, config, adapter_name, trace))
