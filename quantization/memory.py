"""Honest memory accounting: bytes by component, quantization state included, measured or estimated from a config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from modeling_llada_moe import LLaDAMoEConfig
from modeling_llada_moe.bnb_layout import BNB_4BIT_BLOCKSIZE
from modeling_llada_moe.int4_cpu import int4_fits

from .presets import DEFAULT_GROUP_SIZE, check_method_options, quantization_method


COMPONENTS = (
    "embeddings",
    "attention",
    "experts",
    "dense_mlp",
    "router",
    "norms",
    "lm_head",
    "quantization_state",
    "other",
)


@dataclass
class MemoryReport:
    """Bytes per component; `total` is their sum. `as_table()` renders them in MiB."""

    components: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def as_table(self) -> str:
        rows = [f"| {name} | {size / 2**20:.3f} |" for name, size in self.components.items()]
        return "\n".join(["| component | MiB |", "| --- | --- |", *rows, f"| total | {self.total / 2**20:.3f} |"])


def _component(name: str) -> str:
    """The component a parameter or buffer belongs to, from its qualified name."""
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".mlp.experts." in name:
        return "experts"
    if ".mlp.gate." in name or name.endswith(".mlp.expert_bias"):
        return "router"
    if "norm" in name:
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name or ".shared_expert." in name:
        return "dense_mlp"
    return "other"


def quantization_state_tensors(weight: torch.Tensor) -> list[torch.Tensor]:
    """The tensors bitsandbytes keeps beside a quantized weight (not parameters, so `get_memory_footprint` misses
    them): 4-bit absmax and code table (+ the nested absmax, code and offset with double quant); 8-bit row scales."""
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        tensors = [quant_state.absmax, quant_state.code]
        if quant_state.nested:
            tensors += [quant_state.state2.absmax, quant_state.state2.code, quant_state.offset]
        return tensors
    scales = getattr(weight, "SCB", None)
    return [scales] if weight.dtype == torch.int8 and scales is not None else []


def memory_report(model: nn.Module) -> MemoryReport:
    """Bytes held by `model`, by component: every parameter and buffer once (tied weights once), plus the
    bitsandbytes quantization state that lives beside quantized weights. An int4 weight (`Int4Linear`, uint8 codes)
    counts under its component and its `scales_and_zeros` under "quantization_state", as bitsandbytes' absmax."""
    report = MemoryReport()
    seen: set[int] = set()

    def add(component: str, tensor: torch.Tensor) -> None:
        if tensor is None or id(tensor) in seen:
            return
        seen.add(id(tensor))
        report.components[component] += tensor.numel() * tensor.element_size()

    for name, param in model.named_parameters():
        add("quantization_state" if name.endswith(".scales_and_zeros") else _component(name), param)
        for state in quantization_state_tensors(param):
            add("quantization_state", state)
    for name, buffer in model.named_buffers():
        add(_component(name), buffer)
    return report


def _quantized_linear_bytes(out_features: int, in_features: int, bits: int | None, dtype_bytes: int, dq: bool):
    """(weight bytes, quantization-state bytes) of one Linear weight [out, in] stored by bitsandbytes."""
    numel = out_features * in_features
    if bits is None:
        return numel * dtype_bytes, 0
    if bits == 8:
        return numel, out_features * 4  # int8 values + fp32 row scales (SCB)
    blocks = math.ceil(numel / 64)  # blocksize 64
    code = 16 * 4  # the 16-entry 4-bit code table, per weight
    if dq:  # uint8 absmax, its fp32 absmax per 256 blocks, a 256-entry code and an fp32 offset
        return math.ceil(numel / 2), blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4 + code
    return math.ceil(numel / 2), blocks * 4 + code


def _int4_linear_bytes(out_features: int, in_features: int, group_size: int) -> tuple[int, int]:
    """(weight bytes, quantization-state bytes) of one Linear weight [out, in] in the CPU int4 method: 4-bit codes,
    and a bf16 scale and zero per group of `group_size` inputs of every row."""
    return out_features * in_features // 2, out_features * (in_features // group_size) * 2 * 2


def estimate_memory(
    config: LLaDAMoEConfig,
    bits: int | None = 4,
    dtype: torch.dtype = torch.bfloat16,
    double_quant: bool | None = None,
    method: str | None = None,
    group_size: int | None = None,
) -> MemoryReport:
    """Bytes of a LLaDA-MoE loaded with `quantization.load_quantized(bits=..., method=...)` (or unquantized,
    `bits=None`) in `dtype`, computed from the config alone: it matches `memory_report` of such a model exactly.

    Quantized: attention projections, experts, dense and shared MLPs. NF4 (`double_quant` default True): those whose
    input width is a whole number of 64-value blocks, experts always. int4 (`group_size` default 64): bias-free ones
    whose input width is a whole number of groups and whose rows (per expert) are a multiple of 16; 4 bits per weight
    plus a bf16 scale and zero per group. Kept in `dtype`: embeddings, `lm_head`, norms, biases. fp32: router and
    expert bias (and everything else when `dtype` is fp32), RoPE buffers.
    """
    if isinstance(bits, bool) or bits not in (None, 4, 8):
        raise ValueError(f"bits={bits!r}: expected None (unquantized), 4 or 8")
    if bits is None:
        if method is not None or group_size is not None or double_quant:
            raise ValueError(
                f"method={method!r}, group_size={group_size!r}, double_quant={double_quant!r}: with bits=None "
                "(unquantized) leave them unset"
            )
    else:
        method = quantization_method(bits, method)
        check_method_options(method, double_quant, group_size)
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    width = torch.finfo(dtype).bits // 8
    report = MemoryReport()
    parts = report.components

    def linear(component: str, out_features: int, in_features: int, quantize: bool = True, bias: bool = False):
        if method == "int4":
            rows = out_features // config.num_experts if component == "experts" else out_features
            if quantize and not bias and int4_fits(in_features, rows, group_size):
                weight, state = _int4_linear_bytes(out_features, in_features, group_size)
            else:  # stays a plain Linear (int4_cpu.replace_with_int4_linear)
                weight, state = out_features * in_features * width, 0
        else:
            if bits == 4 and component != "experts" and in_features % BNB_4BIT_BLOCKSIZE:
                quantize = False  # rows that are not whole 4-bit blocks stay unquantized (bnb_layout)
            weight, state = _quantized_linear_bytes(out_features, in_features, bits if quantize else None, width, dq)
        parts[component] += weight + (out_features * width if bias else 0)
        parts["quantization_state"] += state

    dq = (double_quant is None or double_quant) and method == "nf4"
    hidden, head_dim = config.hidden_size, config.head_dim
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    parts["embeddings"] += config.vocab_size * hidden * width
    if not config.tie_word_embeddings:
        linear("lm_head", config.vocab_size, hidden, quantize=False)
    for layer in range(config.num_hidden_layers):
        for out_features, in_features in ((q_width, hidden), (kv_width, hidden), (kv_width, hidden), (hidden, q_width)):
            linear("attention", out_features, in_features, bias=config.attention_bias)
        parts["norms"] += 2 * hidden * width + (2 * head_dim * width if config.qk_layernorm else 0)
        if config.is_moe_layer(layer):
            experts, inner = config.num_experts, config.expert_intermediate_size
            linear("experts", experts * 2 * inner, hidden)
            linear("experts", experts * hidden, inner)
            parts["router"] += experts * hidden * 4 + (experts * 4 if config.moe_router_enable_expert_bias else 0)
        else:
            for out_features, in_features in _mlp_shapes(hidden, config.dense_intermediate_size):
                linear("dense_mlp", out_features, in_features)
        if config.shared_expert_intermediate_size is not None:
            for out_features, in_features in _mlp_shapes(hidden, config.shared_expert_intermediate_size):
                linear("dense_mlp", out_features, in_features)
    parts["norms"] += hidden * width
    rotary = int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0)) // 2
    parts["other"] += 2 * rotary * 4  # inv_freq and original_inv_freq, fp32
    return report


def _mlp_shapes(hidden: int, inner: int) -> tuple[tuple[int, int], ...]:
    return (inner, hidden), (inner, hidden), (hidden, inner)
