"""Checks and steps shared by the three trainers (`DiffusionSFTTrainer`, `VRPOTrainer`, `DiffusionGRPOTrainer`) and
their configs: the field checks of a config's `__post_init__`, TRL's own aux-loss path refused, the policy loaded by
name, fresh (unpatched) policy and reference, LoRA targets, the mask id in the vocabulary, the EOS id, and the model
config's router settings kept across TRL's `__init__`."""

from __future__ import annotations

import contextlib
import math

import torch
from accelerate.utils import is_peft_model

from .data_checks import check_mask_token_id


ROUTER_SETTINGS = ("router_aux_loss_coef", "output_router_logits")


# ---- config fields ----


def check_number(config, name: str, ok, accepted: str) -> None:
    """`config.<name>` is a finite real number (not a bool) for which `ok` holds; else a ValueError."""
    value = getattr(config, name)
    real = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not real or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name}={value!r}: expected {accepted}")


def check_integer(config, name: str, ok, accepted: str, optional: bool = False) -> None:
    """`config.<name>` is an int (not a bool) for which `ok` holds, or None when `optional`; else a ValueError."""
    value = getattr(config, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise ValueError(f"{name}={value!r}: expected {accepted}")


def check_flag(config, name: str, optional: bool = False) -> None:
    """`config.<name>` is True or False (or None when `optional`); else a ValueError."""
    value = getattr(config, name)
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ValueError(f"{name}={value!r}: expected True or False{' or None' if optional else ''}")


def check_choice(config, name: str, choices) -> None:
    """`config.<name>` is one of the strings `choices`; else a ValueError."""
    value = getattr(config, name)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")


def check_mask_token_id_field(config) -> None:
    """`config.mask_token_id`: None (the model config's) or a token id."""
    check_integer(
        config, "mask_token_id", lambda v: v >= 0, "None (the model config's) or a token id (an int >= 0)", True
    )


def refuse_router_aux_loss(config, advice: str) -> None:
    """TRL's own MoE aux-loss path stays off: `router_aux_loss_coef` must be None or 0.0 (set to 0.0)."""
    if config.router_aux_loss_coef not in (None, 0.0):
        raise ValueError(f"router_aux_loss_coef={config.router_aux_loss_coef!r}: {advice}")
    config.router_aux_loss_coef = 0.0


# ---- trainer construction ----


def load_policy(model, args, quantization_config=None):
    """A model given by name loaded as LLaDA-MoE (float32 unless `args.model_init_kwargs` says otherwise, with
    `quantization_config`); returns the model and the quantization config still to pass to TRL (None once used)."""
    if not isinstance(model, str):
        return model, quantization_config
    from modeling_llada_moe import LLaDAMoEForMaskedLM

    init_kwargs = {"dtype": torch.float32, **(args.model_init_kwargs or {})}
    if quantization_config is not None:
        init_kwargs["quantization_config"] = quantization_config
    return LLaDAMoEForMaskedLM.from_pretrained(model, **init_kwargs), None


def forward_runs_another_module(model) -> bool:
    """Whether `model.forward` is an instance attribute whose wrapped callables are bound to a different module.

    TRL patches `forward` on the instance with a closure over the original bound `forward`; `copy.deepcopy` rebinds
    the outer method to the copy but keeps the closure, so the copy silently runs the original's weights.
    """
    base = model.get_base_model() if is_peft_model(model) else model
    pending, seen = [vars(base).get("forward")], set()
    while pending:
        function = pending.pop()
        if function is None or not callable(function) or id(function) in seen:
            continue
        seen.add(id(function))
        owner = getattr(function, "__self__", None)
        if isinstance(owner, torch.nn.Module) and owner is not base:
            return True
        inner = getattr(function, "__func__", function)
        for cell in getattr(inner, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                pending.append(cell.cell_contents)
        pending.append(getattr(inner, "__wrapped__", None))
    return False


def check_models(model, ref_model, peft_config) -> None:
    """Policy and reference are not TRL-patched copies of another model, and the LoRA targets of `peft_config` name
    modules that LoRA can wrap in this model."""
    for name, candidate in (("model", model), ("ref_model", ref_model)):
        if candidate is not None and forward_runs_another_module(candidate):
            raise ValueError(
                f"{name}.forward is patched on the instance and runs another model's weights, as in a "
                "copy.deepcopy of a model that a TRL trainer already patched. Build it fresh (load it again, or "
                "construct it and load_state_dict) before creating any trainer."
            )
    if peft_config is not None and getattr(peft_config, "target_modules", None) is not None:
        from quantization import check_lora_targets

        check_lora_targets(model, peft_config.target_modules)


def check_mask_in_vocab(mask_token_id, config, tokenizer, setting: str) -> None:
    """The mask id is in the model's vocabulary and differs from every EOS and pad id (`setting` names where to set
    it)."""
    if mask_token_id is None or not 0 <= mask_token_id < config.vocab_size:
        raise ValueError(
            f"mask_token_id={mask_token_id} is not in the vocabulary [0, {config.vocab_size}); set {setting}"
        )
    check_mask_token_id(mask_token_id, config=config, tokenizer=tokenizer)


def resolve_mask_token_id(args, config, tokenizer, setting: str) -> int:
    """`args.mask_token_id`, else the model config's, checked (`check_mask_in_vocab`)."""
    mask_token_id = args.mask_token_id if args.mask_token_id is not None else config.mask_token_id
    check_mask_in_vocab(mask_token_id, config, tokenizer, setting)
    return mask_token_id


def eos_token_id(tokenizer, config):
    """The tokenizer's EOS id, else the model config's (its first when a list); None when neither has one."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and config is not None:
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    return eos


def router_settings(config) -> dict:
    """The model config's router settings, which TRL's `__init__` overwrites (`restore_router_settings` puts them
    back)."""
    return {name: getattr(config, name, None) for name in ROUTER_SETTINGS}


def restore_router_settings(config, saved: dict) -> None:
    """Put back the router settings `router_settings` read (those that were set; they are saved with the model)."""
    for name, value in saved.items():
        if value is not None:
            setattr(config, name, value)


# ---- loss ----


def step_share_of_loss(trainer, loss, outputs, router_losses: bool, num_items_in_batch):
    """A micro-batch's loss normalised by the whole step's `num_items_in_batch`: times the process count when that
    counts every process's items (DDP averages the gradients over processes), plus the weighted router losses
    averaged over the step's micro-batches."""
    args = trainer.args
    if num_items_in_batch is not None and args.average_tokens_across_devices:
        loss = loss * trainer.accelerator.num_processes
    if router_losses:
        router_loss = args.load_balance_coef * outputs.aux_loss + args.z_loss_coef * outputs.z_loss
        steps = trainer.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + router_loss / steps
    return loss
