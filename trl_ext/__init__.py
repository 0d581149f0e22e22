"""TRL trainers for LLaDA-MoE: masked-diffusion SFT and VRPO preference optimization (LLaDA 1.5).

Both use the forward process of `modeling_llada_moe.forward_process` (t sampling, masking, ELBO forms).
"""

from .sft import TRAINING_CHAT_TEMPLATE_PATH, DataCollatorForDiffusionSFT, DiffusionSFTConfig, DiffusionSFTTrainer
from .vrpo import VRPOConfig, VRPOTrainer


__all__ = [
    "TRAINING_CHAT_TEMPLATE_PATH",
    "DataCollatorForDiffusionSFT",
    "DiffusionSFTConfig",
    "DiffusionSFTTrainer",
    "VRPOConfig",
    "VRPOTrainer",
]
