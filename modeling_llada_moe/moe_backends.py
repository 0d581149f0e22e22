"""Experts backends that need no kernels of their own: the fused Triton path (`fused_moe.py`) falls back to these,
and `modeling_llada_moe.py` registers them, so neither imports the other for them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations.moe import grouped_mm_experts_forward

from .int4_cpu import Int4Linear, int4_experts_forward


def grouped_mm_chunked_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Quantized experts: one expert at a time, only the experts tokens route to, each dequantized when it runs or
    taken from the generation's `expert_cache` (used in place: no copy into a stack). Plain weights: transformers'
    `grouped_mm` over the views."""
    if not self.is_quantized:
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if isinstance(self.gate_up, Int4Linear) and isinstance(self.down, Int4Linear) and self.weight_delta is None:
        return int4_experts_forward(self, hidden_states, top_k_index, top_k_weights)  # the CPU int4 kernel
    output = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    # Under expert parallelism a route to another rank's expert arrives as id `num_experts`: never computed here.
    for index in torch.unique(top_k_index).tolist():
        if index >= self.num_experts:
            continue
        token, slot = (top_k_index == index).nonzero(as_tuple=True)
        gate_up, down = self.dense_expert(index, hidden_states.dtype)
        gate, up = F.linear(hidden_states[token], gate_up).chunk(2, dim=-1)
        routed = F.linear(self.act_fn(gate) * up, down) * top_k_weights[token, slot, None]
        output.index_add_(0, token, routed.float())
    return output.to(hidden_states.dtype)
