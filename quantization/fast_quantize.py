"""Fast, bit-exact bitsandbytes 4-bit quantization on CPU, for loading the 7B checkpoint in NF4 / FP4.

Loading the official checkpoint in 4 bits quantizes 6.4B expert values on the fly. On CPU, bitsandbytes 0.50
quantizes with its generic torch implementation: a float32 copy of the whole tensor, a full-size scaled copy, then
`torch.bucketize` against the 15 code midpoints; on this project's 2-core machine that is about 0.02 billion values
per second per core, so quantizing is nearly all of a 4-bit load (see `benchmarks/scale.py`) and the full-size
float32 temporaries are most of its peak memory.

`fast_4bit_quantization()` replaces bitsandbytes' CPU `quantize_4bit` op, only while the context is open, with a
kernel that gives the same bytes and the same absmax (tested against bitsandbytes' op): the tensor is processed
`CHUNK_BLOCKS` quantization blocks at a time (no full-size temporaries), and the code of a value is the count of
midpoints below it (15 comparisons that `torch.compile` fuses with the block maximum and the packing into one loop).
Without a working compiler the same function runs eagerly, still chunked.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator

import torch
from transformers.utils import logging


logger = logging.get_logger(__name__)

CHUNK_BLOCKS = 65536  # quantization blocks per kernel call: 4M values at blocksize 64 (few calls, small temporaries)


def code_book(quant_type: str) -> torch.Tensor:
    """bitsandbytes' 16 code values of `quant_type`, float32."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type={quant_type!r}: expected 'nf4' or 'fp4'")
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.get_4bit_type(quant_type, device="cpu").float()


@functools.cache
def midpoints(quant_type: str) -> tuple[list[float], list[int] | None]:
    """The 15 midpoints between consecutive code values (float32 numbers) and, when the code book is not sorted
    (FP4), the code index of each rank."""
    code = code_book(quant_type)
    order = torch.argsort(code)
    ordered = code[order]
    order = order.tolist()
    return ((ordered[:-1] + ordered[1:]) / 2).tolist(), None if order == sorted(order) else order


def _rank_codes(scaled: torch.Tensor, bounds: list[float], order: list[int] | None) -> torch.Tensor:
    """The code index of each scaled value: how many midpoints lie strictly below it (NaN: the top rank, 15)."""
    rank = (scaled > bounds[0]).to(torch.int32)
    for bound in bounds[1:]:
        rank = rank + (scaled > bound).to(torch.int32)
    rank = torch.where(torch.isnan(scaled), len(bounds), rank)
    if order is not None:  # FP4's code book is not sorted: map the rank back to its code index
        rank = torch.tensor(order, dtype=torch.int32, device=scaled.device)[rank]
    return rank


def _quantize_blocks(blocks: torch.Tensor, bounds: list[float], order: list[int] | None):
    """Packed codes [n * blocksize / 2] (uint8, first value in the high nibble) and absmax [n] of blocks [n, bs]."""
    values = blocks.float()
    absmax = values.abs().amax(dim=-1, keepdim=True)
    # float32 arithmetic as bitsandbytes does it: multiply by the reciprocal, then clamp to [-1, 1]
    scaled = torch.clamp(values * (1.0 / absmax.clamp(min=1e-38)), -1, 1)
    rank = _rank_codes(scaled, bounds, order).view(-1, 2)
    packed = ((rank[:, 0] << 4) | rank[:, 1]).to(torch.uint8)
    return packed, absmax.view(-1)


class _Kernel:
    """`_quantize_blocks`, compiled once per process and block size (eager when compiling is off or fails)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.compiled: dict[tuple, object] = {}

    def __call__(self, blocks: torch.Tensor, quant_type: str):
        bounds, order = midpoints(quant_type)
        key = (blocks.shape, blocks.dtype, quant_type)
        with self.lock:
            fn = self.compiled.get(key)
            if fn is None:
                fn = self.compile(key)
        return fn(blocks, bounds, order)

    def compile(self, key: tuple):
        fn = _quantize_blocks
        if os.environ.get("LLADA_MOE_COMPILE_QUANTIZE", "1") != "0" and key[0][0] == CHUNK_BLOCKS:
            compiled = torch.compile(_quantize_blocks, dynamic=False)
            try:  # one call on zeros compiles it now, so a missing compiler shows here, not mid-load
                compiled(torch.zeros(key[0], dtype=key[1]), *midpoints(key[2]))
                fn = compiled
            except Exception as err:  # noqa: BLE001 - any compiler failure: run the same function eagerly
                logger.warning_once(f"4-bit quantization runs eagerly (torch.compile failed: {err!r:.200})")
        self.compiled[key] = fn
        return fn


KERNEL = _Kernel()


def quantize_4bit_cpu(
    A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' `quantize_4bit` op on CPU: packed codes [ceil(n / 2), 1] in `quant_storage` and float32 absmax
    [ceil(n / blocksize)], byte-identical to bitsandbytes' own implementation."""
    if blocksize % 2:
        raise ValueError(f"blocksize={blocksize}: expected an even 4-bit blocksize")
    flat = A.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    blocks = flat[:full].view(-1, blocksize)
    step = CHUNK_BLOCKS
    for first in range(0, blocks.shape[0], step):
        chunk = blocks[first : first + step]
        if chunk.shape[0] < step:  # a short (last) chunk runs eagerly rather than padded to the compiled shape
            codes, scales = _quantize_blocks(chunk, *midpoints(quant_type))
        else:
            codes, scales = KERNEL(chunk, quant_type)
        packed[first * blocksize // 2 : (first + chunk.shape[0]) * blocksize // 2] = codes
        absmax[first : first + chunk.shape[0]] = scales
    if full < n:  # a last, partial block: its own absmax, scaled by division (as bitsandbytes does)
        bounds, order = midpoints(quant_type)
        tail = flat[full:].float()
        scale = tail.abs().max().clamp(min=1e-38)
        absmax[-1] = scale
        rank = _rank_codes(torch.clamp(tail / scale, -1, 1), bounds, order)
        if rank.numel() % 2:  # an odd count: the last byte's low nibble is the code of 0
            rank = torch.cat([rank, _rank_codes(torch.zeros(1), bounds, order)])
        rank = rank.view(-1, 2)
        packed[full // 2 :] = ((rank[:, 0] << 4) | rank[:, 1]).to(torch.uint8)
    packed = packed.unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze(1).view(quant_storage).unsqueeze(1)
    return packed, absmax


@contextlib.contextmanager
def fast_4bit_quantization() -> Iterator[None]:
    """While open, bitsandbytes quantizes 4-bit weights on CPU with `quantize_4bit_cpu` (same bytes, several times
    faster, no full-size float32 copies); its own kernel is back once the context closes. `LLADA_MOE_FAST_QUANTIZE=0`
    keeps bitsandbytes' kernel; `LLADA_MOE_COMPILE_QUANTIZE=0` runs ours without `torch.compile`."""
    if os.environ.get("LLADA_MOE_FAST_QUANTIZE", "1") == "0":  # bitsandbytes' own kernel (the baseline)
        yield
        return
    try:
        import bitsandbytes  # noqa: F401 - defines the op
    except ImportError:
        yield
        return
    library = torch.library.Library("bitsandbytes", "IMPL")
    try:
        library.impl("quantize_4bit", quantize_4bit_cpu, "CPU")
        yield
    finally:
        library._destroy()
