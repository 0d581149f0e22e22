"""LLaDA-MoE: a masked-diffusion language model with bidirectional attention and sparse SwiGLU experts.

Reads top to bottom in the order data flows: rotary helpers, attention, experts, router, MoE block, decoder layer,
pre-trained base, trunk and masked-LM head. The math follows the official `modeling_lladamoe.py` (see
`shared/reference/architecture.md` §3) with three deliberate differences: a 2-D `attention_mask` is honoured as a
key-padding mask, the router runs in fp32, and `labels` / `output_router_logits` work.
"""

import importlib.util
import inspect
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
from transformers.distributed.tensor_parallel import MoeExpertsParallel
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import (
    GENERATION_CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    ModelOutput,
    TransformersKwargs,
    can_return_tuple,
    logging,
)
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .atomic_save import check_folder_target, staged_save, weight_files
from .bnb_layout import (
    dequantize_4bit_rows,
    linears_4bit_cannot_take,
    restore_before_saving,
    use_portable_4bit_path,
    wants_4bit,
)
from .checkpoint_conversion import register_expert_conversion
from .configuration_llada_moe import LLaDAMoEConfig, read_json_object
from .expert_cache import ExpertWeightCache, cached_expert_weights, check_budget
from .generation_utils import DiffusionGenerationMixin
from .int4_cpu import Int4Linear, register_int4_method
from .moe_backends import grouped_mm_chunked_experts_forward


logger = logging.get_logger(__name__)
register_expert_conversion(LLaDAMoEConfig.model_type)
register_int4_method()


def at_least_fp32(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn`, a `Module._apply` conversion, except that a floating tensor it would make narrower than fp32 (bf16, fp16,
    fp8) becomes fp32 instead, converted from the original (no round trip through the narrow dtype); device moves
    and wider casts apply as asked."""

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        result = fn(tensor)
        if tensor.is_floating_point() and result.is_floating_point() and torch.finfo(result.dtype).bits < 32:
            return tensor.to(device=result.device, dtype=torch.float32)
        return result

    return convert


class KeepsFP32(nn.Module):
    """A module whose own parameters and buffers stay fp32 through `.to(dtype)`, `.half()`, `.bfloat16()` and any
    other `_apply` cast, as `_keep_in_fp32_modules_strict` keeps them at load; its children are cast as asked. So a
    model made bf16 in memory equals the same model saved and reloaded in bf16."""

    def _apply(self, fn, recurse=True):
        if recurse:
            for module in self.children():
                module._apply(fn)
        return super()._apply(at_least_fp32(fn), recurse=False)


class LLaDAMoERMSNorm(nn.Module):
    """RMSNorm with statistics in fp32, cast back to the input dtype before the weight multiply (OLMoE order)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LLaDAMoERotaryEmbedding(KeepsFP32):
    """RoPE; the inverse frequencies stay fp32 through dtype casts, as a model built or loaded in bf16 has them."""

    def __init__(self, config: LLaDAMoEConfig, device: torch.device | str | None = None):
        """`device`: where the inverse frequencies are computed and kept (the default device when None)."""
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config, device)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(
        config: LLaDAMoEConfig, device: torch.device | str | None = None, **kwargs
    ) -> tuple[torch.Tensor, float]:
        """inv_freq_j = theta^(-2j/d) over the rotary width d = head_dim * partial_rotary_factor."""
        base = config.rope_parameters["rope_theta"]
        dim = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first `cos.shape[-1]` dims of q and k (non-interleaved halves); the rest pass through."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat(((q_rot * cos) + (rotate_half(q_rot) * sin), q_pass), dim=-1)
    k_embed = torch.cat(((k_rot * cos) + (rotate_half(k_rot) * sin), k_pass), dim=-1)
    return q_embed, k_embed


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, T, D] -> [B, kv_heads * n_rep, T, D]."""
    if n_rep == 1:
        return hidden_states
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class LLaDAMoEAttention(nn.Module):
    """Bidirectional multi-head attention with per-head q/k RMSNorm before RoPE."""

    def __init__(self, config: LLaDAMoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, config.attention_bias)
        if config.qk_layernorm:
            # One [head_dim] weight shared by all heads, as in the checkpoint.
            self.q_norm = LLaDAMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LLaDAMoERMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        value_states = self.v_proj(hidden_states).view(hidden_shape)
        if self.config.qk_layernorm:
            query_states = self.q_norm(query_states)
            key_states = self.k_norm(key_states)
        if self.config.clip_qkv is not None:
            clip = self.config.clip_qkv
            query_states = query_states.clamp(-clip, clip)
            key_states = key_states.clamp(-clip, clip)
            value_states = value_states.clamp(-clip, clip)

        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = value_states.transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class LLaDAMoEMLP(nn.Module):
    """SwiGLU MLP: the dense layers (`moe_layer_freq[i] == 0`) and the optional shared expert."""

    def __init__(self, config: LLaDAMoEConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def dequantize_rows(linear: nn.Module, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, end) of an expert container's weight as a dense `dtype` tensor.

    The one place a quantized container is read: a plain `nn.Linear` gives a view (a cast only if `dtype` differs),
    a bitsandbytes 4-bit weight dequantizes only the packed bytes and absmax blocks of those rows (`bnb_layout`), an
    8-bit weight only those rows of int8 values times their scales. Expert-sized row ranges never straddle a
    quantization block.
    """
    if hasattr(linear, "base_layer"):
        # PEFT wrapped the container: the experts read its weight directly, so the adapter would be skipped.
        raise ValueError(
            "a PEFT adapter wraps an expert container (mlp.experts.gate_up / mlp.experts.down); the experts read "
            "the container weights directly and would skip it. Target the experts module instead "
            "(trl_ext.peft_experts.experts_lora_config: per-expert adapters), or the attention projections "
            "(quantization.qlora_target_modules)."
        )
    if isinstance(linear, Int4Linear):  # the CPU int4 method: whole experts, unpacked and scaled
        return linear.dequantize_rows(start, end, dtype)
    weight = linear.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes 4-bit (NF4 / FP4), any layout
        return dequantize_4bit_rows(weight, start, end, dtype)
    if weight.dtype == torch.int8:  # bitsandbytes LLM.int8: row-wise absmax scales SCB
        scales = getattr(weight, "SCB", None)
        if scales is None:
            raise ValueError("an int8 expert container has no SCB scales (was it quantized by bitsandbytes?)")
        return (weight[start:end].float() * (scales[start:end, None].float() / 127.0)).to(dtype)
    return weight[start:end].to(dtype)


def is_quantized_container(linear: nn.Module) -> bool:
    weight = getattr(linear, "weight", None)
    return weight is not None and not torch.is_floating_point(weight)


def merge_per_expert_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """`load_state_dict` of a state dict in the official per-expert layout (what `save_pretrained` writes, and what
    `Trainer` reloads checkpoints from with a raw `load_state_dict`): fold `{e}.gate_proj` / `{e}.up_proj` /
    `{e}.down_proj` into the `gate_up` / `down` containers, exactly as the load-time conversion does."""
    names = [f"{prefix}{e}.{proj}.weight" for e in range(module.num_experts) for proj in ("gate_proj", "up_proj")]
    if all(name in state_dict for name in names):
        pairs = [state_dict.pop(name) for name in names]
        state_dict[f"{prefix}gate_up.weight"] = torch.cat(pairs)
    downs = [f"{prefix}{e}.down_proj.weight" for e in range(module.num_experts)]
    if all(name in state_dict for name in downs):
        state_dict[f"{prefix}down.weight"] = torch.cat([state_dict.pop(name) for name in downs])


@use_experts_implementation
class LLaDAMoEExperts(nn.Module):
    """Routed SwiGLU experts, stored as two exact `nn.Linear` containers and exposed as 3-D stacks.

    `gate_up.weight` is [E*2I, H] (expert e: gate rows, then up rows) and `down.weight` is [E*H, I]. Plain
    `nn.Linear` modules are what bitsandbytes quantizes; `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] are the
    views every experts implementation (eager, grouped_mm, batched_mm, fused kernels) reads.
    """

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.expert_intermediate_size
        self.gate_up = nn.Linear(self.hidden_dim, self.num_experts * 2 * self.intermediate_dim, bias=False)
        self.down = nn.Linear(self.intermediate_dim, self.num_experts * self.hidden_dim, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.dense_cache: ExpertWeightCache | None = None  # set while a generation runs (expert_cache)
        self.register_load_state_dict_pre_hook(merge_per_expert_keys)

    # Set by a PEFT adapter on the experts (`trl_ext.peft_experts`) while it is active: called as
    # `weight_delta(name, first, last)` with name "gate_up" / "down", it returns the additive update of experts
    # [first, last) ([c, 2I, H] / [c, H, I]). Every read of the expert weights below adds it, so each experts backend
    # and the quantized path apply the adapter.
    weight_delta: Callable[[str, int, int], torch.Tensor] | None = None

    @property
    def gate_up_proj(self) -> torch.Tensor:
        """[E, 2I, H]; a view for plain weights (dequantized whole for quantized ones: prefer chunks())."""
        rows = self.gate_up.out_features
        weight = dequantize_rows(self.gate_up, 0, rows, self.dense_dtype).view(self.num_experts, -1, self.hidden_dim)
        return self._adapted("gate_up", weight, 0)

    @property
    def down_proj(self) -> torch.Tensor:
        """[E, H, I]; a view for plain weights (dequantized whole for quantized ones: prefer chunks())."""
        rows = self.down.out_features
        weight = dequantize_rows(self.down, 0, rows, self.dense_dtype).view(self.num_experts, self.hidden_dim, -1)
        return self._adapted("down", weight, 0)

    def _adapted(self, name: str, weight: torch.Tensor, first: int) -> torch.Tensor:
        if self.weight_delta is None:
            return weight
        return weight + self.weight_delta(name, first, first + weight.shape[0]).to(weight.dtype)

    @property
    def dense_dtype(self) -> torch.dtype:
        """dtype the weights are used in: the containers' own, or the model's when they are quantized."""
        if not self.is_quantized:
            return self.gate_up.weight.dtype
        dtype = getattr(self.config, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32

    @property
    def is_quantized(self) -> bool:
        return is_quantized_container(self.gate_up) or is_quantized_container(self.down)

    def dequantize_experts(self, first: int, last: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [c, 2I, H] and down [c, H, I] of experts [first, last) as dense `dtype` tensors."""
        rows_up, rows_down = 2 * self.intermediate_dim, self.hidden_dim
        gate_up = dequantize_rows(self.gate_up, first * rows_up, last * rows_up, dtype)
        down = dequantize_rows(self.down, first * rows_down, last * rows_down, dtype)
        gate_up = self._adapted("gate_up", gate_up.view(last - first, rows_up, self.hidden_dim), first)
        return gate_up, self._adapted("down", down.view(last - first, rows_down, -1), first)

    def keep_local_experts(self, rank: int, size: int) -> None:
        """Expert parallelism: keep only experts [rank*E/size, (rank+1)*E/size) (their contiguous rows of both
        containers); `num_experts` becomes the local count and ids given to `forward` are local. Called on the meta
        model before loading (`maybe_distribute_model`): the load-time conversion then keeps the same experts."""
        if size < 1 or self.num_experts % size:
            raise ValueError(
                f"ep_size={size} does not divide num_experts={self.num_experts}: use an ep_size that divides it "
                f"({[d for d in range(1, self.num_experts + 1) if self.num_experts % d == 0]})."
            )
        self._check_shardable("expert parallelism (DistributedConfig(ep_size=...))")
        local = self.num_experts // size
        self._resize_containers(local * 2 * self.intermediate_dim, local * self.hidden_dim, self.intermediate_dim)
        self.num_experts = local
        self.expert_shard = (rank, size)
        # transformers' grouped_mm / batched_mm skip the off-rank sentinel id when this is set.
        self._is_expert_parallel = True

    def keep_local_slice(self, rank: int, size: int) -> None:
        """Expert tensor parallelism: keep slice `rank` of `size` of every expert's intermediate dimension, that is
        its rows of gate and of up (`gate_up` becomes [E*2I/size, H]: expert e's gate slice, then its up slice) and
        its columns of down (`down` becomes [E*H, I/size]). Every expert runs on every rank and each rank's output is
        a partial sum (the `llada_moe_tp_experts` style all-reduces it). Called on the meta model before loading: the
        load-time conversion then keeps the same slices of the per-expert checkpoint tensors."""
        if size < 1 or self.intermediate_dim % size:
            raise ValueError(
                f"tp_size={size} does not divide expert_intermediate_size={self.intermediate_dim}: expert tensor "
                f"parallelism splits every expert's intermediate dimension evenly; use a tp_size that divides it, or "
                f"expert parallelism (DistributedConfig(tp_size={size}, ep_size={size})) if it divides num_experts="
                f"{self.num_experts}."
            )
        self._check_shardable("expert tensor parallelism (DistributedConfig(tp_size=...) without ep_size)")
        local = self.intermediate_dim // size
        self._resize_containers(self.num_experts * 2 * local, self.num_experts * self.hidden_dim, local)
        self.intermediate_dim = local
        self.expert_slice = (rank, size)

    def _check_shardable(self, how: str) -> None:
        weight = self.gate_up.weight
        if type(self.gate_up) is not nn.Linear or type(self.down) is not nn.Linear or not weight.is_floating_point():
            raise ValueError(
                f"{how} shards plain (bf16/fp16/fp32 nn.Linear) experts only, and these are quantized "
                f"({type(self.gate_up).__name__}, {weight.dtype} weights): packed quantized rows cannot be cut per "
                "expert. Load the model without quantization_config, or quantized without distributed_config."
            )
        if getattr(self, "expert_shard", None) or getattr(self, "expert_slice", None) or hasattr(weight, "placements"):
            raise ValueError(
                f"{how}: the experts are already sharded (by expert parallelism, expert tensor parallelism or FSDP); "
                "combine at most one of them with the experts (FSDP with tensor parallelism is not supported for the "
                "experts)."
            )

    def _resize_containers(self, gate_up_rows: int, down_rows: int, intermediate: int) -> None:
        """New empty (meta, before loading) weights of the local shapes: `gate_up` [gate_up_rows, H], `down`
        [down_rows, intermediate]."""
        for linear, shape in ((self.gate_up, (gate_up_rows, self.hidden_dim)), (self.down, (down_rows, intermediate))):
            weight = linear.weight
            linear.weight = nn.Parameter(weight.new_empty(shape), requires_grad=weight.requires_grad)
            linear.out_features, linear.in_features = shape

    def local_part(self, container: str, stack: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full checkpoint stack of the `container` ("gate_up" [E, 2I, H] or "down"
        [E, H, I]) as the container's weight, or the stack flattened when the experts are not sharded. A copy when
        sharded: a view would keep every expert's storage alive."""
        if getattr(self, "expert_shard", None):
            rank, size = self.expert_shard
            stack = stack.chunk(size)[rank].clone()
        elif getattr(self, "expert_slice", None):
            rank, size = self.expert_slice
            if container == "down":  # [E, H, I]: this rank's columns
                width = stack.shape[-1] // size
                stack = stack[..., rank * width : (rank + 1) * width].clone()
            else:  # [E, 2I, H]: expert e's gate rows [0, I), then its up rows [I, 2I); this rank's slice of each
                experts, rows, hidden = stack.shape
                width = rows // 2 // size
                stack = stack.view(experts, 2, rows // 2, hidden)[:, :, rank * width : (rank + 1) * width].clone()
        return stack.reshape(-1, stack.shape[-1])

    def dense_expert(self, index: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [2I, H] and down [H, I] of expert `index`, from the generation's cache when it holds them."""

        def dequantize() -> tuple[torch.Tensor, torch.Tensor]:
            gate_up, down = self.dequantize_experts(index, index + 1, dtype)
            return gate_up[0], down[0]

        if self.dense_cache is None:
            return dequantize()
        return self.dense_cache.get((id(self), index, dtype), dequantize)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # Expert-by-expert loop accumulating in expert-id order, like the official block (same bf16 rounding).
        final_hidden_states = torch.zeros_like(hidden_states)
        gate_up_proj, down_proj = self.gate_up_proj.to(hidden_states.dtype), self.down_proj.to(hidden_states.dtype)
        with torch.no_grad():
            # One class more than the experts: under expert parallelism a route to another rank's expert arrives as
            # id `num_experts` (weight 0), and is skipped.
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            gate, up = F.linear(current_state, gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current_hidden_states = F.linear(self.act_fn(gate) * up, down_proj[expert_idx])
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states


def llada_fused_experts_forward(
    self: LLaDAMoEExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """'llada_fused': the Triton fused-MoE kernels (dense or NF4 experts), imported on first use; needs triton."""
    if self.weight_delta is not None:
        # The kernels read the containers in place and would skip the adapter: run the dequantizing grouped_mm.
        logger.warning_once(
            "experts_implementation='llada_fused' does not apply a LoRA adapter on the experts; this forward uses "
            "'grouped_mm_chunked' instead. Merge the adapter (merge_and_unload) to use the fused kernels."
        )
        return grouped_mm_chunked_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    from .fused_moe import fused_moe_experts_forward

    return fused_moe_experts_forward(self, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register("grouped_mm_chunked", grouped_mm_chunked_experts_forward)
ALL_EXPERTS_FUNCTIONS.register("llada_fused", llada_fused_experts_forward)


class ExpertSlicesParallel(MoeExpertsParallel):
    """The `tp_plan` style "llada_moe_tp_experts" (expert tensor parallelism on the flattened containers): each rank
    keeps its slice of every expert's intermediate dimension (`LLaDAMoEExperts.keep_local_slice`), runs every
    routed expert on it, and the partial outputs are summed over the TP group (transformers' `moe_tp_experts`
    all-reduce, with the input gradients summed in backward). The slices stay plain tensors: a DTensor placement of
    the flattened [E*2I, H] rows could not be read from the per-expert checkpoint keys."""

    def install_forward(self, module: nn.Module, mesh) -> nn.Module:
        if not isinstance(module, LLaDAMoEExperts):
            raise ValueError(f"llada_moe_tp_experts shards LLaDAMoEExperts modules, not {type(module).__name__}")
        module.keep_local_slice(mesh.get_local_rank(), mesh.size())
        return super().install_forward(module, mesh)


if torch.distributed.is_available():
    ALL_PARALLEL_STYLES.register("llada_moe_tp_experts", ExpertSlicesParallel())


def default_experts_implementation() -> str:
    """The fused Triton kernels on CUDA with triton installed, else grouped_mm that dequantizes a group at a time."""
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        return "llada_fused"
    return "grouped_mm_chunked"


class LLaDAMoETopKRouter(KeepsFP32):
    """fp32 router: scores over all experts, top-k, optional renormalisation and scaling (none by default)."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.score_function = config.moe_router_score_function
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim, dtype=torch.float32))

    def forward(
        self, hidden_states: torch.Tensor, expert_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns fp32 router logits [N, E], routing weights [N, k] in the input dtype and expert ids [N, k]."""
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.float(), self.weight.float())
        if self.score_function == "softmax":
            scores = router_logits.softmax(dim=-1)
        else:
            scores = router_logits.sigmoid()
        if expert_bias is not None:
            # Official semantics: the biased scores both select the experts and weight their outputs.
            scores = scores + expert_bias.float()
        top_value, top_index = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        if self.routed_scaling_factor != 1.0:
            top_value = top_value * self.routed_scaling_factor
        return router_logits, top_value.to(hidden_states.dtype), top_index


class LLaDAMoESparseMoeBlock(KeepsFP32):
    """Router and experts; its own tensor, the optional `expert_bias` buffer, stays fp32 like the router."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__()
        self.gate = LLaDAMoETopKRouter(config)
        self.experts = LLaDAMoEExperts(config)
        if config.moe_router_enable_expert_bias:
            self.expert_bias = nn.Buffer(torch.zeros(config.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        _, top_k_weights, top_k_index = self.gate(hidden_states, self.expert_bias)
        final_hidden_states = self.experts(hidden_states, top_k_index, top_k_weights)
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)


class LLaDAMoEDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: h + Attn(norm(h)), then h + MLP(norm(h)) where MLP is the MoE block or a dense SwiGLU,
    plus the shared expert when configured."""

    def __init__(self, config: LLaDAMoEConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LLaDAMoEAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = LLaDAMoESparseMoeBlock(config)
        else:
            self.mlp = LLaDAMoEMLP(config, config.dense_intermediate_size)
        # Like the official layer, the shared expert hangs on the decoder layer (not under `mlp`) of every layer.
        if config.shared_expert_intermediate_size is not None:
            self.shared_expert = LLaDAMoEMLP(config, config.shared_expert_intermediate_size)
        self.input_layernorm = LLaDAMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LLaDAMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        mlp_output = self.mlp(hidden_states)
        if hasattr(self, "shared_expert"):
            mlp_output = mlp_output + self.shared_expert(hidden_states)
        return residual + mlp_output


ROUTER_FP32_PATTERN = r".*mlp\.gate(?=\.|$)"
EXPERT_BIAS_FP32_PATTERN = r".*mlp\.expert_bias"

MODEL_FILES_AUTO_MAP = {
    "AutoConfig": "configuration_llada_moe.LLaDAMoEConfig",
    "AutoModel": "modeling_llada_moe.LLaDAMoEForMaskedLM",
    "AutoModelForMaskedLM": "modeling_llada_moe.LLaDAMoEForMaskedLM",
}
# save_pretrained(push_to_hub=True, ...) options that belong to the upload, not to the files.
HUB_OPTIONS = ("repo_id", "commit_message", "commit_description", "private", "token", "revision", "create_pr", "tags")


def check_safetensors_header(path: Path) -> None:
    """A `ValueError` naming `path` when it is missing, empty, truncated or its header is damaged. safetensors'
    `safe_open` maps the file and parses the header only (it checks that the tensors cover the file exactly): no
    tensor is read."""
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"{str(path)!r}: the weights file is missing (named by the folder's weights index)")
    size = path.stat().st_size
    try:
        with safe_open(str(path), framework="pt") as weights:
            weights.keys()
    except Exception as err:  # safetensors' SafetensorError (header too small, truncated data, bad header JSON)
        raise ValueError(
            f"{str(path)!r} is a corrupt weights file ({size} bytes): {err}; re-download or re-save the checkpoint"
        ) from err


def check_local_checkpoint(folder: Path, variant: str | None, use_safetensors: bool | None, generation) -> list[Path]:
    """Check the files `from_pretrained` will read from the local `folder`, cheaply (small JSON files and the
    safetensors headers), so that a damaged one is a `ValueError` naming the file instead of an `AttributeError` /
    `TypeError` / `SafetensorError` from deep inside transformers: `generation_config.json` (read as the
    `generation` class, when not None: a value it refuses is its `ValueError` / `TypeError`, naming the file too),
    and the safetensors weights transformers picks (the single file, else the index and every shard it names).
    Returns the weights file, or the index, it checked (none when there is no safetensors file)."""
    generation_file = folder / GENERATION_CONFIG_NAME
    if generation is not None and generation_file.is_file():
        settings = read_json_object(generation_file, "generation config")
        try:
            generation.from_dict(settings)
        except (ValueError, TypeError) as err:
            if type(err) not in (ValueError, TypeError):
                raise
            raise type(err)(f"{str(generation_file)!r}: {err}") from err
    if use_safetensors is False:
        return []
    # transformers' variant naming: model.safetensors -> model.VARIANT.safetensors, and the index alike.
    named = [name.rsplit(".", 1) for name in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)]
    single, index = (folder / ".".join([stem, variant, end] if variant else [stem, end]) for stem, end in named)
    if single.is_file():
        check_safetensors_header(single)
        return [single]
    if index.is_file():
        weight_map = read_json_object(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ValueError(f"{str(index)!r} is a corrupt weights index: no `weight_map` of tensor name -> file name")
        for name in sorted(set(weight_map.values())):
            check_safetensors_header(folder / name)
        return [index]
    return []


# The RuntimeErrors transformers raises after its load report when the checkpoint does not fit the model the config
# describes: tensors of other shapes, experts its conversion cannot merge, state-dict errors.
MISMATCH_ERRORS = ("ignore_mismatched_sizes", "automatic conversion of the weights", "Error(s) in loading state_dict")


class LLaDAMoEPreTrainedModel(PreTrainedModel):
    config: LLaDAMoEConfig
    config_class = LLaDAMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDAMoEDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    # The router (`mlp.gate`) and the expert bias stay fp32 under bf16 and fp16: the strict list (the other one acts
    # under fp16 only). Neither is an `nn.Linear`, so bitsandbytes never quantizes them. The lookahead keeps the
    # pattern off the dense MLP's `mlp.gate_proj`; post_init drops a pattern the config builds no module for.
    _keep_in_fp32_modules_strict = [ROUTER_FP32_PATTERN, EXPERT_BIAS_FP32_PATTERN]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    _can_record_outputs = {
        "router_logits": OutputRecorder(LLaDAMoETopKRouter, index=0),
        "hidden_states": LLaDAMoEDecoderLayer,
        "attentions": LLaDAMoEAttention,
    }

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        return super().get_correct_experts_implementation(requested_experts or default_experts_implementation())

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers looks for the decorator in the source file of the model class; say it directly instead.
        return True

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        """transformers' tensor / expert / FSDP2 sharding, adapted to the flattened expert containers, whose rows are
        read from per-expert checkpoint keys one expert at a time (a Shard(0) DTensor of [E*2I, H] would get the
        wrong rows of each expert):

        - expert parallelism: each rank first keeps only its own experts, whole; transformers' `ep_dispatch_experts`
          then routes tokens to them and the load-time conversion reads only them;
        - FSDP2 without expert parallelism: each experts module is its own `fully_shard` unit, sharded on the input
          dimension (Shard(1): every expert's rows split alike, which per-expert keys are read into exactly), before
          transformers shards the decoder layers around it.

        Expert tensor parallelism (`tp_size` without `ep_size`) needs nothing here: the plan's `llada_moe_tp_experts`
        style (`ExpertSlicesParallel`) cuts the containers when transformers applies the TP plan.
        """
        if mesh_manager is None:
            return super().maybe_distribute_model(model, distributed_config, mesh_manager)
        experts = [module for module in model.modules() if isinstance(module, LLaDAMoEExperts)]
        if distributed_config.ep_size > 1:
            plan = {**model.ep_plan, **(distributed_config.ep_plan or {})}
            rules = {style for name, style in plan.items() if name.endswith("layers.*.mlp.experts")}
            if rules == {"ep_dispatch_experts"}:
                ep_mesh = mesh_manager.get_mesh("ep")
                for module in experts:
                    module.keep_local_experts(ep_mesh.get_local_rank(), ep_mesh.size())
        elif distributed_config.dp_size > 1 and experts:
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor import Shard
            from transformers.distributed.fsdp import _get_fsdp_policy_kwargs

            names = ("dp_replicate", "fsdp") if distributed_config.dp_replicate_size > 1 else "fsdp"
            mesh = mesh_manager.get_mesh(names)
            policy = _get_fsdp_policy_kwargs(distributed_config)
            for module in experts:
                fully_shard(module, mesh=mesh, shard_placement_fn=lambda param: Shard(1), **policy)
        return super().maybe_distribute_model(model, distributed_config, mesh_manager)

    def post_init(self) -> None:
        super().post_init()
        # transformers expects every listed pattern to name a module of this model.
        if not any(self.config.moe_layer_freq):
            self._keep_in_fp32_modules_strict.discard(ROUTER_FP32_PATTERN)
        if not (any(self.config.moe_layer_freq) and self.config.moe_router_enable_expert_bias):
            self._keep_in_fp32_modules_strict.discard(EXPERT_BIAS_FP32_PATTERN)
        # bitsandbytes 4-bit on CPU depends on the host unless kept on its standard layout (see bnb_layout).
        self.register_forward_pre_hook(use_portable_4bit_path)
        self.register_state_dict_pre_hook(restore_before_saving)
        if wants_4bit(self.config) and self.base_model is self:
            # The trunk lists them relative to itself; transformers gathers children's lists into the LM's, and its
            # bitsandbytes quantizer skips every module those lists name.
            self._keep_in_fp32_modules.update(linears_4bit_cannot_take(self))

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, LLaDAMoETopKRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, LLaDAMoESparseMoeBlock) and module.expert_bias is not None:
            init.zeros_(module.expert_bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs):
        """transformers' `from_pretrained`. From a local folder, the files it reads are checked first (the small JSON
        files and the safetensors headers only): a `generation_config.json` that is not a JSON object, an empty,
        truncated or damaged `.safetensors`, a weights index that names a missing shard are a `ValueError` naming the
        file (a damaged `config.json` is, through `LLaDAMoEConfig.from_pretrained`). A `config.json` whose sizes no
        longer match the weights is a `ValueError` naming it too (transformers raises a `RuntimeError` asking for
        `ignore_mismatched_sizes`). Weights the config has no place for, or lacks, stay transformers' warning here;
        the command line refuses them."""
        folder, weights = None, []
        if pretrained_model_name_or_path is not None and kwargs.get("gguf_file") is None:
            folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
            if folder.is_dir():
                reads_generation_file = cls.can_generate() and kwargs.get("generation_config") is None
                generation = getattr(cls, "generation_config_class", None) if reads_generation_file else None
                use_safetensors = kwargs.get("use_safetensors")
                weights = check_local_checkpoint(folder, kwargs.get("variant"), use_safetensors, generation)
            else:
                folder = None
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except RuntimeError as err:
            if folder is None or not any(words in str(err) for words in MISMATCH_ERRORS):
                raise
            config = "the given config" if kwargs.get("config") is not None else repr(str(folder / "config.json"))
            files = ", ".join(repr(str(path)) for path in weights) or f"the weights of {str(folder)!r}"
            raise ValueError(
                f"{config} does not match {files}: tensors of other shapes than the config gives them, or experts "
                f"that cannot be merged (transformers' load report above lists them); a damaged or edited file? {err}"
            ) from err

    def save_pretrained(self, save_directory: str | Path, *args, **kwargs) -> None:
        """Save weights (official per-expert keys), config with `auto_map`, the model code and a model card (the
        generation config too, for the LM), so the folder loads with `trust_remote_code=True` anywhere.

        The save is all-or-nothing (`atomic_save.staged_save`): everything is written into a staging folder first
        and committed by renames, so a save that fails (a full disk, an interrupt) leaves the folder as it was. The
        weight files of an earlier save that a load of the folder would read (`model.safetensors`, the shards and
        their index, PyTorch `.bin` files, all of the same `variant`) are replaced: transformers itself only removes
        unused shards, so an unsharded file left next to a new index would be loaded instead of it. A path that is an
        existing file is a ValueError (transformers only logs it)."""
        if any(getattr(module, "expert_shard", None) for module in self.modules()):
            raise ValueError(
                "this model was loaded with expert parallelism (DistributedConfig(ep_size=...)): each rank holds part "
                "of the experts, so save_pretrained cannot write the checkpoint; save from a model loaded without "
                "ep_size."
            )
        if any(getattr(module, "expert_slice", None) for module in self.modules()):
            raise ValueError(
                "this model was loaded with expert tensor parallelism (DistributedConfig(tp_size=...)): each rank "
                "holds a slice of every expert, so save_pretrained cannot write the checkpoint; save from a model "
                "loaded without tp_size."
            )
        if getattr(self, "hf_quantizer", None) is not None:
            # Packed 4-bit bytes and int8 rows cannot be cut back into per-expert tensors: a quantized model is saved
            # in its own flattened layout, which reloads exactly (transformers' reverse conversion would fail).
            if kwargs.get("save_original_format"):
                raise ValueError(
                    "save_original_format=True: a quantized LLaDA-MoE cannot be written in the official per-expert "
                    "layout; save it without that flag (the flattened layout reloads bit-exactly)."
                )
            kwargs["save_original_format"] = False
        auto_map = dict(MODEL_FILES_AUTO_MAP)
        if not isinstance(self, LLaDAMoEForMaskedLM):
            auto_map["AutoModel"] = f"modeling_llada_moe.{type(self).__name__}"
        self.config.auto_map = auto_map
        folder = check_folder_target(save_directory)
        options = inspect.signature(PreTrainedModel.save_pretrained).bind(self, save_directory, *args, **kwargs)
        options = {name: value for name, value in options.arguments.items() if name not in {"self", "save_directory"}}
        options.update(options.pop("kwargs", {}))
        if not options.get("is_main_process", True):
            super().save_pretrained(save_directory, *args, **kwargs)  # another rank writes the folder
            return
        hub = {key: options.pop(key) for key in HUB_OPTIONS if key in options}
        hub["repo_id"] = hub.get("repo_id") or folder.name
        push = options.pop("push_to_hub", False)
        adapters_only = getattr(self, "_hf_peft_config_loaded", False)
        variant = options.get("variant")
        with staged_save(folder, None if adapters_only else lambda path: weight_files(path, variant)) as staging:
            super().save_pretrained(staging, **options)
            source = Path(__file__)
            for path in [source, *get_relative_import_files(str(source))]:
                shutil.copyfile(path, staging / Path(path).name)
            if not (folder / "README.md").exists():
                (staging / "README.md").write_text(model_card(self.config, type(self).__name__))
        if push:  # uploads a fresh save of the same model, code files and card included
            self.push_to_hub(hub.pop("repo_id"), **hub, max_shard_size=options.get("max_shard_size", "50GB"))


class LLaDAMoEModel(LLaDAMoEPreTrainedModel):
    """The trunk: embeddings, decoder layers and final norm; returns the normed hidden states."""

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        # No padding_idx: the pad row is <|endoftext|>, which LLaDA fine-tuning trains on (the official
        # padding_idx would freeze its gradient).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [LLaDAMoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LLaDAMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LLaDAMoERotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch, past + seq)`, *optional*):
            1 for real tokens, 0 for padding. Padding is masked out as keys (attention stays bidirectional). When
            `position_ids` is not given, positions count real tokens only, so a left-padded row sees the positions
            it would have alone. A 4-D additive or boolean mask is used as given.
        past_key_values (`Cache`, *optional*):
            Keys/values (after RoPE) the new tokens attend to besides each other. `get_seq_length()` is the position
            of the first new token and `get_mask_sizes()` the attended length: a `DynamicCache` appends, the
            generator's `DiffusionBlockCache` replaces one block of a cached canvas.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LLaDAMoEModel.forward: pass exactly one of `input_ids` or `inputs_embeds`.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        batch_size, seq_len = inputs_embeds.shape[:2]

        if attention_mask is not None and attention_mask.dim() == 2:
            kv_length = past_key_values.get_mask_sizes(seq_len, 0)[0] if past_key_values is not None else seq_len
            expected = (batch_size, kv_length)
            if tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"LLaDAMoEModel.forward: attention_mask has shape {tuple(attention_mask.shape)}; expected "
                    f"{expected} (batch, cached + new tokens)."
                )
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                position_ids = positions[:, past_seen : past_seen + seq_len]
            else:
                position_ids = torch.arange(seq_len, device=inputs_embeds.device).unsqueeze(0) + past_seen

        mask = create_bidirectional_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


def _flat_token_mask(attention_mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """The [N] 0/1 weights of the tokens the router saw (the last columns of a mask that also covers a cache)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    seq_len = num_tokens // attention_mask.shape[0]
    return attention_mask[:, -seq_len:].reshape(-1).float()


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-style load-balancing loss: E * sum_e f_e * P_e over all MoE layers' tokens (padding excluded).

    f_e is the fraction of top-k slots routed to expert e (summed over the k slots), P_e the mean router probability.
    """
    logits = torch.cat([layer_logits.float() for layer_logits in router_logits], dim=0)
    probs = logits.softmax(dim=-1)
    _, selected = torch.topk(probs, top_k, dim=-1)
    counts = F.one_hot(selected, num_experts).float().sum(dim=1)  # [N, E]
    weights = _flat_token_mask(attention_mask, router_logits[0].shape[0])
    if weights is None:
        weights = torch.ones(logits.shape[0], device=logits.device)
    else:
        weights = weights.to(logits.device).repeat(len(router_logits))
    total = weights.sum().clamp(min=1.0)
    tokens_per_expert = (counts * weights[:, None]).sum(0) / total
    prob_per_expert = (probs * weights[:, None]).sum(0) / total
    return num_experts * (tokens_per_expert * prob_per_expert).sum()


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the MoE layers' (unpadded) tokens of logsumexp(router logits)^2."""
    logits = torch.cat([layer_logits.float() for layer_logits in router_logits], dim=0)
    z = torch.logsumexp(logits, dim=-1).square()
    weights = _flat_token_mask(attention_mask, router_logits[0].shape[0])
    if weights is None:
        return z.mean()
    weights = weights.to(z.device).repeat(len(router_logits))
    return (z * weights).sum() / weights.sum().clamp(min=1.0)


def masked_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy over positions whose label is not `ignore_index` (position-aligned: no shift), in fp32.

    transformers' loss-function signature (`ForMaskedLMLoss`): the mean over this batch's scored positions (0 if
    there are none), or, with `num_items_in_batch` (what `Trainer` passes: the scored positions of the whole
    accumulated step), their sum divided by it, so the micro-batch losses of one step add up to the step's mean.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)}; expected {tuple(logits.shape[:-1])}, one label per position "
            f"({ignore_index} for positions without loss)."
        )
    if vocab_size is not None and logits.shape[-1] != vocab_size:
        raise ValueError(f"logits have {logits.shape[-1]} scores per position; expected vocab_size={vocab_size}")
    labels = labels.to(logits.device)
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    if num_items_in_batch is None:
        return total / (labels != ignore_index).sum().clamp(min=1)
    return total / torch.as_tensor(num_items_in_batch, device=total.device)


@dataclass
class LLaDAMoEMaskedLMOutput(ModelOutput):
    """
    loss: masked-position cross-entropy (`masked_lm_loss`: the mean, or the sum over `num_items_in_batch`), plus
        `router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss` when router logits are requested (times this
        batch's share of the `num_items_in_batch` labels, when given). aux_loss / z_loss: the load-balancing and
        router z-losses of this batch.
    logits: [B, T, V] position-aligned scores, in the parameter dtype.
    router_logits: one fp32 [B*T, E] tensor per MoE layer.
    """

    loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


class LLaDAMoEForMaskedLM(DiffusionGenerationMixin, LLaDAMoEPreTrainedModel):
    """Trunk + `lm_head`: position-aligned token scores for masked-diffusion decoding and training."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # FSDP2 (`DistributedConfig(fsdp_size=...)`): the head stays gathered from forward to backward, like the final norm.
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: LLaDAMoEConfig):
        super().__init__(config)
        self.model = LLaDAMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # Bytes of dequantized experts a generation may keep (expert_cache): None = half the available memory.
    expert_cache_bytes: int | None = None

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def diffusion_generate(self, *args, **kwargs):
        # Quantized experts are dequantized once per generation while the cache budget lasts (expert_cache).
        budget = check_budget(self.expert_cache_bytes, "expert_cache_bytes")
        with cached_expert_weights(self, budget):
            return super().diffusion_generate(*args, **kwargs)

    diffusion_generate.__doc__ = DiffusionGenerationMixin.diffusion_generate.__doc__

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @property
    def loss_function(self) -> Callable:
        """`masked_lm_loss` (position-aligned, `num_items_in_batch`-aware), or what was set with
        `model.loss_function = fn` (transformers' signature: logits, labels, vocab_size, num_items_in_batch=...)."""
        return getattr(self, "_loss_function", masked_lm_loss)

    @loss_function.setter
    def loss_function(self, value: Callable) -> None:
        self._loss_function = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LLaDAMoEMaskedLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
            Target ids at the positions to score and -100 elsewhere; `loss` is their mean cross-entropy (scored by
            `self.loss_function`, `masked_lm_loss` unless set).
        num_items_in_batch (`torch.Tensor` or `int`, *optional*, a keyword):
            Scored positions of the whole optimizer step, as `Trainer` passes under gradient accumulation: the
            cross-entropy is summed and divided by it, and the router losses enter with this batch's share of it, so
            the accumulated micro-batch losses add up to what one batch of the whole step gives.
        output_router_logits (`bool`, *optional*):
            Return each MoE layer's router logits and add the weighted load-balancing and z-losses to `loss`.
        logits_to_keep (`int` or `torch.Tensor`, *optional*):
            Compute logits for the last `n` positions only (0 = all), for the given position indices, or, with a
            [B, T] bool mask, for the selected positions only (logits [N, V]; the masked-token training path).
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if output_router_logits and self._reentrant_checkpointing_active():
            raise ValueError(
                "output_router_logits=True under reentrant gradient checkpointing (use_reentrant=True): its first "
                "forward runs without autograd, so the router losses would get no gradient. Enable checkpointing "
                "with {'use_reentrant': False} (the transformers default) or disable the router losses."
            )
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dtype == torch.bool:
            # A [B, T] position mask: logits of the selected positions only, [N, V] (training scores masked tokens)
            if labels is not None or logits_to_keep.shape != outputs.last_hidden_state.shape[:2]:
                raise ValueError(
                    f"logits_to_keep as a bool mask must have shape {tuple(outputs.last_hidden_state.shape[:2])} and "
                    "comes without labels (score the selected logits yourself)"
                )
            hidden_states = outputs.last_hidden_state[logits_to_keep]
        else:
            hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = aux_loss = z_loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch)
        if output_router_logits and outputs.router_logits:
            aux_loss = load_balancing_loss(
                outputs.router_logits, self.config.num_experts, self.config.num_experts_per_tok, attention_mask
            )
            z_loss = router_z_loss(outputs.router_logits, attention_mask)
            if loss is not None:
                router_loss = self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
                if num_items_in_batch is not None:
                    # Trainer adds up the micro-batch losses of a step: weighting each batch's (mean) router losses by
                    # its share of the step's labels adds them once, as a label-weighted mean, not once per batch.
                    scored = (labels != -100).sum().to(router_loss.device)
                    router_loss = router_loss * scored / torch.as_tensor(num_items_in_batch, device=scored.device)
                loss = loss + router_loss

        return LLaDAMoEMaskedLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def _reentrant_checkpointing_active(self) -> bool:
        if not (self.training and torch.is_grad_enabled()):
            return False
        for layer in self.model.layers:
            if layer.gradient_checkpointing:
                keywords = getattr(getattr(layer, "_gradient_checkpointing_func", None), "keywords", {})
                return bool(keywords.get("use_reentrant", True))
        return False


# The official class name, as in the checkpoint's `architectures`.
LLaDAMoEModelLM = LLaDAMoEForMaskedLM


def model_card(config: LLaDAMoEConfig, class_name: str) -> str:
    """A model card README for a saved folder: usage with `trust_remote_code` and the architecture table."""
    rows = [
        ("layers", config.num_hidden_layers),
        ("hidden size", config.hidden_size),
        ("attention heads (KV heads)", f"{config.num_attention_heads} ({config.num_key_value_heads})"),
        ("experts (top-k)", f"{config.num_experts} ({config.num_experts_per_tok})"),
        ("expert intermediate size", config.expert_intermediate_size),
        ("MoE layers", f"{sum(config.moe_layer_freq)} of {config.num_hidden_layers}"),
        ("vocabulary", config.vocab_size),
        ("RoPE theta", config.rope_parameters["rope_theta"]),
        ("mask token id", config.mask_token_id),
    ]
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:  # a dict once saved, a BitsAndBytesConfig on a loaded model
        settings = quantization if isinstance(quantization, dict) else quantization.to_dict()
        bits = "4-bit " + settings.get("bnb_4bit_quant_type", "") if settings.get("load_in_4bit") else "8-bit LLM.int8"
        rows.append(("weights", f"bitsandbytes {bits.strip()} (attention and experts; needs bitsandbytes)"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""---
library_name: transformers
tags:
- llada-moe
- masked-diffusion
- mixture-of-experts
- custom_code
---

# LLaDA-MoE ({class_name})

A masked-diffusion language model with bidirectional attention and a sparse Mixture-of-Experts backbone, saved by
the `llada-moe` package. The folder carries its model code, so it loads without the package installed.

```python
import torch
from transformers import AutoModel

model = AutoModel.from_pretrained("<this folder or repo>", trust_remote_code=True, dtype=torch.bfloat16)
logits = model(input_ids).logits  # position-aligned scores; masked positions hold mask id {config.mask_token_id}
```

## Architecture

| field | value |
| --- | --- |
{table}
"""


__all__ = [
    "LLaDAMoEForMaskedLM",
    "LLaDAMoEModel",
    "LLaDAMoEModelLM",
    "LLaDAMoEPreTrainedModel",
]
