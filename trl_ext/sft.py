"""Masked-diffusion SFT for LLaDA-MoE as a TRL `SFTTrainer`.

The LLaDA SFT objective: the prompt stays clean; each row draws a masking probability t, every response token
(the right-padded EOS tail included) is masked with probability t, and the loss is the cross-entropy of the masked
tokens weighted by 1/t, normalised by the row's answer length and averaged over rows. MoE load-balancing and
router z-losses come from the model's router logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from modeling_llada_moe.forward_process import TIME_EPSILON, bernoulli_mask, masked_token_nll, sample_noise_levels


NORMALIZATIONS = ("answer_length", "supervised_tokens", "batch", "all_tokens")
# A Ling-style (LLaDA-MoE Instruct) chat template with {% generation %} markers, so TRL's assistant_only_loss can
# find the assistant spans (the official template has none).
TRAINING_CHAT_TEMPLATE_PATH = Path(__file__).with_name("templates") / "llada_moe_training.jinja"


@dataclass
class DiffusionSFTConfig(SFTConfig):
    r"""
    `SFTConfig` for masked-diffusion SFT. TRL's dataset handling is unchanged (conversational data through the chat
    template, prompt-completion data with completion-only loss); the loss and the collator are LLaDA's.
    """

    mask_token_id: int | None = field(
        default=None, metadata={"help": "Mask token id; None reads `model.config.mask_token_id` (156895 for the 7B)."}
    )
    time_epsilon: float = field(
        default=TIME_EPSILON, metadata={"help": "Masking probability floor: t = (1 - eps) u + eps, weight 1/t."}
    )
    stratified_t: bool = field(
        default=False,
        metadata={"help": "Stratify t over the batch ((u0 + i/B) mod 1: still unbiased, lower variance)."},
    )
    loss_normalization: str = field(
        default="answer_length",
        metadata={
            "help": "answer_length (LLaDA SFT: per row by its response length incl. EOS tail, then mean over rows), "
            "supervised_tokens (all response tokens of the micro-batch), batch (rows), all_tokens (B x T)."
        },
    )
    eos_tail: bool = field(
        default=True,
        metadata={"help": "Right-pad responses with EOS that is attended and trained on (LLaDA's length control)."},
    )
    random_length_prob: float = field(
        default=0.0,
        metadata={
            "help": "Variable-length training (LLaDA-MoE): with this probability a batch is cropped to a random "
            "width that keeps every prompt and at least one response token of every row."
        },
    )
    load_balance_coef: float = field(default=0.01, metadata={"help": "Weight of the MoE load-balancing loss."})
    z_loss_coef: float = field(default=0.001, metadata={"help": "Weight of the router z-loss."})
    router_aux_loss_coef: float | None = field(
        default=0.0,
        metadata={"help": "TRL's own aux-loss path; kept at 0.0 (the router losses above replace it)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_normalization not in NORMALIZATIONS:
            raise ValueError(f"loss_normalization={self.loss_normalization!r}: expected one of {NORMALIZATIONS}")
        if not 0 < self.time_epsilon < 1:
            raise ValueError(f"time_epsilon={self.time_epsilon}: expected a float in (0, 1)")
        if not 0 <= self.random_length_prob <= 1:
            raise ValueError(f"random_length_prob={self.random_length_prob}: expected a probability in [0, 1]")
        if self.packing or self.padding_free:
            raise ValueError(
                f"packing={self.packing}, padding_free={self.padding_free}: masked-diffusion SFT needs one example per "
                "row (bidirectional attention would mix packed documents, and each row needs its own EOS tail)"
            )
        if self.router_aux_loss_coef not in (None, 0.0):
            raise ValueError(
                f"router_aux_loss_coef={self.router_aux_loss_coef}: use load_balance_coef / z_loss_coef instead"
            )
        self.router_aux_loss_coef = 0.0


@dataclass
class DataCollatorForDiffusionSFT:
    """Right-pads `input_ids` with EOS, attends to every position, and supervises the EOS tail of rows whose response
    reaches their end (labels padded with EOS there, -100 otherwise). With `random_length_prob`, crops a batch to a
    random width keeping every prompt and one response token (variable-length training)."""

    eos_token_id: int
    eos_tail: bool = True
    random_length_prob: float = 0.0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(feature["input_ids"]) for feature in features)
        input_ids = torch.full((len(features), width), self.eos_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            row_labels = torch.as_tensor(feature.get("labels", feature["input_ids"]), dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = row_labels
            if self.eos_tail and len(ids) and row_labels[-1] != -100:
                labels[row, len(ids) :] = self.eos_token_id
        if self.random_length_prob and torch.rand(()) < self.random_length_prob:
            # Variable-length training: crop the batch to a random width that keeps every prompt and at least one
            # response token of every row (LLaDA-MoE crops 1% of pre-training batches to a random length).
            supervised = labels != -100
            first = torch.where(supervised.any(1), supervised.float().argmax(1), torch.full_like(labels[:, 0], width))
            shortest = min(int(first.max()) + 1, width)
            width = int(torch.randint(shortest, width + 1, ()))
            input_ids, labels = input_ids[:, :width], labels[:, :width]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids)}


class DiffusionSFTTrainer(SFTTrainer):
    """`SFTTrainer` with the LLaDA masked-diffusion objective. Logs `diffusion/masked_accuracy`, `diffusion/nll`,
    `diffusion/mask_ratio`, `aux/load_balance` and `aux/z_loss` besides TRL's metrics."""

    loss_is_scaled_for_ga = False  # the loss is a per-micro-batch mean: let Trainer divide by the accumulation steps

    def __init__(self, model, args: DiffusionSFTConfig | None = None, data_collator=None, **kwargs):
        if args is None or not isinstance(args, DiffusionSFTConfig):
            raise ValueError(f"args must be a DiffusionSFTConfig, got {type(args).__name__}")
        config = getattr(model, "config", None)
        saved = {name: getattr(config, name, None) for name in ("router_aux_loss_coef", "output_router_logits")}
        processing_class = kwargs.get("processing_class")
        eos = getattr(processing_class, "eos_token_id", None)
        if eos is None and config is not None:
            eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
        if data_collator is None:
            if eos is None:
                raise ValueError("DiffusionSFTTrainer needs an eos_token_id (tokenizer or model config) for padding")
            data_collator = DataCollatorForDiffusionSFT(eos, args.eos_tail, args.random_length_prob)
        super().__init__(model, args=args, data_collator=data_collator, **kwargs)
        # TRL writes its aux-loss settings into the model config; keep the model's own (they are saved with it).
        text_config = self.model.config
        for name, value in saved.items():
            if value is not None:
                setattr(text_config, name, value)
        self.mask_token_id = args.mask_token_id if args.mask_token_id is not None else text_config.mask_token_id
        if self.mask_token_id is None or not 0 <= self.mask_token_id < text_config.vocab_size:
            raise ValueError(
                f"mask_token_id={self.mask_token_id} is not in the vocabulary [0, {text_config.vocab_size}); set "
                "DiffusionSFTConfig.mask_token_id"
            )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        args: DiffusionSFTConfig = self.args
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        supervised = labels != -100
        targets = torch.where(supervised, labels, input_ids)
        noise = sample_noise_levels(input_ids.shape[0], None, args.time_epsilon, args.stratified_t, input_ids.device)
        noisy, masked = bernoulli_mask(targets, supervised, noise, self.mask_token_id)
        router_losses = args.load_balance_coef > 0 or args.z_loss_coef > 0
        outputs = model(
            input_ids=noisy,
            attention_mask=inputs.get("attention_mask"),
            logits_to_keep=masked,
            output_router_logits=router_losses,
            use_cache=False,
        )
        # Logits of the masked positions only ([N masked, V]); the per-row 1/t-weighted masked cross-entropy.
        row_nll = masked_token_nll(outputs.logits, targets, masked)
        loss = self._normalize(row_nll / noise, supervised, inputs.get("attention_mask"))
        if router_losses:
            loss = loss + args.load_balance_coef * outputs.aux_loss + args.z_loss_coef * outputs.z_loss

        with torch.no_grad():
            metrics = self._metrics[mode]
            count = masked.sum().clamp(min=1)
            correct = outputs.logits.argmax(-1) == targets[masked]
            metrics["diffusion/masked_accuracy"].append((correct.sum() / count).item())
            metrics["diffusion/nll"].append((row_nll.sum() / count).item())
            metrics["diffusion/mask_ratio"].append((masked.sum() / supervised.sum().clamp(min=1)).item())
            if router_losses:
                metrics["aux/load_balance"].append(outputs.aux_loss.item())
                metrics["aux/z_loss"].append(outputs.z_loss.item())
            if mode == "train":
                self._total_train_tokens += int(inputs.get("attention_mask", torch.ones_like(input_ids)).sum())
            metrics["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss

    def _normalize(self, row_loss: torch.Tensor, supervised: torch.Tensor, attention_mask) -> torch.Tensor:
        """Per-row weighted sums -> the loss, by `loss_normalization`."""
        scheme = self.args.loss_normalization
        if scheme == "answer_length":
            return (row_loss / supervised.sum(-1).clamp(min=1)).mean()
        if scheme == "supervised_tokens":
            return row_loss.sum() / supervised.sum().clamp(min=1)
        if scheme == "batch":
            return row_loss.sum() / row_loss.shape[0]
        tokens = attention_mask.sum() if attention_mask is not None else supervised.numel()
        return row_loss.sum() / tokens
