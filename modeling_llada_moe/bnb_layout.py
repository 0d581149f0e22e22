"""bitsandbytes 4-bit weights as this package reads, runs and saves them, with the same result on every CPU.

Two behaviours of bitsandbytes 0.50 on CPU make its 4-bit results depend on the host:

- On CPUs with AVX512-BF16, the first inference forward of a `Linear4bit` rewrites its weight in place into a
  CPU-only layout (`quant_state.packing_format_for_cpu`): rows interleaved in tiles of 32, absmax transposed to
  [in / blocksize, out] and cast to bf16, double quantization undone. It needs whole blocks per row, and saving
  afterwards writes a transposed absmax when double quantization is off (bitsandbytes#2078).
- On CPUs with AVX512F, its native `dequantize_4bit` of a 2-D shape looks absmax up per row, so a weight whose rows
  are not a whole number of quantization blocks comes out mis-scaled; the same bytes dequantized as one flat row are
  right everywhere.

So the model keeps bitsandbytes on its standard layout (`use_portable_4bit_path`), leaves 4-bit `Linear`s whose
width is not whole blocks unquantized (`linears_4bit_cannot_take`), reads container rows through a flat dequantize,
and reads or restores the CPU layout itself wherever one turns up (`dequantize_4bit_rows`, `restore_standard_layout`).
bitsandbytes is imported only when a 4-bit weight exists.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from torch import nn
from transformers.utils import logging


logger = logging.get_logger(__name__)

CPU_TILE_ROWS = 32  # rows interleaved together by bitsandbytes' CPU layout (its `block_n`)
BNB_4BIT_BLOCKSIZE = 64  # bitsandbytes' 4-bit blocksize on CPU and CUDA (transformers does not change it)
# Expert containers are read only by this package (flat dequantize, fused kernels), never by Linear4bit.forward.
EXPERT_CONTAINERS = (".mlp.experts.gate_up", ".mlp.experts.down")


def is_cpu_packed(weight: torch.Tensor) -> bool:
    """True when `weight` is a 4-bit weight bitsandbytes has rewritten into its AVX512-BF16 CPU layout."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def _linears_4bit(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    bnb = sys.modules.get("bitsandbytes")  # a Linear4bit exists only once bitsandbytes is imported
    if bnb is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            yield name, module


def flat_absmax(quant_state) -> torch.Tensor:
    """The fp32 absmax of every quantization block, in the standard layout's block order (double quant decoded)."""
    if quant_state.nested:
        import bitsandbytes.functional as bnb_functional

        absmax = bnb_functional.dequantize_blockwise(quant_state.absmax, quant_state.state2)
        return (absmax + quant_state.offset).float()
    return quant_state.absmax.float()


def _packed_nibbles(data: torch.Tensor, rows: int, cols: int, first_tile: int, last_tile: int) -> torch.Tensor:
    """The 4-bit codes [tiles * 32, cols] of row tiles [first_tile, last_tile) of a weight in the CPU layout.

    The layout (bitsandbytes' `_convert_weight_packed_for_cpu`): for each tile of 32 rows and each pair of columns
    (2p, 2p + 1), 32 bytes whose low nibbles hold rows 0-15 and whose high nibbles hold rows 16-31, each row's two
    columns side by side."""
    half = cols // 2
    tiles = data.view(torch.uint8).reshape(rows // CPU_TILE_ROWS, half, CPU_TILE_ROWS)[first_tile:last_tile]
    codes = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)  # [t, cols/2, 64]: (row, column of the pair) pairs
    codes = codes.reshape(-1, half, CPU_TILE_ROWS, 2).transpose(1, 2)  # [t, 32, cols/2, 2]
    return codes.reshape(-1, cols)


def _dequantize_packed_rows(weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    state = weight.quant_state
    rows, cols = state.shape
    first_tile, last_tile = start // CPU_TILE_ROWS, -(-end // CPU_TILE_ROWS)
    codes = _packed_nibbles(weight.data, rows, cols, first_tile, last_tile).long()
    offset = first_tile * CPU_TILE_ROWS
    codes = codes[start - offset : end - offset]
    # absmax is [cols / blocksize, rows] (transposed, bf16): one scale per (row, block of columns).
    scales = state.absmax[:, start:end].float().t().repeat_interleave(state.blocksize, dim=1)
    return state.code.float()[codes] * scales


def dequantize_4bit_rows(weight: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, end) of a bitsandbytes 4-bit weight (a `Params4bit` of logical shape [rows, cols]) as dense
    `dtype`, from the standard layout (the row range must not split a quantization block) or the CPU layout."""
    state = weight.quant_state
    rows, cols = state.shape
    if not 0 <= start <= end <= rows:
        raise ValueError(f"rows [{start}, {end}) are outside a 4-bit weight of shape {tuple(state.shape)}")
    if is_cpu_packed(weight):
        return _dequantize_packed_rows(weight, start, end).to(dtype)
    import bitsandbytes.functional as bnb_functional

    blocksize = state.blocksize
    first, last = start * cols, end * cols
    if first % blocksize or last % blocksize:
        raise ValueError(f"rows [{start}, {end}) of a {tuple(state.shape)} weight split a 4-bit block")
    # One flat row of (end - start) * cols values: dequantized right on every CPU, whatever the row width.
    rows_state = bnb_functional.QuantState(
        absmax=flat_absmax(state)[first // blocksize : last // blocksize],
        shape=torch.Size([last - first]),
        code=state.code,
        blocksize=blocksize,
        quant_type=state.quant_type,
        dtype=dtype,
    )
    packed = weight.data.view(torch.uint8).reshape(-1)[first // 2 : last // 2].reshape(-1, 1)
    return bnb_functional.dequantize_4bit(packed, rows_state).reshape(end - start, cols).to(dtype)


def restore_standard_layout(weight: torch.Tensor) -> None:
    """Rewrite a 4-bit weight in the CPU layout back into bitsandbytes' standard layout, in place, holding exactly
    the values it computes with (its bf16 absmax); double quantization is applied again if it was on."""
    state = weight.quant_state
    rows, cols = state.shape
    codes = _packed_nibbles(weight.data, rows, cols, 0, rows // CPU_TILE_ROWS).reshape(-1)
    packed = ((codes[0::2] << 4) | codes[1::2]).to(torch.uint8)
    absmax = state.absmax.float().t().reshape(-1)
    storage = getattr(state, "original_storage_type", None) or torch.uint8
    weight.data = packed.reshape(state.original_qshape).view(storage)
    if state.original_nested:
        import bitsandbytes.functional as bnb_functional

        offset = absmax.mean()
        state.absmax, state.state2 = bnb_functional.quantize_blockwise(absmax - offset, blocksize=256)
        state.offset, state.nested = offset, True
    else:
        state.absmax = absmax
    state.dtype = state.original_dtype
    state.packing_format_for_cpu = False


def use_portable_4bit_path(model: nn.Module, *args) -> None:
    """Forward pre-hook: keep every `Linear4bit` of `model` on bitsandbytes' standard layout (no AVX512-BF16 CPU
    repacking), so results, saves and memory accounting are the same on every host."""
    for _, module in _linears_4bit(model):
        module.support_avx512bf16_for_cpu = False


def restore_before_saving(model: nn.Module, *args) -> None:
    """State-dict pre-hook: bring any weight found in the CPU layout back to the standard one before it is
    written (bitsandbytes' own inverse writes a transposed absmax without double quantization)."""
    for _, module in _linears_4bit(model):
        if is_cpu_packed(module.weight):
            restore_standard_layout(module.weight)


def linears_4bit_cannot_take(model: nn.Module, blocksize: int = BNB_4BIT_BLOCKSIZE) -> list[str]:
    """The names of the plain `nn.Linear` modules of `model` that would run bitsandbytes' own 4-bit forward but whose
    input width is not a whole number of quantization blocks: its CPU kernels mis-scale (AVX512F) or reject
    (AVX512-BF16) them, so they stay unquantized. Expert containers are read flat by this package, never listed."""
    names = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module.in_features % blocksize and not name.endswith(EXPERT_CONTAINERS):
            logger.warning_once(
                f"{name}: in_features={module.in_features} is not a multiple of the 4-bit blocksize {blocksize}; it "
                "stays unquantized (bitsandbytes' CPU 4-bit kernels mis-scale or reject such rows)"
            )
            names.append(name)
    return names


def wants_4bit(config) -> bool:
    """True when `config` carries a bitsandbytes 4-bit quantization config (object or saved dict)."""
    quantization = getattr(config, "quantization_config", None)
    if isinstance(quantization, dict):
        return bool(quantization.get("load_in_4bit")) and quantization.get("quant_method", "bitsandbytes") == (
            "bitsandbytes"
        )
    return bool(getattr(quantization, "load_in_4bit", False))
