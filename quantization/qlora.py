"""QLoRA on a bitsandbytes 4/8-bit LLaDA-MoE: k-bit preparation and LoRA targets the experts path honours."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn


# LoRA targets: the attention projections, and the dense / shared MLP projections where a config has them. The
# expert containers (`mlp.experts.gate_up` / `mlp.experts.down`) are read as weight stacks by the fused experts
# path, so an adapter there would never run; the router (`mlp.gate`) is a plain fp32 parameter, not a Linear.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
EXPERT_CONTAINER = re.compile(r"(^|\.)mlp\.experts\.(gate_up|down)$")


def qlora_target_modules(model: nn.Module) -> list[str]:
    """The LoRA `target_modules` for `model`: attention projections, plus dense/shared MLP projections if present."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [target for target in (*ATTENTION_TARGETS, *MLP_TARGETS) if target in names]


def check_lora_targets(model: nn.Module, target_modules: str | Iterable[str]) -> None:
    """Raise `ValueError` if `target_modules` would wrap an expert container (the adapter would be skipped)."""
    names = [name for name, _ in model.named_modules()]
    if isinstance(target_modules, str):
        hits = [name for name in names if re.fullmatch(target_modules, name) and EXPERT_CONTAINER.search(name)]
    else:
        targets = set(target_modules)
        hits = [
            name
            for name in names
            if EXPERT_CONTAINER.search(name) and (name.rsplit(".", 1)[-1] in targets or name in targets)
        ]
    if hits:
        raise ValueError(
            f"LoRA target_modules={target_modules!r} would wrap the expert containers {hits[:2]}...; the experts "
            "read those weights directly, so the adapter would be skipped. Use quantization.qlora_target_modules"
            "(model) (attention and dense MLP projections)."
        )


def prepare_for_qlora(
    model: nn.Module,
    lora_config=None,
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    gradient_checkpointing: bool = True,
):
    """k-bit preparation (fp32 norms/embeddings, input grads, non-reentrant checkpointing) and a LoRA `PeftModel`.

    `lora_config` (a `peft.LoraConfig`) overrides the defaults built from `r`, `lora_alpha`, `lora_dropout` and
    `qlora_target_modules(model)`; its targets are checked against the expert containers. A CPU int4 model
    (`method="int4"`) is refused: torch's int4 kernel computes no gradients.
    """
    int4 = [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "scales_and_zeros", None), torch.Tensor)
    ]
    if int4:
        raise ValueError(
            f"prepare_for_qlora: the model holds CPU int4 weights (quant_method 'llada_int4': {int4[0]}, ...), which "
            "cannot be trained (torch's int4 kernel has no backward, and PEFT does not wrap Int4Linear); for QLoRA "
            "load the base with load_quantized(..., bits=4, method='nf4') (bitsandbytes)"
        )
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if lora_config is None:
        lora_config = LoraConfig(
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=qlora_target_modules(model)
        )
    check_lora_targets(model, lora_config.target_modules)
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return get_peft_model(model, lora_config)
