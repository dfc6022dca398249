"""How each module of a model is really called: one small forward pass, observed.

Planning must trace a candidate graph root for a representative call. For a module called only
with tensors, the plainest call (every required parameter a tensor: `fxlora.tracing.call_keys.canonical_key`)
is representative. A transformers attention module, though, is called with keyword arguments its
signature does not reveal (rotary embeddings as a tuple, a ``Cache`` object, flags, ranks that the
code relies on), and so is a timm block (``rope=``, ``attn_mask=``). For models whose integration
can build a small input (`fxlora.tracing.integrations.TraceHooks.example_inputs`), fxlora runs it once and
records every module's call pattern (ranked, `fxlora.tracing.call_keys.call_key`): planning traces a root
for the first one and the others wait until first needed, by a call or by ``torch.compile``, which
traces them all before it traces the model (so it meets no untraced one:
`fxlora.runtime.compile_builds`); a sub-module never called is no root.

The probe changes nothing: it runs in eval mode under ``torch.no_grad()`` with the random number
generators' state saved and restored, and removes its hooks; an example the model rejects adds no
observation (with none at all, planning uses each module's plainest call).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from fxlora.kinds.quantized import eval_forward_changes_layer
from fxlora.tracing.integrations import hooks_for
from fxlora.tracing.call_keys import CallKey, call_key
from fxlora.tracing.probe_blocks import AlikeBlocks

__all__ = ["observe_calls", "quiet_forwards"]


def observe_calls(
    model: nn.Module, of: Optional[Iterable[nn.Module]] = None, share_blocks: bool = True
) -> dict[int, list[CallKey]]:
    """``{id(module): [call patterns seen, in order]}`` for forward passes of the integration's
    example inputs (eval mode, training flag False in the patterns); ``{}`` when there is no
    example input. An example the model rejects (raises on) is ignored entirely.

    With `of`, only those modules and the modules containing them are observed (what planning
    asks about: the modules to adapt and their possible graph roots); a hook on every module
    doubles the cost of the forward pass on a timm ViT. With `share_blocks`, alike blocks called
    alike compute once (`fxlora.tracing.probe_blocks.AlikeBlocks`); an example that fails so is
    run again with every block computed."""
    hooks = hooks_for(model)
    if hooks.example_inputs is None:
        return {}
    try:
        examples = hooks.example_inputs(model)
    except Exception:  # no example for this model
        return {}
    if not examples:
        return {}
    seen: dict[int, list[CallKey]] = {}
    pending: list[tuple[int, CallKey]] = []  # the calls of the example being run

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        key = call_key(False, args, kwargs, ranked=True, sized=True)
        if key is not None:
            pending.append((id(module), key))

    hooked = _observed(model, of)
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in hooked]
    alike = AlikeBlocks(model, pending, {id(m) for m in hooked}) if share_blocks else None
    try:
        with quiet_forwards(model):
            for args, kwargs in examples:
                if not _ran(model, args, kwargs, pending, alike):
                    if not (alike and alike.replayed and _ran(model, args, kwargs, pending, None)):
                        continue  # this example does not suit the model: it tells nothing
                for module_id, key in pending:
                    keys = seen.setdefault(module_id, [])
                    if key not in keys:
                        keys.append(key)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _ran(model: nn.Module, args: tuple, kwargs: dict, pending: list, alike: Optional[AlikeBlocks]) -> bool:
    """Run one example, its calls recorded afresh into `pending`; False if the model rejects it.
    With `alike`, alike blocks compute once per call (`fxlora.tracing.probe_blocks`)."""
    pending.clear()
    with alike if alike else contextlib.nullcontext():
        try:
            model(*args, **kwargs)
        except Exception:
            return False
    return True


def _observed(model: nn.Module, of: Optional[Iterable[nn.Module]]) -> list[nn.Module]:
    """`model`'s modules that are in `of` or contain one of them (all of them when `of` is None)."""
    if of is None:
        return list(model.modules())
    wanted = {id(m) for m in of}
    named = dict(model.named_modules(remove_duplicate=False))
    paths = {""}
    for name, module in named.items():
        if id(module) in wanted:
            parts = name.split(".") if name else []
            paths.update(".".join(parts[:end]) for end in range(len(parts) + 1))
    return list({id(named[p]): named[p] for p in paths if p in named}.values())  # a module under two paths: one hook


@contextlib.contextmanager
def quiet_forwards(model: nn.Module) -> Iterator[None]:
    """Forward passes that change nothing: `model` in eval mode (but for layers an eval forward
    changes, `fxlora.kinds.quantized.eval_forward_changes_layer`) under ``torch.no_grad()``, the
    random number generators' state saved and restored, every module's train/eval flag put back."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if any(flag for _, flag in flags):  # a model in eval mode already is left alone
            model.eval()
            for module, flag in flags:  # left in their mode: an eval forward would change them
                if flag and eval_forward_changes_layer(module):
                    module.training = flag
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(model)):
            yield
    finally:
        for module, flag in flags:
            if module.training != flag:
                module.training = flag


def _cuda_devices(model: nn.Module) -> list[Any]:
    return sorted({p.device.index for p in model.parameters() if p.device.type == "cuda" and p.device.index is not None})
