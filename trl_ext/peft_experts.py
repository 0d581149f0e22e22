"""LoRA on the routed experts with PEFT: one low-rank adapter per expert, on `gate_up` and on `down`.

The experts keep their weights in two flattened `nn.Linear` containers (what bitsandbytes quantizes) and expose 3-D
views, which PEFT's `target_parameters` cannot find (they are properties, not `nn.Parameter`s). `ExpertsLoraLayer`
is a PEFT LoRA layer for the whole experts module, registered through PEFT's custom-module dispatch
(`LoraConfig._register_custom_module`): PEFT creates, trains, saves, loads, merges and unloads it like any LoRA
layer. Its factors have the layout of PEFT's `ParamWrapper` on a 3-D `[E, out, in]` parameter (`lora_A`: `[r*E,
in]`, `lora_B`: `[out, r*E]`, expert e's update `B[:, :, e] @ A[e]`); the `down` pair is `lora_down_A` /
`lora_down_B`.

While the adapter is active, the experts module adds the update to every weight it reads (`weight_delta`), after
dequantization: the eager, grouped_mm, batched_mm and grouped_mm_chunked backends and 4-bit / 8-bit experts (QLoRA)
all apply it. The fused Triton path falls back to grouped_mm_chunked with a warning while an adapter is active.

    config = experts_lora_config(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "experts"])
    model = peft.get_peft_model(model, config)         # or DiffusionSFTTrainer(..., peft_config=config)
    ...
    model = load_adapter(base_model, "adapter-dir")    # PeftModel.from_pretrained with the registration
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from modeling_llada_moe.modeling_llada_moe import LLaDAMoEExperts, is_quantized_container


PROJECTIONS = ("gate_up", "down")
UNSUPPORTED_OPTIONS = ("lora_dropout", "use_dora", "lora_bias", "fan_in_fan_out")


class ExpertsLoraLayer(nn.Module, LoraLayer):
    """Per-expert LoRA on `LLaDAMoEExperts`: `lora_A` / `lora_B` adapt `gate_up` ([E, 2I, H]), `lora_down_A` /
    `lora_down_B` adapt `down` ([E, H, I])."""

    adapter_layer_names = (*LoraLayer.adapter_layer_names, "lora_down_A", "lora_down_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        for option in UNSUPPORTED_OPTIONS:
            if getattr(config, option):
                raise ValueError(
                    f"LoraConfig.{option}={getattr(config, option)!r} does not work on the experts (target "
                    f"'{kwargs.get('target_name', 'experts')}'): use {option}=False/0 there, or drop 'experts' from "
                    "target_modules."
                )
        self.lora_down_A = nn.ModuleDict({})
        self.lora_down_B = nn.ModuleDict({})
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=kwargs.get("lora_alpha", config.lora_alpha), config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        experts = module
        self.num_experts = experts.num_experts
        self.shapes = {
            "gate_up": (2 * experts.intermediate_dim, experts.hidden_dim),
            "down": (experts.hidden_dim, experts.intermediate_dim),
        }
        return experts.hidden_dim, experts.hidden_dim

    def _pair(self, projection: str) -> tuple[nn.ModuleDict, nn.ModuleDict]:
        return (self.lora_A, self.lora_B) if projection == "gate_up" else (self.lora_down_A, self.lora_down_B)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        if r <= 0:
            raise ValueError(f"LoraConfig.r={r}: the rank must be a positive integer")
        init = config.init_lora_weights
        if init not in (True, False, "gaussian"):
            raise ValueError(
                f"LoraConfig.init_lora_weights={init!r} is not supported on the experts; use True, False or 'gaussian'"
            )
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if config.use_rslora else lora_alpha / r
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self.lora_dropout[adapter_name] = nn.Identity()
        weight = self.get_base_layer().gate_up.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        for projection in PROJECTIONS:
            out_features, in_features = self.shapes[projection]
            lora_a, lora_b = self._pair(projection)
            lora_a[adapter_name] = nn.Linear(in_features, r * self.num_experts, bias=False)
            lora_b[adapter_name] = nn.Linear(r * self.num_experts, out_features, bias=False)
            if init is not False:
                if init is True:
                    nn.init.kaiming_uniform_(lora_a[adapter_name].weight, a=math.sqrt(5))
                else:
                    nn.init.normal_(lora_a[adapter_name].weight, std=1 / r)
                nn.init.zeros_(lora_b[adapter_name].weight)
            lora_a[adapter_name].to(weight.device, dtype)
            lora_b[adapter_name].to(weight.device, dtype)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def delta(self, projection: str, adapter_name: str, first: int = 0, last: int | None = None) -> torch.Tensor:
        """The update of experts [first, last) of `projection` ("gate_up" / "down"): [c, out, in]."""
        last = self.num_experts if last is None else last
        lora_a, lora_b = self._pair(projection)
        weight_a = lora_a[adapter_name].weight  # [r*E, in]
        weight_b = lora_b[adapter_name].weight  # [out, r*E]
        weight_a = weight_a.view(self.num_experts, -1, weight_a.shape[-1])[first:last]  # [c, r, in]
        weight_b = weight_b.view(weight_b.shape[0], -1, self.num_experts)[..., first:last]  # [out, r, c]
        return torch.einsum("o r e, e r i -> e o i", weight_b, weight_a) * self.scaling[adapter_name]

    def _weight_delta(self, adapters: list[str]):
        def weight_delta(projection: str, first: int, last: int) -> torch.Tensor:
            return sum(self.delta(projection, name, first, last) for name in adapters)

        return weight_delta

    @contextlib.contextmanager
    def _adapting(self, adapters: list[str]) -> Iterator[None]:
        experts = self.get_base_layer()
        experts.weight_delta = self._weight_delta(adapters) if adapters else None
        try:
            yield
        finally:
            experts.weight_delta = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None:
            raise ValueError("adapter_names (mixed adapter batches) is not supported on the experts LoRA layer")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(hidden_states, *args, **kwargs)
        adapters = [] if self.merged else [name for name in self.active_adapters if name in self.lora_A]
        with self._adapting(adapters):
            return self.base_layer(hidden_states, *args, **kwargs)

    def get_delta_weight(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The updates of the two containers, flattened like their weights: {"gate_up": [E*2I, H], "down": [E*H, I]}."""
        return {
            projection: self.delta(projection, adapter_name).reshape(-1, self.shapes[projection][1])
            for projection in PROJECTIONS
        }

    def _containers(self) -> dict[str, nn.Linear]:
        experts = self.get_base_layer()
        containers = {projection: getattr(experts, projection) for projection in PROJECTIONS}
        if any(is_quantized_container(linear) for linear in containers.values()):
            raise ValueError(
                "merging a LoRA adapter into quantized expert containers is not supported (the packed 4-bit / int8 "
                "weights cannot hold the update): load the base model unquantized (bf16/fp32), attach the adapter "
                "with load_adapter, then merge_and_unload."
            )
        return containers

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        containers = self._containers()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            for projection, update in self.get_delta_weight(name).items():
                weight = containers[projection].weight
                merged = weight.data + update.to(weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights; the adapter {name} seems to be broken")
                weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        containers = self._containers()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                for projection, update in self.get_delta_weight(name).items():
                    weight = containers[projection].weight
                    weight.data -= update.to(weight.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_experts_lora(config: LoraConfig) -> LoraConfig:
    """`config` with the experts module mapped to `ExpertsLoraLayer` (PEFT's custom-module dispatch); returned for
    chaining. Needed wherever PEFT builds the layers: `get_peft_model`, the TRL trainers' `peft_config`, and loading."""
    config._register_custom_module({LLaDAMoEExperts: ExpertsLoraLayer})
    return config


def experts_lora_config(
    r: int = 16,
    lora_alpha: int = 32,
    target_modules: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "experts"),
    **kwargs,
) -> LoraConfig:
    """A `LoraConfig` whose "experts" target gets one adapter per expert on gate_up and down. `lora_dropout` must be
    0 on the experts (the update is folded into the weights, so the input cannot be dropped per expert)."""
    targets = list(target_modules)
    containers = [target for target in targets if target.rsplit(".", 1)[-1] in PROJECTIONS]
    if containers:
        raise ValueError(
            f"target_modules={targets!r} names the expert containers {containers}; the experts read their weights "
            "directly, so an adapter there would be skipped. Target 'experts' (one adapter per expert on both)."
        )
    kwargs.setdefault("lora_dropout", 0.0)
    return register_experts_lora(LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, **kwargs))


def load_adapter(model: nn.Module, path: str, adapter_name: str = "default", **kwargs) -> PeftModel:
    """`PeftModel.from_pretrained(model, path)` for an adapter saved with experts LoRA layers (PEFT does not save the
    custom-module registration, so it is redone here). Keyword arguments go to `PeftModel.from_pretrained`."""
    config = register_experts_lora(LoraConfig.from_pretrained(path))
    return PeftModel.from_pretrained(model, path, adapter_name=adapter_name, config=config, **kwargs)


__all__ = ["ExpertsLoraLayer", "experts_lora_config", "load_adapter", "register_experts_lora"]
