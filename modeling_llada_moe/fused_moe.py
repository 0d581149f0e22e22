"""Fused Triton MoE experts (`"llada_fused"`): two grouped GEMMs over expert-sorted token slots, dense or NF4.

`fused_moe_experts_forward(experts, hidden_states, top_k_index, top_k_weights)` is an experts implementation in the
sense of transformers' `ExpertsInterface`: it takes the flattened tokens [N, H], the top-k expert ids [N, k] and the
routing weights [N, k], and returns [N, H]. The pipeline per call:

1. Align (torch ops, no host sync): the N*k token slots are sorted by expert and every expert's group is padded to
   a multiple of BLOCK_M, so each M-block of the sorted order belongs to one expert.
2. gate_up GEMM: each program multiplies one M-block of tokens with a BLOCK_N slice of its expert's gate rows and
   the matching up rows, and writes silu(gate) * up for those slots: [N*k, I].
3. down GEMM: the same over [N*k, I] with the expert's down rows, times the routing weight: [N*k, H].
4. Combine: a deterministic fp32 `view(N, k, H).sum(1)` (no atomics).

Weights are read in place from the flattened containers (`experts.gate_up.weight` [E*2I, H], `experts.down.weight`
[E*H, I]). When a container is a bitsandbytes `Linear4bit` (NF4 or FP4, any blocksize, with or without double
quantization) the kernels read the packed nibbles and the absmax vector in place and dequantize each weight tile in
registers; the double-quantized absmax (uint8 codes + per-256 fp32 scales + offset) is also decoded in the kernel.
Nothing of the size of an expert stack is ever materialised.

The kernels are inference-only: under autograd (grad enabled and an input or weight requiring grad) dense weights go
through transformers' `grouped_mm_experts_forward` (training uses grouped_mm), and 4-bit weights through the
package's `grouped_mm_chunked` (one group of experts dequantized at a time, so QLoRA trains). CPU tensors
are only run by the kernels under the Triton interpreter (`TRITON_INTERPRET=1`, tests); otherwise they also go to
grouped_mm.

Triton is optional: this module imports without it and raises an `ImportError` naming `pip install triton` when the
function is called.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import logging

from .bnb_layout import is_cpu_packed
from .moe_backends import grouped_mm_chunked_experts_forward


try:
    import triton
    import triton.language as tl
except ImportError:  # the module must import without triton (Hub folders, CPU installs)
    triton = None
    tl = None


logger = logging.get_logger(__name__)

__all__ = ["GemmConfig", "MoEConfig", "fused_moe", "fused_moe_experts_forward", "select_config"]

# Token slots (tokens * top_k) handled per launch pair; longer inputs are processed in chunks so the [slots, H]
# and [slots, I] intermediates stay bounded (131072 slots in bf16 at H=2048: 512 MiB + 256 MiB).
MAX_SLOTS_PER_CHUNK = 131072


def _jit(fn):
    # Without triton the kernels stay plain (never called) functions, so the module still imports.
    return triton.jit(fn) if triton is not None else fn


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------


@_jit
def _load_absmax(
    absmax_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    index,
    mask,
    NESTED: tl.constexpr,
    NESTED_QBLOCK: tl.constexpr,
):
    """fp32 absmax of quantization block `index`; decodes bitsandbytes' double quantization when NESTED."""
    if NESTED:
        # Nested: absmax = code2[q] * absmax2[index // 256] + offset (bitsandbytes' dequantize_blockwise + offset).
        q = tl.load(absmax_ptr + index, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + index // NESTED_QBLOCK, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.load(code2_ptr + q).to(tl.float32) * scale2 + tl.load(offset_ptr).to(tl.float32)
    else:
        absmax = tl.load(absmax_ptr + index, mask=mask, other=0.0).to(tl.float32)
    return absmax


@_jit
def _weight_tile(
    w_ptr,
    rows,
    row_mask,
    k0,
    K,
    stride_wr,
    stride_wk,
    absmax_ptr,
    code,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    BLOCK_K: tl.constexpr,
    IS_4BIT: tl.constexpr,
    NESTED: tl.constexpr,
    QBLOCK: tl.constexpr,
    NESTED_QBLOCK: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr,
):
    """The [BLOCK_K, BLOCK_N] tile W[rows, k0:k0+BLOCK_K]^T (4-bit: dequantized, fp32; dense: stored dtype)."""
    rows = rows.to(tl.int64)
    if IS_4BIT:
        # bitsandbytes packs the row-major flattened matrix two values per byte, the even element in the high
        # nibble; K is even so each row starts on a byte and a [BLOCK_N, BLOCK_K // 2] byte tile covers the tile.
        pair = tl.arange(0, BLOCK_K // 2)
        byte_mask = row_mask[:, None] & ((k0 + 2 * pair)[None, :] < K)
        packed = tl.load(w_ptr + rows[:, None] * (K // 2) + (k0 // 2 + pair)[None, :], mask=byte_mask, other=0)
        nibbles = tl.reshape(tl.join((packed >> 4) & 15, packed & 15), (packed.shape[0], BLOCK_K)).to(tl.int32)
        # In-register table lookup: a global-memory gather here is software-pipelined into shared memory per stage
        # (2-5x the shared memory and ~2.5x the SASS instructions in compiled sm_86/sm_90 code).
        values = tl.reshape(tl.gather(code, tl.reshape(nibbles, (nibbles.numel,)), 0), nibbles.shape)
        if SCALE_PER_ROW:
            # K % QBLOCK == 0 and QBLOCK % BLOCK_K == 0: one absmax per weight row for the whole tile.
            absmax = _load_absmax(
                absmax_ptr,
                absmax2_ptr,
                code2_ptr,
                offset_ptr,
                rows * (K // QBLOCK) + k0 // QBLOCK,
                row_mask,
                NESTED,
                NESTED_QBLOCK,
            )
            w = values * absmax[:, None]
        else:
            # General case (e.g. down with I < blocksize): blocks of the flattened matrix may span rows.
            k = k0 + tl.arange(0, BLOCK_K)
            absmax = _load_absmax(
                absmax_ptr,
                absmax2_ptr,
                code2_ptr,
                offset_ptr,
                (rows[:, None] * K + k[None, :]) // QBLOCK,
                row_mask[:, None] & (k[None, :] < K),
                NESTED,
                NESTED_QBLOCK,
            )
            w = values * absmax
        tile = tl.trans(w)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        tile = tl.load(
            w_ptr + rows[None, :] * stride_wr + k[:, None] * stride_wk,
            mask=row_mask[None, :] & (k[:, None] < K),
            other=0.0,
        )
    return tile


@_jit
def _moe_gemm_kernel(
    a_ptr,
    w_ptr,
    c_ptr,
    slot_ptr,
    block_expert_ptr,
    route_weight_ptr,
    absmax_ptr,
    code_ptr,
    absmax2_ptr,
    code2_ptr,
    offset_ptr,
    num_slots,
    N,
    K,
    num_pid_m,
    stride_am,
    stride_ak,
    stride_wr,
    stride_wk,
    stride_cm,
    stride_cn,
    A_ROW_DIV: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    IS_4BIT: tl.constexpr,
    NESTED: tl.constexpr,
    QBLOCK: tl.constexpr,
    NESTED_QBLOCK: tl.constexpr,
    SCALE_PER_ROW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """C[slot, n] for one (M-block, N-block): GATED -> silu(A W_gate^T) * (A W_up^T); else (A W^T) * route weight.

    A row of slot s is s // A_ROW_DIV (tokens for gate_up, slots for down); the expert's weight rows start at
    expert * N * (2 if GATED else 1), with the up rows N after the gate rows.
    """
    pid = tl.program_id(0)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    # Grouped ordering: GROUP_M consecutive M-blocks (mostly one expert) sweep the N-blocks together so an expert's
    # weight tiles are reused from L2.
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m

    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:  # an M-block past the padded end (the grid is sized for the worst case to avoid a host sync)
        return

    slots = tl.load(slot_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    slot_mask = slots < num_slots  # padding entries hold num_slots
    a_rows = (slots // A_ROW_DIV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if GATED:
        w_rows = expert.to(tl.int64) * (2 * N) + offs_n
    else:
        w_rows = expert.to(tl.int64) * N + offs_n

    if IS_4BIT:
        code = tl.load(code_ptr + tl.arange(0, 16)).to(tl.float32)  # the 16-value 4-bit codebook (NF4 or FP4)
    else:
        code = tl.full((16,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if GATED:
        acc_up = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + k[None, :] * stride_ak,
            mask=slot_mask[:, None] & (k[None, :] < K),
            other=0.0,
        )
        w = _weight_tile(
            w_ptr,
            w_rows,
            n_mask,
            k0,
            K,
            stride_wr,
            stride_wk,
            absmax_ptr,
            code,
            absmax2_ptr,
            code2_ptr,
            offset_ptr,
            BLOCK_K,
            IS_4BIT,
            NESTED,
            QBLOCK,
            NESTED_QBLOCK,
            SCALE_PER_ROW,
        )
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
        if GATED:
            w_up = _weight_tile(
                w_ptr,
                w_rows + N,
                n_mask,
                k0,
                K,
                stride_wr,
                stride_wk,
                absmax_ptr,
                code,
                absmax2_ptr,
                code2_ptr,
                offset_ptr,
                BLOCK_K,
                IS_4BIT,
                NESTED,
                QBLOCK,
                NESTED_QBLOCK,
                SCALE_PER_ROW,
            )
            acc_up = tl.dot(a, w_up.to(a.dtype), acc_up, input_precision=DOT_PRECISION)

    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up
    else:
        acc = acc * tl.load(route_weight_ptr + slots, mask=slot_mask, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + slots.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=slot_mask[:, None] & n_mask[None, :])


# --------------------------------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch options of one grouped GEMM (BLOCK_M is shared by both GEMMs: see `MoEConfig`)."""

    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class MoEConfig:
    """`block_m`: rows per M-block (each expert's slot group is padded to a multiple of it); per-GEMM configs."""

    block_m: int
    gate_up: GemmConfig
    down: GemmConfig


def select_config(num_slots: int, num_experts: int, is_4bit: bool = False) -> MoEConfig:
    """Shape-bucketed tiles, keyed by the mean number of token slots (tokens * top_k) per expert.

    Buckets for E=64, top-8: decode-like <= 64 tokens (<= 8 slots/expert), <= 256 tokens, <= 1024 tokens, and
    prefill-like above. Small buckets use BLOCK_M 16 (little padding waste) and narrow N tiles (more programs to
    stream the weights with); large ones use 128-row tiles for weight reuse. 4-bit weights use BLOCK_K 64 so a tile
    row shares one absmax with bitsandbytes' default blocksize.
    """
    per_expert = num_slots / max(num_experts, 1)
    wide_k = 64 if is_4bit else 128
    if per_expert <= 8:
        return MoEConfig(16, GemmConfig(32, wide_k, 1, 4, 4), GemmConfig(64, wide_k, 1, 4, 4))
    if per_expert <= 32:
        return MoEConfig(32, GemmConfig(64, 64, 4, 4, 4), GemmConfig(64, 64, 4, 4, 4))
    if per_expert <= 128:
        return MoEConfig(64, GemmConfig(64, 64, 8, 4, 3), GemmConfig(128, 64, 8, 4, 3))
    # 4-bit: the dequantized tile lives in registers next to the accumulator; 64-wide down tiles keep ptxas at ~128
    # registers on sm_80/86 (~250 at 128 wide).
    return MoEConfig(128, GemmConfig(64, 64, 8, 8, 3), GemmConfig(64 if is_4bit else 128, 64, 8, 8, 3))


# --------------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------------


def _require_triton() -> None:
    if triton is None:
        raise ImportError(
            "The 'llada_fused' experts implementation needs Triton: `pip install triton` (or select another "
            "implementation, e.g. model.set_experts_implementation('grouped_mm'))."
        )


def _interpreting() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return type(_moe_gemm_kernel).__name__ == "InterpretedFunction"


def _is_params4bit(weight: torch.Tensor) -> bool:
    # A Params4bit can only exist if bitsandbytes is already imported; never import it just to check.
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(weight, bnb.nn.Params4bit)


@dataclass
class _Weight:
    """Pointers and layout of one flattened expert container, as the kernel reads it."""

    data: torch.Tensor
    stride_row: int
    stride_k: int
    is_4bit: bool = False
    absmax: torch.Tensor | None = None
    code: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested: bool = False
    qblock: int = 64
    nested_qblock: int = 256


def _describe_weight(weight: torch.Tensor, rows: int, cols: int) -> _Weight:
    """Wrap a dense [rows, cols] weight or a bitsandbytes Params4bit holding one, without copying it."""
    if not _is_params4bit(weight):
        if weight.shape != (rows, cols):
            raise ValueError(f"expert container weight has shape {tuple(weight.shape)}, expected {(rows, cols)}")
        return _Weight(weight, weight.stride(0), weight.stride(1))
    state = weight.quant_state
    if state is None or not getattr(weight, "bnb_quantized", True):
        raise ValueError("bitsandbytes Params4bit expert weight is not quantized yet (move it to the device first)")
    if is_cpu_packed(weight):
        raise ValueError(
            "the 4-bit expert weight is in bitsandbytes' AVX512-BF16 CPU layout (a Linear4bit forward ran on CPU); "
            "the fused kernels read the standard layout: call bnb_layout.restore_standard_layout(weight) first, or "
            "use the 'grouped_mm_chunked' experts, which read both"
        )
    if tuple(state.shape) != (rows, cols) or cols % 2:
        raise ValueError(f"4-bit expert weight holds shape {tuple(state.shape)}, expected {(rows, cols)} (even cols)")
    data = weight.data
    if data.dtype != torch.uint8:  # quant_storage other than uint8 only reinterprets the same packed bytes
        data = data.view(torch.uint8)
    if not data.is_contiguous() or data.numel() != rows * cols // 2:
        raise ValueError("unexpected packed 4-bit storage (expected rows * cols / 2 contiguous bytes)")
    device = data.device
    described = _Weight(
        data,
        0,
        0,
        is_4bit=True,
        absmax=state.absmax,
        code=state.code.to(device=device, dtype=torch.float32),
        qblock=int(state.blocksize),
    )
    if getattr(state, "nested", False) or state.state2 is not None:
        state2 = state.state2
        described.nested = True
        described.absmax2 = state2.absmax.to(device=device, dtype=torch.float32)
        described.code2 = state2.code.to(device=device, dtype=torch.float32)
        described.offset = torch.as_tensor(state.offset, dtype=torch.float32, device=device).reshape(1)
        described.nested_qblock = int(state2.blocksize)
    return described


def _align(
    top_k_index: torch.Tensor, num_experts: int, block_m: int, drop_invalid: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sort token slots by expert and pad each expert's group to a multiple of `block_m` (torch ops, no host sync,
    so the whole forward can be captured in a CUDA graph).

    Returns `slots` [num_blocks * block_m] int32 (slot ids in expert order; padding entries hold num_slots),
    `block_expert` [num_blocks] int32 (the expert of each M-block, -1 past the padded end) and num_blocks, an upper
    bound that only depends on shapes. With `drop_invalid`, expert ids outside [0, E) (expert-parallel sentinels) are
    left out; otherwise all ids must be valid.
    """
    device = top_k_index.device
    expert_ids = top_k_index.reshape(-1)
    num_slots = expert_ids.numel()
    if drop_invalid:
        expert_ids = torch.where((expert_ids >= 0) & (expert_ids < num_experts), expert_ids, num_experts)
    sorted_ids, order = torch.sort(expert_ids, stable=True)
    # starts[e]: first sorted position of expert e; starts[E]: number of valid slots.
    starts = torch.searchsorted(sorted_ids, torch.arange(num_experts + 1, device=device, dtype=sorted_ids.dtype))
    padded = (starts[1:] - starts[:-1] + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, dim=0)
    # Sorted position p of expert e lands at padded_start[e] + (p - starts[e]) = p + shift[e].
    shift = padded_end - padded - starts[:-1]
    # At most min(slots, E) experts are non-empty, and each wastes fewer than block_m rows.
    num_blocks = -(-(num_slots + min(num_slots, num_experts) * (block_m - 1)) // block_m)
    capacity = num_blocks * block_m
    position = torch.arange(num_slots, device=device)
    if drop_invalid:
        # Dropped slots (sorted last) go to distinct rows past the capacity, sliced off below.
        valid = sorted_ids < num_experts
        dest = torch.where(valid, position + shift[sorted_ids.clamp(max=num_experts - 1)], capacity + position)
    else:
        dest = position + shift[sorted_ids]
    slots = torch.full((capacity + num_slots * drop_invalid,), num_slots, dtype=torch.int32, device=device)
    slots.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, capacity, block_m, device=device, dtype=padded_end.dtype)
    block_expert = torch.searchsorted(padded_end, block_start, right=True).to(torch.int32)
    block_expert.masked_fill_(block_expert >= num_experts, -1)
    return slots[:capacity], block_expert, num_blocks


def _launch_gemm(
    a: torch.Tensor,
    weight: _Weight,
    out: torch.Tensor,
    slots: torch.Tensor,
    block_expert: torch.Tensor,
    route_weights: torch.Tensor | None,
    num_blocks: int,
    n: int,
    k: int,
    a_row_div: int,
    gated: bool,
    block_m: int,
    config: GemmConfig,
) -> None:
    if weight.is_4bit and config.block_k % 2:
        raise ValueError("4-bit tiles need an even block_k")
    scale_per_row = weight.is_4bit and k % weight.qblock == 0 and weight.qblock % config.block_k == 0
    num_stages = config.num_stages
    if weight.is_4bit and not scale_per_row:
        # Rows that are not a whole number of quantization blocks (e.g. I < 64) need a per-element absmax gather,
        # which the pipeliner would stage in shared memory (~190 KB at 3 stages, BLOCK_M 128); such shapes are small
        # models, so run them unpipelined.
        num_stages = 1
    # Unused pointer arguments (dense weights, the gate_up route weights) get any valid tensor; their loads are
    # compiled out by the constexpr flags.
    dummy = weight.data
    fp32_precision = "tf32" if a.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    grid = (num_blocks * -(-n // config.block_n),)
    _moe_gemm_kernel[grid](
        a,
        weight.data,
        out,
        slots,
        block_expert,
        route_weights if route_weights is not None else dummy,
        weight.absmax if weight.absmax is not None else dummy,
        weight.code if weight.code is not None else dummy,
        weight.absmax2 if weight.absmax2 is not None else dummy,
        weight.code2 if weight.code2 is not None else dummy,
        weight.offset if weight.offset is not None else dummy,
        out.shape[0],
        n,
        k,
        num_blocks,
        a.stride(0),
        a.stride(1),
        weight.stride_row,
        weight.stride_k,
        out.stride(0),
        out.stride(1),
        A_ROW_DIV=a_row_div,
        GATED=gated,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        IS_4BIT=weight.is_4bit,
        NESTED=weight.nested,
        QBLOCK=weight.qblock,
        NESTED_QBLOCK=weight.nested_qblock,
        SCALE_PER_ROW=scale_per_row,
        DOT_PRECISION=fp32_precision if a.dtype == torch.float32 else "ieee",
        num_warps=config.num_warps,
        num_stages=num_stages,
    )


def fused_moe(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    num_experts: int,
    intermediate_dim: int,
    config: MoEConfig | None = None,
    expert_parallel: bool = False,
) -> torch.Tensor:
    """SwiGLU MoE over flattened expert weights with the Triton kernels (no autograd).

    Args:
        hidden_states: [N, H] activations (bf16/fp16 on GPU; fp32/fp16 under the interpreter).
        top_k_index: [N, k] expert ids in [0, E).
        top_k_weights: [N, k] routing weights.
        gate_up_weight: [E*2I, H] dense weight (expert e: I gate rows then I up rows) or a bitsandbytes Params4bit
            quantizing it.
        down_weight: [E*H, I] dense weight or Params4bit.
        num_experts, intermediate_dim: E and I.
        config: tiles; default `select_config(N*k, E, is_4bit)` per chunk.
        expert_parallel: ids outside [0, E) may occur (expert-parallel sentinels) and contribute nothing.

    Returns:
        [N, H] in `hidden_states.dtype`: sum over slots j of w[n, j] * down_e(silu(gate_e(x)) * up_e(x)), e = idx[n, j].
    """
    _require_triton()
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.shape[-1]
    gate_up = _describe_weight(gate_up_weight, num_experts * 2 * intermediate_dim, hidden_dim)
    down = _describe_weight(down_weight, num_experts * hidden_dim, intermediate_dim)
    dense_dtypes = {w.data.dtype for w in (gate_up, down) if not w.is_4bit}
    if len(dense_dtypes) > 1:
        raise ValueError(f"gate_up and down weights have different dtypes: {dense_dtypes}")
    compute_dtype = dense_dtypes.pop() if dense_dtypes else hidden_states.dtype
    if compute_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported compute dtype {compute_dtype}")
    if num_tokens == 0 or top_k == 0:
        return hidden_states.new_zeros(num_tokens, hidden_dim)

    x = hidden_states.to(compute_dtype)  # no-op unless autocast handed us another dtype than the weights'
    args = (gate_up, down, num_experts, intermediate_dim, config, expert_parallel)
    chunk = max(1, MAX_SLOTS_PER_CHUNK // top_k)
    if num_tokens <= chunk:
        return _fused_moe_chunk(x, top_k_index, top_k_weights, *args).to(hidden_states.dtype)
    out = torch.empty(num_tokens, hidden_dim, dtype=hidden_states.dtype, device=hidden_states.device)
    for start in range(0, num_tokens, chunk):
        stop = min(start + chunk, num_tokens)
        out[start:stop] = _fused_moe_chunk(x[start:stop], top_k_index[start:stop], top_k_weights[start:stop], *args)
    return out


def _fused_moe_chunk(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: _Weight,
    down: _Weight,
    num_experts: int,
    intermediate_dim: int,
    config: MoEConfig | None,
    expert_parallel: bool,
) -> torch.Tensor:
    """One launch pair plus the combine; returns fp32 [N, H]."""
    num_tokens, hidden_dim = x.shape
    top_k = top_k_index.shape[-1]
    num_slots = num_tokens * top_k
    if config is None:
        config = select_config(num_slots, num_experts, gate_up.is_4bit or down.is_4bit)
    slots, block_expert, num_blocks = _align(top_k_index, num_experts, config.block_m, expert_parallel)

    intermediate = torch.empty(num_slots, intermediate_dim, dtype=x.dtype, device=x.device)
    _launch_gemm(
        x,
        gate_up,
        intermediate,
        slots,
        block_expert,
        None,
        num_blocks,
        intermediate_dim,
        hidden_dim,
        top_k,
        True,
        config.block_m,
        config.gate_up,
    )
    weighted = torch.empty(num_slots, hidden_dim, dtype=x.dtype, device=x.device)
    route_weights = top_k_weights.reshape(-1).contiguous()
    _launch_gemm(
        intermediate,
        down,
        weighted,
        slots,
        block_expert,
        route_weights,
        num_blocks,
        hidden_dim,
        intermediate_dim,
        1,
        False,
        config.block_m,
        config.down,
    )
    if expert_parallel:  # rows of dropped slots were never written
        dropped = (top_k_index < 0) | (top_k_index >= num_experts)
        weighted.masked_fill_(dropped.reshape(-1, 1), 0.0)
    # Deterministic combine: per-token sum over its k slots, accumulated in fp32.
    return weighted.view(num_tokens, top_k, hidden_dim).sum(dim=1, dtype=torch.float32)


def _is_silu(act_fn: nn.Module) -> bool:
    return isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation"


def _fallback(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    # grouped_mm that dequantizes quantized experts one at a time (plain weights: exactly transformers' grouped_mm).
    return grouped_mm_chunked_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def fused_moe_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Experts implementation `"llada_fused"` for `LLaDAMoEExperts` (inference-only Triton grouped GEMMs).

    Args:
        self: the experts module: `num_experts`, `intermediate_dim`, `act_fn` (SiLU) and the flattened containers
            `gate_up` (weight [E*2I, H]) and `down` (weight [E*H, I]), dense or bitsandbytes `Linear4bit`.
        hidden_states: [N, H] tokens.
        top_k_index: [N, k] int64 expert ids.
        top_k_weights: [N, k] routing weights.

    Returns:
        [N, H] in `hidden_states.dtype`.

    Training uses grouped_mm: when autograd is recording (`torch.is_grad_enabled()` and the inputs or weights
    require grad) dense weights fall back to transformers' `grouped_mm_experts_forward` and 4-bit weights to
    `grouped_mm_chunked` (dequantized a group of experts at a time), so QLoRA trains with exact gradients.
    What the kernels do not cover (non-SiLU activation, biases, transposed weights, 8-bit weights, tensors on a
    non-CUDA device outside the Triton interpreter) runs through grouped_mm instead (`grouped_mm_chunked` for
    quantized containers when registered).

    The kernels cannot break decoding: the first call of each shape class (device, dtypes, weight formats, sizes,
    tile bucket) in a process also runs grouped_mm and compares; a Triton compile/launch error or a mismatch logs one
    warning and keeps that class on grouped_mm. `LLADA_MOE_FUSED=on` skips the check, `=off` never runs the kernels
    (`model.set_experts_implementation("grouped_mm_chunked")` does that per model).

    Raises:
        ImportError: Triton is not installed.
        ValueError: `LLADA_MOE_FUSED` holds something other than check / on / off.
    """
    _require_triton()
    gate_up_weight, down_weight = self.gate_up.weight, self.down.weight
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (hidden_states, top_k_weights, gate_up_weight, down_weight)
    )
    if needs_grad:
        # The kernels have no backward: training (QLoRA included) goes through grouped_mm, chunk-dequantizing 4-bit
        # experts, which gives exact input gradients.
        return _fallback(self, hidden_states, top_k_index, top_k_weights)

    supported_layout = (
        _is_silu(self.act_fn)
        and getattr(self, "has_gate", True)
        and not getattr(self, "has_bias", False)
        and not getattr(self, "is_transposed", False)
        and not getattr(self, "has_post_expert_norm", False)
        and getattr(self, "is_concatenated", True)
    )
    weights_ok = all(
        (_is_params4bit(w) and not is_cpu_packed(w)) or w.dtype in (torch.float16, torch.bfloat16, torch.float32)
        for w in (gate_up_weight, down_weight)
    )
    on_device = hidden_states.is_cuda or _interpreting()
    if not (supported_layout and weights_ok and on_device):
        logger.warning_once(
            "'llada_fused' experts: layout, weight format or device not covered by the Triton kernels (they need "
            "CUDA); running grouped_mm instead."
        )
        return _fallback(self, hidden_states, top_k_index, top_k_weights)

    mode = fused_mode()
    if mode == "off":
        return _fallback(self, hidden_states, top_k_index, top_k_weights)
    expert_parallel = getattr(self, "_is_expert_parallel", False)
    args = (hidden_states, top_k_index, top_k_weights, gate_up_weight, down_weight, self.num_experts)
    key = _shape_class(hidden_states, top_k_index, gate_up_weight, down_weight, self.num_experts,
                       self.intermediate_dim, expert_parallel)
    verdict = _CHECKED.get(key)
    if mode == "on" or verdict is True:
        return fused_moe(*args, self.intermediate_dim, expert_parallel=expert_parallel)
    expected = _fallback(self, hidden_states, top_k_index, top_k_weights)
    if verdict is False:
        return expected
    # First call of this shape class in this process: the kernels must run and agree with grouped_mm, else the
    # class stays on grouped_mm (a Triton compile or launch failure on the user's GPU must not break decoding).
    try:
        out = fused_moe(*args, self.intermediate_dim, expert_parallel=expert_parallel)
        error = (out.float() - expected.float()).abs().max().item() if out.numel() else 0.0
        scale = expected.float().abs().max().item() if out.numel() else 0.0
        agrees = out.shape == expected.shape and error <= _CHECK_TOLERANCE[out.dtype] * max(scale, 1e-6)
        reason = f"max abs difference {error:.3g} against grouped_mm (output max {scale:.3g})"
    except Exception as failure:  # noqa: BLE001 (any Triton/CUDA failure means: use grouped_mm)
        agrees, reason = False, f"{type(failure).__name__}: {failure}"
    _CHECKED[key] = agrees
    if not agrees:
        logger.warning(
            f"'llada_fused' experts: the Triton kernels failed their check for {key} ({reason}); this shape class "
            f"runs grouped_mm from now on. Set {FUSED_ENV}=off to skip the kernels, or report this with your GPU."
        )
        return expected
    return out


FUSED_ENV = "LLADA_MOE_FUSED"
FUSED_MODES = ("check", "on", "off")
# Gross-failure bounds (max abs difference / max |grouped_mm output|): the kernels accumulate in fp32 like grouped_mm.
_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_CHECKED: dict[tuple, bool] = {}  # shape class -> the kernels agreed with grouped_mm on its first call


def fused_mode() -> str:
    """`LLADA_MOE_FUSED`: "check" (default: each shape class is checked once per process against grouped_mm and
    falls back to it on any failure), "on" (run the kernels unchecked) or "off" (always grouped_mm)."""
    mode = os.environ.get(FUSED_ENV, "check").strip().lower() or "check"
    if mode not in FUSED_MODES:
        raise ValueError(f"{FUSED_ENV}={mode!r}: expected one of {FUSED_MODES}")
    return mode


def _shape_class(hidden_states, top_k_index, gate_up_weight, down_weight, num_experts, intermediate_dim,
                 expert_parallel) -> tuple:
    """What selects a compiled kernel variant: device, dtypes, weight formats, sizes and the tile bucket."""

    def weight_format(weight):
        if _is_params4bit(weight):
            state = weight.quant_state
            return ("4bit", state.quant_type, bool(state.nested), int(state.blocksize))
        return str(weight.dtype)

    is_4bit = _is_params4bit(gate_up_weight) or _is_params4bit(down_weight)
    top_k = top_k_index.shape[-1]
    slots = min(top_k_index.shape[0], max(1, MAX_SLOTS_PER_CHUNK // max(top_k, 1))) * top_k
    return (
        str(hidden_states.device),
        str(hidden_states.dtype),
        weight_format(gate_up_weight),
        weight_format(down_weight),
        num_experts,
        intermediate_dim,
        hidden_states.shape[-1],
        top_k,
        select_config(slots, num_experts, is_4bit),
        expert_parallel,
    )
