"""Quantization presets for LLaDA-MoE: what gets quantized and how, by bitsandbytes (NF4 / FP4, LLM.int8) or by
torch's CPU int4 kernel (`modeling_llada_moe.int4_cpu`)."""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

from modeling_llada_moe.int4_cpu import GROUP_SIZES, LLaDAInt4Config


# Never quantized: the output head and the input embeddings. The router (`mlp.gate`, an fp32 parameter, not an
# nn.Linear) and the norms are not nn.Linear, so bitsandbytes leaves them alone anyway.
DEFAULT_SKIP_MODULES = ("lm_head", "embed_tokens")
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The kernel family of each method, by the bit width it stores: bitsandbytes NF4 and LLM.int8, torch's CPU int4.
METHODS = {"nf4": 4, "int4": 4, "int8": 8}
DEFAULT_METHOD = {4: "nf4", 8: "int8"}
DEFAULT_GROUP_SIZE = 64


def quantization_method(bits: int, method: str | None) -> str:
    """The method `bits` and `method` ask for ("nf4", "int4" or "int8"; `method=None` is bits' default), or a
    ValueError naming the argument, its value and what is accepted."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in DEFAULT_METHOD:
        raise ValueError(f"bits={bits!r}: expected 4 (NF4 or int4) or 8 (LLM.int8)")
    if method is None:
        return DEFAULT_METHOD[bits]
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(
            f"method={method!r}: expected one of {sorted(METHODS)} (or None: 'nf4' for 4 bits, 'int8' for 8)"
        )
    if METHODS[method] != bits:
        accepted = [name for name, width in METHODS.items() if width == bits]
        raise ValueError(
            f"method={method!r} stores {METHODS[method]}-bit weights, not bits={bits}; with bits={bits} "
            f"use method in {accepted}"
        )
    return method


def check_method_options(method: str, double_quant: bool | None, group_size: int | None) -> None:
    """`double_quant` is NF4's (bitsandbytes' nested absmax) and `group_size` int4's: given to another method, a
    ValueError rather than ignored."""
    if method == "int4" and double_quant is not None:
        raise ValueError(
            f"double_quant={double_quant!r} applies to method='nf4' only (bitsandbytes' nested absmax); method='int4' "
            "keeps one bf16 scale and zero per group: leave double_quant unset"
        )
    if method != "int4" and group_size is not None:
        raise ValueError(
            f"group_size={group_size!r} applies to method='int4' only; method={method!r} (bitsandbytes) has fixed "
            "blocks: leave group_size unset"
        )


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


def int4_config(
    group_size: int = DEFAULT_GROUP_SIZE, skip_modules: list[str] | tuple[str, ...] | None = None
) -> LLaDAInt4Config:
    """CPU int4 preset (torch's `_weight_int4pack_mm_for_cpu`): attention projections, experts and dense / shared MLPs
    at 4 bits per weight plus a bf16 scale and zero per `group_size` input features (32, 64, 128 or 256).

    A Linear whose input width is not a whole number of groups, or whose rows (per expert) are not a multiple of 16,
    stays in the model's dtype (with a warning). `skip_modules` are kept too, besides `lm_head` and the embeddings.
    """
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r}: expected one of {GROUP_SIZES}")
    if isinstance(skip_modules, str):
        raise ValueError(f"skip_modules={skip_modules!r}: pass a list of module names, not a string")
    return LLaDAInt4Config(group_size=group_size, modules_to_not_convert=list(dict.fromkeys(skip_modules or [])))
