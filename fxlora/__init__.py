"""fxlora: LoRA adapters for any PyTorch model, by rewriting its torch.fx graph.

    import fxlora
    config = fxlora.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])
    print(fxlora.explain(model, config))      # dry run: what would be adapted, and how
    model = fxlora.transform(model, config)   # adapt in place, get a LoraModel
    model.print_trainable_parameters()
"""

from fxlora.config import LoraConfig
from fxlora.io.peft_format import CheckpointError
from fxlora.planning.explain import Report, explain
from fxlora.planning.matching import NoTargetFoundError, UnsupportedTargetError
from fxlora.model.lora_model import LoraModel
from fxlora.model.transform import transform

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
