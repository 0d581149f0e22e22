"""TRL trainers for LLaDA-MoE: masked-diffusion SFT, VRPO preference optimization (LLaDA 1.5) and online RL (GRPO
with the d1, coupled and ELBO likelihood estimators).

All use the forward process of `modeling_llada_moe.forward_process` (t sampling, masking, ELBO forms).
"""

from .grpo import DiffusionGRPOConfig, DiffusionGRPOTrainer
from .sft import TRAINING_CHAT_TEMPLATE_PATH, DataCollatorForDiffusionSFT, DiffusionSFTConfig, DiffusionSFTTrainer
from .vrpo import VRPOConfig, VRPOTrainer


__all__ = [
    "TRAINING_CHAT_TEMPLATE_PATH",
    "DataCollatorForDiffusionSFT",
    "DiffusionGRPOConfig",
    "DiffusionGRPOTrainer",
    "DiffusionSFTConfig",
    "DiffusionSFTTrainer",
    "VRPOConfig",
    "VRPOTrainer",
]
