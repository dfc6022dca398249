"""The planning warnings about adapters that may have no effect, said only as far as fxlora knows.

What fxlora can know about how a target is used, and what each warning says (one warning per
kind, naming every target it concerns):

- A traced graph of one of its ancestors uses the target's weight in ``F.linear(x, weight, bias)``
  instead of calling it (timm's beit / eva / swinv2 attentions: ``F.linear(x, self.qkv.weight,
  qkv_bias)``). The graph calls the target there instead (`fxlora.passes.weight_reads`), so the
  adapter acts in that graph's code; where the graph root is not the target's parent, a call of
  the parent's own forward from elsewhere (another entry point of the model, such as timm's
  ``forward_features``) still reads the weight, and computes without the adapter.
- A traced graph of one of its ancestors uses the target's weights otherwise and never calls it
  (torchvision's Swin hands ``self.qkv.weight`` to its opaque ``shifted_window_attention``). The
  target then takes the eager path, whose forward the parent never runs either: its adapter has
  no effect, on either path. (Parents fxlora knows to do this without tracing them, such as
  ``nn.MultiheadAttention`` or Mamba's fused kernels, are refused at matching instead:
  `fxlora.planning.target_checks`.)
- The forward fxlora ran on an example input (`fxlora.tracing.probe`) never called the target:
  that forward did not reach it, whichever path it takes. Other inputs may.
- A graph root fxlora traced for its plainest call (its required arguments only, no example
  input to observe) does not call the target: calls with other arguments are traced when they
  come (SD3's joint attention calls ``add_q_proj`` only when given ``encoder_hidden_states``), so
  the adapter acts in the calls that reach it.

Where fxlora knows none of these (``trace='eager'``, or a parent that does not trace for another
reason), it says nothing.
"""

from __future__ import annotations

from typing import Iterable, Optional, Protocol

__all__ = ["call_notes"]


class _Placed(Protocol):
    name: str
    path: str
    root: Optional[str]
    calls: int
    weight_read: bool
    linear_reads: int
    probed: Optional[bool]
    planned_for: str


def _names(targets: list[_Placed]) -> str:
    shown = ", ".join(t.name for t in targets[:4])
    return shown + (f", ... ({len(targets)} layers)" if len(targets) > 4 else "")


def call_notes(targets: Iterable[_Placed]) -> list[str]:
    """The warnings for adapted modules whose adapter may not act (see the module docstring)."""
    targets = list(targets)
    read = [t for t in targets if t.path == "eager" and t.weight_read]
    called_instead = [t for t in targets if t.path == "graph" and t.linear_reads and t.root != t.name.rpartition(".")[0]]
    unprobed = [t for t in targets if t not in read and not t.linear_reads and t.probed is False]
    unreached = [t for t in targets if t.path == "graph" and t.calls == 0 and t.planned_for == "plainest" and t not in unprobed]
    notes = []
    if read:
        notes.append(
            f"{_names(read)}: the parent reads the weight directly instead of calling the module, so a LoRA "
            "adapter on it has no effect (PEFT's neither); adapt another layer or change how the parent computes"
        )
    if called_instead:
        roots = sorted({t.root or "<model>" for t in called_instead})
        notes.append(
            f"{_names(called_instead)}: the parent uses the weight instead of calling the module (F.linear, or passing "
            f"it to other code); fxlora's code for {', '.join(roots)} calls the module there, or hands that code the "
            f"adapted weight, so the adapter acts when {', '.join(roots)} "
            "runs, but not where the parent's own forward is called from elsewhere (another entry point, such as "
            "timm's forward_features)"
        )
    if unprobed:
        notes.append(
            f"{_names(unprobed)}: not called in the forward fxlora ran on an example input; an adapter acts only "
            "in forwards that call its module (if the parent reads its weight instead, it never acts)"
        )
    if unreached:
        roots = sorted({t.root or "<model>" for t in unreached})
        notes.append(
            f"{_names(unreached)}: not reached when {', '.join(roots)} is called with its required arguments "
            "only (the call fxlora traced; calls with other arguments are traced when they come): its adapter "
            "acts only in calls that reach it"
        )
    return notes
