"""Layer kinds: the one place that knows which layer types fxlora adapts, and how.

A *kind* owns everything that depends on a layer's type: the shapes of an adapter's factors (for
the adapter file and the parameter count), making and initialising them, the update the branch
computes, the weight delta a merge folds in, the matrix view `add_weighted_adapter` combines, and
what each of these cannot do (a grouped convolution cannot take a merge, ...). The rest of fxlora
asks the kind of a layer (`kind_of`), never its type.

Built in: ``linear`` (``nn.Linear``, transformers ``Conv1D``), ``quantized_linear`` (torchao- or
bitsandbytes-quantized linear layers, `fxlora.kinds.quantized`), ``conv`` (``nn.Conv1d/2d/3d``),
``embedding`` (``nn.Embedding``), ``conv_transpose`` (``nn.ConvTranspose1d/2d/3d``),
``multihead_attention`` (``nn.MultiheadAttention``, whose kind computes the adapted call itself). A new kind is
one class that satisfies `LayerKind`, registered with `register_kind`. A subclass with its own
forward that is linear in its weight is declared with `declare_linear_forward` (`fxlora.kinds.subclasses`).

The matrix view (`Factors`): whatever a kind stores, an adapter of rank r on a layer is two
matrices, A of shape (r, fan_in) and B of shape (fan_out, r_B), with ``B @ A`` the update as an
(fan_out, fan_in) matrix (fan_in takes in the kernel: in_channels * prod(kernel_size)); r_B = r
except where a grouped B holds r / groups columns per output.
"""

from fxlora.kinds.registry import *  # noqa: F401,F403  (the protocol and the registry are the package's API)
from fxlora.kinds.registry import __all__ as _registry_all
from fxlora.kinds.subclasses import declare_linear_forward

__all__ = [*_registry_all, "declare_linear_forward"]

# the built-in kinds register themselves on import, in this order (`kind_of` asks them in turn)
from fxlora.kinds import linear, quantized_linear, conv, embedding, conv_transpose, multihead_attention, parameter  # noqa: E402,F401  # isort: skip
