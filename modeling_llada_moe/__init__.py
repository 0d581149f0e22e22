"""LLaDA-MoE for transformers: config, model, and Auto-class registration on import."""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration_llada_moe import LLaDAMoEConfig
from .generation_cache import DiffusionBlockCache
from .generation_config import DiffusionGenerationConfig
from .generation_utils import DiffusionGenerateOutput
from .modeling_llada_moe import (
    LLaDAMoEForMaskedLM,
    LLaDAMoEMaskedLMOutput,
    LLaDAMoEModel,
    LLaDAMoEModelLM,
    LLaDAMoEPreTrainedModel,
)


AutoConfig.register(LLaDAMoEConfig.model_type, LLaDAMoEConfig, exist_ok=True)
# The official model card loads the LM through `AutoModel`, so AutoModel maps to the masked-LM class.
AutoModel.register(LLaDAMoEConfig, LLaDAMoEForMaskedLM, exist_ok=True)
AutoModelForMaskedLM.register(LLaDAMoEConfig, LLaDAMoEForMaskedLM, exist_ok=True)

__all__ = [
    "DiffusionBlockCache",
    "DiffusionGenerateOutput",
    "DiffusionGenerationConfig",
    "LLaDAMoEConfig",
    "LLaDAMoEForMaskedLM",
    "LLaDAMoEMaskedLMOutput",
    "LLaDAMoEModel",
    "LLaDAMoEModelLM",
    "LLaDAMoEPreTrainedModel",
]
