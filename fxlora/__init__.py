"""fxlora: LoRA adapters for any PyTorch model, by rewriting its torch.fx graph.

    import fxlora
    config = fxlora.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])
    print(fxlora.explain(model, config))      # dry run: what would be adapted, and how
    model = fxlora.transform(model, config)   # adapt in place, get a LoraModel
    model.print_trainable_parameters()
"""

from fxlora.config import CordaConfig, EvaConfig, LoftQConfig, LoraConfig
from fxlora.errors import (
    CheckpointError,
    MergeError,
    NoTargetFoundError,
    PassContractError,
    TraceFailure,
    UnsupportedFieldError,
    UnsupportedTargetError,
    VariantError,
)
from fxlora.model.corda import preprocess_corda
from fxlora.model.eva import get_eva_state_dict, initialize_lora_eva_weights
from fxlora.model.lora_model import LoraModel
from fxlora.model.peft_functions import (
    get_layer_status,
    get_model_status,
    get_peft_model_state_dict,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
    inject_adapter_in_model,
    prepare_model_for_compiled_hotswap,
    set_peft_model_state_dict,
)
from fxlora.model.transform import transform
from fxlora.planning.explain import Report, explain

__all__ = [
    "LoraConfig",
    "LoftQConfig",
    "CordaConfig",
    "preprocess_corda",
    "EvaConfig",
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "LoraModel",
    "Report",
    "explain",
    "transform",
    "get_peft_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "set_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_compiled_hotswap",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "NoTargetFoundError",
    "UnsupportedTargetError",
    "CheckpointError",
    "MergeError",
    "PassContractError",
    "TraceFailure",
    "UnsupportedFieldError",
    "VariantError",
]

__version__ = "0.1.0"
