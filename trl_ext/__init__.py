"""TRL trainers for LLaDA-MoE: masked-diffusion SFT (and VRPO preference optimization)."""

from .sft import TRAINING_CHAT_TEMPLATE_PATH, DataCollatorForDiffusionSFT, DiffusionSFTConfig, DiffusionSFTTrainer


__all__ = [
    "TRAINING_CHAT_TEMPLATE_PATH",
    "DataCollatorForDiffusionSFT",
    "DiffusionSFTConfig",
    "DiffusionSFTTrainer",
]
