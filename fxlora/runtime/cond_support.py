"""Whether ``torch.cond`` may run inside a compiled frame that also updates Python objects.

On torch 2.14.1, dynamo silently drops every attribute update made after a ``torch.cond`` to an
object that the same compiled frame already updated before the cond::

    def forward(self, x):           # compiled
        self.calls += 1
        y = torch.cond(x.sum() > 0, f, g, (x,))
        self.calls += 10            # lost: calls ends at 1 (eager: 11)

A new attribute stored that way is missing when it is read back (``AttributeError``). fxlora's
two conds run inside frames of code fxlora does not own: the base-only code of compiled inference
(`fxlora.runtime.idle`) and the per-layer cond of the opt-in ``guard_idle``. A graph root sits in
its caller's frame (a user's module that counts its calls, or a transformers decoder whose cache
sets up its layers lazily), so on such a torch the cond would make correct code wrong. fxlora uses
it only where `cond_keeps_state` holds: on torch releases from `KEEPS_STATE_FROM` (none known so
far). ``tests/runtime/test_cond_support.py`` runs the example above on the installed torch and
fails when a torch keeps the updates, so the bound is moved only on that evidence.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["KEEPS_STATE_FROM", "cond_keeps_state", "COND_DROPS_STATE"]

#: the first torch release (major, minor) whose dynamo keeps those updates; None: none known
KEEPS_STATE_FROM: Optional[tuple[int, int]] = None

#: why fxlora does not use ``torch.cond`` on this torch (for errors)
COND_DROPS_STATE = (
    f"torch {torch.__version__}'s torch.compile silently drops attribute updates made after a "
    "torch.cond to objects the compiled frame updated before it (see fxlora.runtime.cond_support)"
)


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def cond_keeps_state(version: str = torch.__version__) -> bool:
    """True when a compiled frame's attribute updates survive a ``torch.cond`` in it on torch
    `version` (see the module docstring)."""
    return KEEPS_STATE_FROM is not None and _release(version) >= KEEPS_STATE_FROM
