"""4/8-bit LLaDA-MoE with bitsandbytes: presets, loading, memory accounting, QLoRA preparation.

The experts are stored as plain `nn.Linear` containers (`mlp.experts.gate_up` / `mlp.experts.down`), the layout
bitsandbytes quantizes; at run time they are dequantized one group of experts at a time.
"""

from .loading import load_quantized
from .memory import MemoryReport, estimate_memory, memory_report, quantization_state_tensors
from .presets import DEFAULT_SKIP_MODULES, bnb_config, int8_config, nf4_config
from .qlora import check_lora_targets, prepare_for_qlora, qlora_target_modules


__all__ = [
    "DEFAULT_SKIP_MODULES",
    "MemoryReport",
    "bnb_config",
    "check_lora_targets",
    "estimate_memory",
    "int8_config",
    "load_quantized",
    "memory_report",
    "nf4_config",
    "prepare_for_qlora",
    "qlora_target_modules",
    "quantization_state_tensors",
]
