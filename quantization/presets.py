"""bitsandbytes presets for LLaDA-MoE: what gets quantized and how."""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig


# Never quantized: the output head and the input embeddings. The router (`mlp.gate`, an fp32 parameter, not an
# nn.Linear) and the norms are not nn.Linear, so bitsandbytes leaves them alone anyway.
DEFAULT_SKIP_MODULES = ("lm_head", "embed_tokens")
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def bnb_config(
    bits: int = 4,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    quant_type: str = "nf4",
    skip_modules: list[str] | tuple[str, ...] | None = None,
) -> BitsAndBytesConfig:
    """A `BitsAndBytesConfig` that quantizes the attention projections and every expert (plus dense / shared MLPs).

    Args:
        bits: 4 (NF4 or FP4, `quant_type`) or 8 (LLM.int8).
        compute_dtype: dtype of the 4-bit matmuls and of the dequantized experts (bf16, fp16 or fp32).
        double_quant: 4-bit only: quantize the absmax scales too (~0.37 bits/param less).
        skip_modules: extra module names to keep unquantized; they are added to `DEFAULT_SKIP_MODULES`, never
            replace them (transformers would otherwise quantize `lm_head` as soon as a list is passed).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r}: LLaDA-MoE quantization supports 4 (NF4/FP4) or 8 (LLM.int8)")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r}: expected 'nf4' or 'fp4'")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r}: expected one of {COMPUTE_DTYPES}")
    if isinstance(skip_modules, str):
        raise ValueError(f"skip_modules={skip_modules!r}: pass a list of module names, not a string")
    skip = list(dict.fromkeys([*DEFAULT_SKIP_MODULES, *(skip_modules or [])]))
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        llm_int8_skip_modules=skip,
    )


def nf4_config(compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True, **kwargs) -> BitsAndBytesConfig:
    """4-bit NF4 preset (about 4.7 GiB of weights for the 7B, 4.4 GiB with double quant)."""
    return bnb_config(4, compute_dtype=compute_dtype, double_quant=double_quant, quant_type="nf4", **kwargs)


def int8_config(**kwargs) -> BitsAndBytesConfig:
    """8-bit LLM.int8 preset (about 7.5 GiB of weights for the 7B)."""
    return bnb_config(8, **kwargs)
