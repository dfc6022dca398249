"""The signature ``LoraModel.forward`` shows: the wrapped model's own, plus fxlora's ``adapter_names``.

Tools read a model's inputs from ``inspect.signature(model.forward)``: transformers' ``Trainer``
keeps only the dataset columns named there (``remove_unused_columns``, the default) and passes loss
keywords only to a forward with ``**kwargs``. The wrapper's own forward is ``(*args,
adapter_names=None, **kwargs)``, which names no input; so each `LoraModel` gets, as its
``forward`` attribute, its class forward bound to it under the wrapped model's signature. The
call itself is unchanged: it is the class forward.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Optional

import torch.nn as nn

__all__ = ["forward_signature", "signed_forward"]

_ADAPTER_NAMES = inspect.Parameter(
    "adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[list[str]]
)


def forward_signature(model: nn.Module) -> Optional[inspect.Signature]:
    """``model.forward``'s signature with the keyword-only ``adapter_names=None`` added before any
    ``**kwargs`` (a parameter of the model's own called ``adapter_names`` gives way to it: the
    wrapper consumes that keyword). None where inspect cannot read ``model.forward``'s signature.

    Read it before fxlora installs its forwards on `model` (they take ``*args, **kwargs``)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    params = [p for p in signature.parameters.values() if p.name != _ADAPTER_NAMES.name]
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    params.insert(at, _ADAPTER_NAMES)
    return signature.replace(parameters=params)


def signed_forward(forward: Callable[..., Any], owner: nn.Module, signature: inspect.Signature) -> functools.partial:
    """``forward`` bound to `owner` (a partial, as accelerate's hooks bind theirs, which
    torch.compile follows), showing `signature` to ``inspect.signature``."""
    bound = functools.partial(forward, owner)
    bound.__signature__ = signature  # type: ignore[attr-defined]
    bound.__doc__ = forward.__doc__
    return bound
