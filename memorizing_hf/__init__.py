"""memorizing-hf: Memorizing Transformers (kNN memory attention) for Hugging Face decoders.

Importing the package registers `MemorizingConfig` with `AutoConfig`, `MemorizingModel` with `AutoModel`,
`MemorizingForCausalLM` with `AutoModelForCausalLM`, and the memorizing attention functions with transformers'
attention interface.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import MemorizingCache
from .configuration_memorizing import MemorizingConfig
from .memory import KNNMemory, MemoryBank
from .modeling_memorizing import MemorizingForCausalLM, MemorizingModel, MemorizingPreTrainedModel

__version__ = "0.2.0"

AutoConfig.register(MemorizingConfig.model_type, MemorizingConfig, exist_ok=True)
AutoModel.register(MemorizingConfig, MemorizingModel, exist_ok=True)
AutoModelForCausalLM.register(MemorizingConfig, MemorizingForCausalLM, exist_ok=True)
MemorizingConfig.register_for_auto_class()
MemorizingModel.register_for_auto_class("AutoModel")
MemorizingForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "KNNMemory",
    "MemoryBank",
    "MemorizingCache",
    "MemorizingConfig",
    "MemorizingForCausalLM",
    "MemorizingModel",
    "MemorizingPreTrainedModel",
]
