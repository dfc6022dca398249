"""What a graph pass is: a rewrite with executable contracts.

A `Pass` states what it needs of a graph (`Pass.requires`) and what it guarantees once it ran
(`Pass.ensures`) as code that raises `PassContractError`, naming the pass and the condition, and
rewrites the graph in `Pass.run`, which returns a `PassResult`. Calling a pass runs it; with
``check=True`` (or the environment variable ``FXLORA_CHECK_PASSES=1``, which the test suite sets)
the contracts are checked around the run. They are off by default: graph code is rebuilt whenever
adapters change, and the checks walk the graph several times.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch.fx as fx
import torch.nn as nn

from fxlora.errors import PassContractError
from fxlora.core.gates import EagerKey
from fxlora.passes.options import PassOptions

__all__ = ["CHECK_ENV", "PassContext", "PassResult", "Pass", "checks_enabled"]

#: environment variable that turns contract checks on for every pass run (``1``)
CHECK_ENV = "FXLORA_CHECK_PASSES"


def checks_enabled() -> bool:
    """Whether passes check their contracts by default (``FXLORA_CHECK_PASSES=1``)."""
    return os.environ.get(CHECK_ENV, "") not in ("", "0")


@dataclass(frozen=True)
class PassContext:
    """What the code being built is for. ``eager`` is the `fxlora.core.gates.EagerKey` of eager code
    (the live adapters, the chosen copies; a mixed batch has no ``chosen``), None in gated code
    (what ``torch.compile`` sees). ``training`` is the mode the graph was traced in."""

    options: PassOptions = field(default_factory=PassOptions)
    eager: Optional[EagerKey] = None
    training: bool = True

    @property
    def gated(self) -> bool:
        """Gated code: every adapter's gate is read from the call's gate tensors at run time."""
        return self.eager is None

    @property
    def chosen(self) -> Optional[tuple[str, ...]]:
        """The adapters whose `modules_to_save` copies eager code calls (None: the gates select)."""
        return None if self.eager is None else self.eager.chosen

    @classmethod
    def of(cls, options: Optional[PassOptions], eager: Optional[EagerKey], training: bool) -> "PassContext":
        """The context `fxlora.passes.rewrite` is called for."""
        return cls(PassOptions() if options is None else options, eager, training)


@dataclass(frozen=True)
class PassResult:
    """What a pass changed: ``sites`` holds the path of the module of each change, in graph order
    (a layer called twice appears twice)."""

    name: str
    sites: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return len(self.sites)


class Pass:
    """A graph rewrite with contracts. Subclasses set `name` and override `run`, and state in
    `requires` / `ensures` what they need and guarantee, failing through `check`."""

    name: ClassVar[str] = "pass"

    def requires(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        """Raise `PassContractError` unless `graph` is fit for this pass."""

    def run(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> PassResult:
        """Rewrite `graph` in place."""
        raise NotImplementedError

    def ensures(self, graph: fx.Graph, root: nn.Module, ctx: PassContext) -> None:
        """Raise `PassContractError` unless `graph` holds what this pass guarantees."""

    def __call__(self, graph: fx.Graph, root: nn.Module, ctx: PassContext, check: Optional[bool] = None) -> PassResult:
        """Run the pass; check its contracts around the run when `check` (default: `checks_enabled`)."""
        check = checks_enabled() if check is None else check
        if check:
            self.requires(graph, root, ctx)
        result = self.run(graph, root, ctx)
        if check:
            self.ensures(graph, root, ctx)
        return result

    def check(self, clause: str, condition: str, offender: Optional[fx.Node]) -> None:
        """Raise `PassContractError` for `condition` (of ``"requires"`` or ``"ensures"``) when
        `offender`, the first node found violating it, is not None."""
        if offender is not None:
            raise PassContractError(self.name, clause, condition, offender)

    def __repr__(self) -> str:
        return f"<pass {self.name}>"
