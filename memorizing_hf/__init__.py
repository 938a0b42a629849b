"""memorizing-hf: Memorizing Transformers (kNN memory attention) for Hugging Face decoders.

Importing the package registers `MemorizingConfig` / `MemorizingForCausalLM` with `AutoConfig` and
`AutoModelForCausalLM`, and the memorizing attention functions with transformers' attention interface.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_memorizing import MemorizingConfig
from .memory import KNNMemory, MemoryBank
from .modeling_memorizing import MemorizingForCausalLM, MemorizingPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(MemorizingConfig.model_type, MemorizingConfig, exist_ok=True)
AutoModelForCausalLM.register(MemorizingConfig, MemorizingForCausalLM, exist_ok=True)
MemorizingConfig.register_for_auto_class()
MemorizingForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["KNNMemory", "MemoryBank", "MemorizingConfig", "MemorizingForCausalLM", "MemorizingPreTrainedModel"]
