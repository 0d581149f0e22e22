"""Weight-only int4 for the CPU: torch's own int4 matmul (`aten._weight_int4pack_mm_for_cpu`), as a transformers
quantization method (`quant_method: "llada_int4"`) beside bitsandbytes.

Each weight row is cut in groups of `group_size` input features; a group stores 4-bit codes q and a bf16 scale and
zero, and reads back as (q - 8) * scale + zero (the convention of torch's kernel). The kernel multiplies bf16
activations by the codes directly, so no weight is ever dequantized at run time; on CPUs it is the fastest 4-bit
path this package has (bitsandbytes' CPU path dequantizes every routed expert at every step).

Two byte layouts, one in memory and one on disk:
- on disk (`save_pretrained`, what `from_pretrained` reads): plain nibbles, row-major, byte j of a row holding codes
  2j (low nibble) and 2j+1 (high nibble), with `scales_and_zeros` [blocks, K/group_size, rows, 2]. It does not
  depend on the CPU.
- in memory: the order torch's kernel wants, which depends on the instruction set torch picked at run time. Packing
  is a permutation of the nibbles (checked when it is first learned), so a save reads the plain codes back exactly.

An expert container ([E*2I, H] or [E*H, I]) is E blocks of rows, each packed on its own, so expert e is the
contiguous rows of its block and runs as one kernel call (`int4_experts_forward`).
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin


logger = logging.get_logger(__name__)

QUANT_METHOD = "llada_int4"
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_SKIP_MODULES = ("lm_head", "embed_tokens")  # as bitsandbytes' presets: the head and embeddings stay dense
ROW_MULTIPLE = 16  # torch's CPU packing (`_convert_weight_to_int4pack_for_cpu`) takes row counts divisible by 16


def int4_fits(in_features: int, block_rows: int, group_size: int) -> bool:
    """Whether a weight of `in_features` columns, packed in blocks of `block_rows` rows, can run on the kernel: whole
    groups in every row, and blocks of a row count torch's packing takes."""
    return in_features % group_size == 0 and in_features % 2 == 0 and block_rows % ROW_MULTIPLE == 0


def check_cpu_device_map(device_map) -> None:
    """The kernel is the CPU's: every device of `device_map` must be the CPU (None and "auto" mean it here)."""
    devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
    if any(str(device) not in ("None", "auto", "cpu") for device in devices):
        raise ValueError(
            f"device_map={device_map!r}: method='int4' runs on the CPU only (quant_method={QUANT_METHOD!r}, torch's "
            "CPU int4 kernel); accepted are 'cpu', 'auto', None or {'': 'cpu'}. On a GPU use bitsandbytes NF4 "
            "(method='nf4')"
        )


def int4_supported() -> bool:
    """Whether this torch has the CPU int4 kernel."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def quantize_int4(weight: torch.Tensor, group_size: int, block_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [N, K] as (plain nibbles uint8 [N, K/2], scales_and_zeros bf16 [N/block_rows, K/g, block_rows,
    2]). Asymmetric per group: the group's min and max map to codes 0 and 15; q is rounded against the bf16-rounded
    scale and zero, so the stored numbers are the ones the codes were chosen for."""
    rows, columns = weight.shape
    groups = columns // group_size
    w = weight.detach().float().reshape(rows, groups, group_size)
    low, high = torch.aminmax(w, dim=-1)  # one pass; an inf or NaN reaches them (amin / amax propagate NaN)
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        # One inf would make its whole group's scale and zero inf (and NaN codes): refuse instead of storing that.
        raise ValueError(
            f"cannot quantize a weight with non-finite values ({int((~torch.isfinite(w)).sum())} inf / NaN of "
            f"{w.numel()}) to int4: the checkpoint is damaged, or was saved from a diverged training run"
        )
    scale = torch.where(high > low, (high - low) / 15, torch.ones_like(low)).bfloat16().float()
    zero = (low + 8 * scale).bfloat16().float()
    codes = w - zero[..., None]  # a new tensor: the rest in place
    codes.div_(scale[..., None]).add_(8).round_().clamp_(0, 15)
    nibbles = join_nibbles(codes.to(torch.uint8))
    pairs = torch.stack([scale, zero], -1).bfloat16()  # [N, K/g, 2]
    blocks = rows // block_rows
    pairs = pairs.view(blocks, block_rows, groups, 2).transpose(1, 2).contiguous()
    return nibbles.contiguous(), pairs


def join_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [R, K] -> bytes [R, K/2], code 2j in the low nibble of byte j and code 2j+1 in its high one."""
    pairs = codes.view(codes.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def split_nibbles(data: torch.Tensor) -> torch.Tensor:
    """bytes [R, K/2] -> uint8 codes [R, K]: each byte's low nibble, then its high one (`join_nibbles` undone)."""
    return torch.stack([data & 15, data >> 4], -1).reshape(data.shape[0], -1)


def unpack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K/2] plain nibbles -> int32 codes [R, K]."""
    return split_nibbles(nibbles).to(torch.int32)


@functools.lru_cache(maxsize=8)
def _packing_order(rows: int, columns: int) -> torch.Tensor:
    """For packed [rows, columns/2] bytes read as low, high nibble pairs in order: the row-major index of the code
    each nibble holds. Learned from torch's own packing of index digits (no layout is assumed) and checked to be a
    permutation."""
    index = torch.arange(rows * columns, dtype=torch.int64).view(rows, columns)
    order = torch.zeros(rows * columns, dtype=torch.int64)
    digits = max(1, ((rows * columns - 1).bit_length() + 3) // 4)
    for digit in range(digits):
        probe = ((index >> (4 * digit)) & 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        order |= split_nibbles(packed).reshape(-1).to(torch.int64) << (4 * digit)
    if not torch.equal(torch.sort(order).values, torch.arange(rows * columns)):
        raise RuntimeError(
            f"torch's int4 packing of a [{rows}, {columns}] weight is not a permutation of its codes; this torch build "
            "cannot save int4 weights exactly"
        )
    return order


def pack_block(nibbles: torch.Tensor) -> torch.Tensor:
    """Plain nibbles [R, K/2] -> the kernel's packed bytes."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(nibbles), 1)


def unpack_block(packed: torch.Tensor) -> torch.Tensor:
    """The kernel's packed bytes [R, K/2] -> plain nibbles (exactly the bytes `pack_block` was given)."""
    rows, columns = packed.shape[0], packed.shape[1] * 2
    codes = torch.empty(rows * columns, dtype=torch.uint8)
    codes[_packing_order(rows, columns)] = split_nibbles(packed).reshape(-1)
    return join_nibbles(codes.view(rows, columns))


class Int4Linear(nn.Module):
    """A bias-free linear layer with int4 weights (see the module docstring), `blocks` blocks of `block_rows` rows.

    `weight` holds plain nibbles until `pack_()` (run once the weights are loaded) turns it into the kernel's layout;
    `state_dict()` always gives the plain nibbles."""

    def __init__(self, in_features: int, out_features: int, group_size: int, block_rows: int | None = None):
        super().__init__()
        block_rows = block_rows or out_features
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.block_rows = group_size, block_rows
        self.blocks = out_features // block_rows
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8), requires_grad=False)
        self.scales_and_zeros = nn.Parameter(
            torch.empty(self.blocks, in_features // group_size, block_rows, 2, dtype=torch.bfloat16),
            requires_grad=False,
        )
        self.packed = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"blocks={self.blocks}"
        )

    @torch.no_grad()
    def pack_(self) -> None:
        if self.packed:
            return
        weight = self.weight.data
        packed = torch.empty_like(weight)
        for block in range(self.blocks):
            rows = slice(block * self.block_rows, (block + 1) * self.block_rows)
            packed[rows] = pack_block(weight[rows])
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.packed = True

    def plain_weight(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Plain nibbles of rows [start, end) (block-aligned when packed)."""
        end = self.out_features if end is None else end
        if not self.packed:
            return self.weight.data[start:end]
        if start % self.block_rows or end % self.block_rows:
            raise ValueError(f"rows [{start}, {end}) are not whole blocks of {self.block_rows}")
        return torch.cat(
            [unpack_block(self.weight.data[row : row + self.block_rows]) for row in range(start, end, self.block_rows)]
        )

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, end) (whole blocks) as a dense `dtype` tensor: (q - 8) * scale + zero."""
        codes = unpack_nibbles(self.plain_weight(start, end)).float()
        first, last = start // self.block_rows, end // self.block_rows
        pairs = self.scales_and_zeros.data[first:last].float()  # [b, K/g, R, 2]
        pairs = pairs.transpose(1, 2).reshape(end - start, -1, 2)  # [rows, K/g, 2]
        codes = codes.view(end - start, -1, self.group_size)
        return ((codes - 8) * pairs[..., :1] + pairs[..., 1:]).reshape(end - start, -1).to(dtype)

    def matmul_block(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """x [M, K] @ block `block`'s rows, transposed: [M, block_rows], in x's dtype."""
        if x.device.type != "cpu" or self.weight.device.type != "cpu":
            raise ValueError(
                f"an int4 (quant_method={QUANT_METHOD!r}) layer got a tensor on {x.device} with weights on "
                f"{self.weight.device}: the method runs on the CPU only; keep the model and inputs on the CPU, or "
                "load with bitsandbytes (NF4) for a GPU"
            )
        if not self.packed:
            self.pack_()
        rows = slice(block * self.block_rows, (block + 1) * self.block_rows)
        pairs = self.scales_and_zeros[block]
        if pairs.dtype != x.dtype:
            pairs = pairs.to(x.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.weight[rows], self.group_size, pairs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            flat = flat.float()
        if self.blocks == 1:
            out = self.matmul_block(flat, 0)
        else:
            out = torch.cat([self.matmul_block(flat, block) for block in range(self.blocks)], dim=-1)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination[prefix + "weight"] = self.plain_weight()


def int4_experts_forward(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The routed experts on int4 containers: per expert one kernel call for gate/up and one for down, on the rows
    routed to it; the outputs weighted and summed in fp32."""
    gate_up, down = experts.gate_up, experts.down
    compute = hidden_states if hidden_states.dtype in (torch.bfloat16, torch.float32) else hidden_states.float()
    output = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    flat_index = top_k_index.reshape(-1)
    order = torch.argsort(flat_index, stable=True)
    counts = torch.bincount(flat_index, minlength=experts.num_experts + 1).tolist()
    tokens = order // top_k_index.shape[1]
    weights = top_k_weights.reshape(-1)[order]
    start = 0
    for expert, count in enumerate(counts):
        if count == 0 or expert >= experts.num_experts:  # the off-rank sentinel of expert parallelism
            start += count
            continue
        rows = tokens[start : start + count]
        gate, up = gate_up.matmul_block(compute[rows], expert).chunk(2, dim=-1)
        routed = down.matmul_block(experts.act_fn(gate) * up, expert)
        output.index_add_(0, rows, routed.float() * weights[start : start + count, None].float())
        start += count
    return output.to(hidden_states.dtype)


def replace_with_int4_linear(model: nn.Module, group_size: int, skip: list[str]) -> int:
    """Swap (on the meta model) the expert containers and every other bias-free `nn.Linear` that fits the kernel
    (`int4_fits`) for `Int4Linear`; `skip` names modules kept dense, and so is a Linear that does not fit (with a
    warning naming it). Returns how many were replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module.bias is not None:
            continue
        if any(part in name.split(".") or name.endswith(part) for part in skip):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        block_rows = module.out_features
        if hasattr(parent, "num_experts") and child in ("gate_up", "down"):
            block_rows = module.out_features // parent.num_experts
        if not int4_fits(module.in_features, block_rows, group_size):
            reason = (
                f"in_features={module.in_features} is not a whole number of groups of {group_size}"
                if module.in_features % group_size or module.in_features % 2
                else f"its blocks of {block_rows} rows are not a multiple of {ROW_MULTIPLE} (torch's int4 packing)"
            )
            logger.warning_once(f"{name}: {reason}; it stays unquantized")
            continue
        with torch.device("meta"):
            setattr(parent, child, Int4Linear(module.in_features, module.out_features, group_size, block_rows))
        replaced += 1
    return replaced


class LLaDAInt4Config(QuantizationConfigMixin):
    """`quantization_config` of the CPU int4 method: `group_size` input features per scale/zero pair (32, 64, 128 or
    256); `modules_to_not_convert` are kept dense, besides `lm_head` and the embeddings."""

    def __init__(self, group_size: int = 64, modules_to_not_convert: list[str] | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={group_size!r}: expected one of {GROUP_SIZES}")
        if isinstance(modules_to_not_convert, str):
            raise ValueError(
                f"modules_to_not_convert={modules_to_not_convert!r}: pass a list of module names, not a string"
            )
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert or [])


class Int4Quantize(ConversionOps):
    """Load-time quantization of one float weight (an expert container arrives merged and flattened)."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs) -> dict[str, torch.Tensor]:
        _, value = next(iter(input_dict.items()))
        value = value[0] if isinstance(value, list) else value
        prefix = full_layer_name.rsplit(".", 1)[0]
        module = model.get_submodule(prefix)
        rows, columns = value.shape
        # Block by block (an expert at a time): the float temporaries stay a few MiB, not a whole container's.
        nibbles = torch.zeros(rows, columns // 2, dtype=torch.uint8, device=value.device)
        pairs = torch.empty(
            rows // module.block_rows, columns // module.group_size, module.block_rows, 2, dtype=torch.bfloat16,
            device=value.device,
        )
        try:
            for block in range(rows // module.block_rows):
                part = slice(block * module.block_rows, (block + 1) * module.block_rows)
                nibbles[part], pairs[block : block + 1] = quantize_int4(
                    value[part], module.group_size, module.block_rows
                )
        except ValueError as error:
            # transformers would log a raised error and end with a vague RuntimeError: keep it instead (the bytes
            # stay zero), and the load raises it, naming the weight, once every weight is read
            # (`_process_model_after_weight_loading`).
            self.hf_quantizer.failures.append(f"{full_layer_name}: {error}")
        return {full_layer_name: nibbles, f"{prefix}.scales_and_zeros": pairs}


def own_int4_module(model: nn.Module) -> ModuleType:
    """The int4 module of `model`'s own code: this package's, or the copy beside a folder loaded with
    trust_remote_code. transformers keeps one quantizer per quant_method for the whole process (whichever copy
    registered first), and a model's experts recognise only their own copy's `Int4Linear`."""
    for cls in type(model).__mro__:
        own = getattr(sys.modules.get(cls.__module__), "Int4Linear", None)
        if isinstance(own, type) and issubclass(own, nn.Module):
            return sys.modules[own.__module__]
    return sys.modules[__name__]


class LLaDAInt4Quantizer(HfQuantizer):
    """transformers' side of the method: swaps the modules before loading, quantizes float weights as they load,
    packs them for the kernel after loading, and saves the plain layout."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        # Weights whose load-time quantization failed: raised after loading (transformers would only log them).
        self.failures: list[str] = []

    def validate_environment(self, *args, **kwargs):
        if not int4_supported():
            raise ImportError(f"quant_method={QUANT_METHOD!r} needs torch's CPU int4 kernel (torch >= 2.6)")
        check_cpu_device_map(kwargs.get("device_map"))

    def update_device_map(self, device_map):
        return {"": "cpu"} if device_map in (None, "auto") else device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized or not param_name.endswith(".weight"):
            return False
        try:
            module = model.get_submodule(param_name.rsplit(".", 1)[0])
        except AttributeError:
            return False
        return isinstance(module, own_int4_module(model).Int4Linear)

    def _process_model_before_weight_loading(self, model, **kwargs):
        skip = [*DEFAULT_SKIP_MODULES, *self.quantization_config.modules_to_not_convert]
        own_int4_module(model).replace_with_int4_linear(model, self.quantization_config.group_size, skip)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.failures:
            raise ValueError("int4 quantization failed while loading: " + "; ".join(self.failures))
        linear_class = own_int4_module(model).Int4Linear
        for module in model.modules():
            if isinstance(module, linear_class):
                module.pack_()
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def get_quantize_ops(self):
        return Int4Quantize(self)


def register_int4_method() -> None:
    """Make `quant_method: "llada_int4"` known to transformers (idempotent: remote code may import this twice)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, LLaDAInt4Config)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, LLaDAInt4Quantizer)


__all__ = [
    "GROUP_SIZES",
    "Int4Linear",
    "LLaDAInt4Config",
    "LLaDAInt4Quantizer",
    "QUANT_METHOD",
    "int4_experts_forward",
    "quantize_int4",
    "register_int4_method",
]
