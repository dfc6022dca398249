"""fxlora: LoRA adapters for any PyTorch model, by rewriting its torch.fx graph.

    import fxlora
    config = fxlora.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])
    print(fxlora.explain(model, config))      # dry run: what would be adapted, and how
    model = fxlora.transform(model, config)   # adapt in place, get a LoraModel
    model.print_trainable_parameters()
"""

from .config import LoraConfig
from .peft_format import CheckpointError
from .explain import Report, explain
from .matching import NoTargetFoundError, UnsupportedTargetError
from .model import LoraModel
from .transform import transform

__all__ = [
    "LoraConfig",
    "LoraModel",
    "Report",
    "explain",
    "transform",
    "NoTargetFoundError",
    "UnsupportedTargetError",
    "CheckpointError",
]

__version__ = "0.1.0"
