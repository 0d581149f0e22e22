"""Load-time conversion between the official per-expert checkpoint keys and the flattened expert containers.

The official checkpoint stores every expert as three tensors (`mlp.experts.{e}.{gate,up,down}_proj.weight`). The
model keeps each layer's experts in two plain `nn.Linear` containers, `mlp.experts.gate_up` ([E*2I, H], expert e's
gate rows then its up rows) and `mlp.experts.down` ([E*H, I]), because bitsandbytes quantizes only exact
`nn.Linear` modules and the fused kernels want one contiguous stack. transformers applies these converters while
loading and reverses them in `save_pretrained`, so saved folders keep the official key set.
"""

from __future__ import annotations

import torch
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    ConversionOps,
    MergeModulelist,
    WeightConverter,
)


def _single_tensor(input_dict: dict[str, list[torch.Tensor] | torch.Tensor]) -> tuple[str, torch.Tensor]:
    if len(input_dict) != 1:
        raise ValueError(f"expected one stacked expert tensor, got {sorted(input_dict)}")
    key, tensors = next(iter(input_dict.items()))
    return key, tensors[0] if isinstance(tensors, list) else tensors


def _experts_module(model, layer_name: str | None):
    """The experts module a container weight named `layer_name` (`...mlp.experts.gate_up.weight`) belongs to."""
    if model is None or not layer_name:
        return None
    try:
        return model.get_submodule(layer_name.rsplit(".", 2)[0])
    except AttributeError:
        return None


class FlattenExperts(ConversionOps):
    """[E, out, in] expert stack -> [E*out, in], the weight of one `nn.Linear` container; only this rank's part of
    it when the experts are sharded (`LLaDAMoEExperts.local_part`: whole experts under expert parallelism, a slice
    of every expert's intermediate dimension under expert tensor parallelism)."""

    @torch.no_grad()
    def convert(
        self, input_dict, source_patterns, target_patterns, model=None, full_layer_name=None, **kwargs
    ) -> dict[str, torch.Tensor]:
        _, tensor = _single_tensor(input_dict)
        experts = _experts_module(model, full_layer_name)
        if hasattr(experts, "local_part"):
            container = full_layer_name.rsplit(".", 2)[1]
            return {target_patterns[0]: experts.local_part(container, tensor)}
        return {target_patterns[0]: tensor.reshape(-1, tensor.shape[-1])}

    @property
    def reverse_op(self) -> ConversionOps:
        return UnflattenExperts()


class UnflattenExperts(ConversionOps):
    """[E*out, in] container weight -> [E, out, in], with E read from the config (`num_experts`)."""

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, config=None, **kwargs) -> dict[str, torch.Tensor]:
        key, tensor = _single_tensor(input_dict)
        if tensor.dim() != 2 or tensor.shape[0] % config.num_experts:
            # A quantized container holds packed bytes that cannot be cut per expert (see quantization/).
            raise ValueError(
                f"cannot split {key} of shape {tuple(tensor.shape)} into {config.num_experts} experts; "
                "quantized models are saved in the flattened layout"
            )
        return {key: tensor.reshape(config.num_experts, -1, tensor.shape[-1])}

    @property
    def reverse_op(self) -> ConversionOps:
        return FlattenExperts()


def expert_weight_converters() -> list[WeightConverter]:
    """The two converters of one MoE layer: per-expert gate/up -> `gate_up`, per-expert down -> `down`."""
    return [
        WeightConverter(
            source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
            target_patterns="mlp.experts.gate_up.weight",
            operations=[MergeModulelist(dim=0), Concatenate(dim=1), FlattenExperts()],
        ),
        WeightConverter(
            source_patterns="mlp.experts.*.down_proj.weight",
            target_patterns="mlp.experts.down.weight",
            operations=[MergeModulelist(dim=0), FlattenExperts()],
        ),
    ]


def register_expert_conversion(model_type: str) -> None:
    """Register the converters for `model_type` (idempotent: remote code may import this module more than once)."""
    register_checkpoint_conversion_mapping(model_type, expert_weight_converters(), overwrite=True)
