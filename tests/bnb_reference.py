"""A plain-torch reading of bitsandbytes' standard 4-bit layout, independent of its native kernels (whose AVX512
dequantize mis-scales rows that are not whole quantization blocks), for the tests' expected values."""

import torch


def reference_dequantize_4bit(weight: torch.Tensor, absmax_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float32 [rows, cols] a standard-layout `Params4bit` holds: byte i carries values 2i (high nibble) and
    2i + 1 (low nibble) of the flattened weight; value j is code[nibble] * absmax[j // blocksize]. `absmax_dtype`
    rounds the (decoded) absmax first, as bitsandbytes' CPU layout does with bf16."""
    state = weight.quant_state
    data = weight.data.view(torch.uint8).reshape(-1)
    codes = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1).long()
    absmax = state.absmax.float()
    if state.nested:
        nested = state.state2
        absmax = nested.code.float()[state.absmax.long()]
        absmax = absmax * nested.absmax.float().repeat_interleave(nested.blocksize)[: absmax.numel()] + state.offset
    scales = absmax.to(absmax_dtype).float().repeat_interleave(state.blocksize)[: codes.numel()]
    return (state.code.float()[codes] * scales).reshape(tuple(state.shape))
