"""4/8-bit LLaDA-MoE: presets, loading, memory accounting, QLoRA preparation.

Two kernel families: bitsandbytes (NF4 4-bit and LLM.int8 8-bit, CPU and GPU; QLoRA) and torch's CPU int4 kernel
(`method="int4"`, `modeling_llada_moe.int4_cpu`: inference on the CPU, no bitsandbytes needed). The experts are
stored as two flattened containers (`mlp.experts.gate_up` / `mlp.experts.down`), which both quantize; bitsandbytes
experts are dequantized one group at a time at run time, int4 experts run through the kernel directly.
"""

from modeling_llada_moe.int4_cpu import LLaDAInt4Config

from .loading import load_quantized
from .memory import MemoryReport, estimate_memory, memory_report, quantization_state_tensors
from .presets import DEFAULT_SKIP_MODULES, METHODS, bnb_config, int4_config, int8_config, nf4_config
from .qlora import check_lora_targets, prepare_for_qlora, qlora_target_modules


__all__ = [
    "DEFAULT_SKIP_MODULES",
    "LLaDAInt4Config",
    "METHODS",
    "MemoryReport",
    "bnb_config",
    "check_lora_targets",
    "estimate_memory",
    "int4_config",
    "int8_config",
    "load_quantized",
    "memory_report",
    "nf4_config",
    "prepare_for_qlora",
    "qlora_target_modules",
    "quantization_state_tensors",
]
