"""VRPO (Variance-Reduced Preference Optimization, LLaDA 1.5, arXiv 2505.19223) for LLaDA-MoE as a TRL `DPOTrainer`.

A masked-diffusion model has no tractable log-likelihood, so DPO runs on its ELBO:

    loss = -log sigmoid(beta * [(B_theta(y_w) - B_ref(y_w)) - (B_theta(y_l) - B_ref(y_l))])

with every B estimated by Monte Carlo over noise levels and masks (`modeling_llada_moe.forward_process`). The three
variance reductions of the paper are built in: a budget of `num_mc_samples` noisy copies per response, the optimal
allocation (one mask per noise level, `num_timesteps=None`), and antithetic sampling (policy and reference score the
very same noisy tensors). Masks are a deterministic function of `mask_seed` and the example's token ids, so the
reference ELBOs can be precomputed (`precompute_ref_log_probs=True`) and stay antithetic with the policy's.

Reference model: pass `ref_model=` (full fine-tuning), or train an adapter (`peft_config=`, the reference is the
adapter-disabled base), or precompute the reference ELBOs. The trainer never reloads a reference from
`config._name_or_path`. Build `ref_model` before creating any trainer, or load it fresh (from_pretrained, or construct
it and `load_state_dict`): a `copy.deepcopy` of a model that a TRL trainer has already patched keeps a `forward` bound
to the *original* model, so the "reference" would silently follow the policy (rewards stuck at 0, loss stuck at
ln 2). Such copies are detected and refused, as policy or reference.
"""

from __future__ import annotations

import contextlib
import textwrap
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from datasets.fingerprint import Hasher
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from modeling_llada_moe.forward_process import (
    TIME_EPSILON,
    bernoulli_mask,
    elbo_weighted_nll,
    example_generator,
    mask_target_positions,
    sample_noise_levels,
    time_weighted_nll,
    uniform_mask_counts,
)

from .common import (
    check_choice,
    check_flag,
    check_integer,
    check_mask_token_id_field,
    check_models,
    check_number,
    eos_token_id,
    forward_runs_another_module,
    load_policy,
    refuse_router_aux_loss,
    resolve_mask_token_id,
    step_share_of_loss,
)
from .data_checks import (
    PROMPT,
    RESPONSE,
    Column,
    check_container,
    check_containers,
    check_dataset,
    check_not_emptied,
    check_prepared_tokens,
    column_names,
    prepared_dataset_name,
)
from .sharded_checkpoints import ShardedCheckpoints


ELBO_FORMS = ("count", "time")
# Per-example random streams: the policy's masks (shared by the reference when antithetic) and, for independent
# sampling, the reference's own masks.
POLICY_STREAM, REFERENCE_STREAM = 0, 1


@dataclass
class VRPOConfig(DPOConfig):
    r"""
    `DPOConfig` for VRPO on a masked-diffusion model. Only the DPO sigmoid loss applies (on ELBO estimates); options
    that need per-token log-probabilities (`ld_alpha`, `use_weighting`, f-divergences, label smoothing) and
    `padding_free` are rejected. TRL's own MoE aux-loss path stays off (`router_aux_loss_coef=0.0`); the router
    losses are `load_balance_coef` / `z_loss_coef`.
    """

    mask_token_id: int | None = field(
        default=None,
        metadata={"help": "Mask token id. Default None: `model.config.mask_token_id` (156895 for LLaDA-MoE-7B)."},
    )
    num_mc_samples: int = field(
        default=8,
        metadata={
            "help": "Default 8. Monte-Carlo budget n: noisy copies per response and per ELBO estimate. Var(ELBO) "
            "falls roughly as 1/n; each pair costs 2n policy forwards with gradients and 2n reference forwards."
        },
    )
    num_timesteps: int | None = field(
        default=None,
        metadata={
            "help": "Default None (= num_mc_samples): number of noise levels n_t among the n copies, each with "
            "n / n_t masks. None is VRPO's optimal allocation (n levels x 1 mask); otherwise n must be divisible by "
            "it."
        },
    )
    antithetic: bool = field(
        default=True,
        metadata={
            "help": "Default True: policy and reference score the same noise levels and masks of the same response, "
            "so their difference has much lower variance. False draws the reference's masks independently."
        },
    )
    elbo_form: str = field(
        default="count",
        metadata={
            "help": "Default 'count' (LLaDA's likelihood estimator): l ~ U{1..L} positions masked uniformly, weight "
            "L/l. 'time' (the paper's formula): each position masked with probability t ~ U(eps, 1), weight 1/t "
            "(heavier-tailed)."
        },
    )
    time_epsilon: float = field(
        default=TIME_EPSILON,
        metadata={"help": "Default 1e-3. Floor of the masking probability in the 'time' form: t = (1 - eps) u + eps."},
    )
    eos_tail: bool = field(
        default=True,
        metadata={
            "help": "Default True (LLaDA's convention): the shorter response of a pair is right-padded with EOS up to "
            "the longer one; the tail is attended and part of the ELBO. False: the ELBO covers the response only "
            "and its padding is masked out of attention."
        },
    )
    mask_seed: int = field(
        default=0,
        metadata={
            "help": "Default 0. Base seed of the per-example masks, drawn from (seed, the example's token ids, epoch): "
            "reproducible whatever the batch. The epoch is left out (masks repeat) in evaluation and with "
            "`precompute_ref_log_probs`, whose cached reference ELBOs need the same masks every epoch."
        },
    )
    load_balance_coef: float = field(
        default=0.0,
        metadata={"help": "Default 0.0 (off for VRPO). Weight of the MoE load-balancing loss of the policy forward."},
    )
    z_loss_coef: float = field(
        default=0.0,
        metadata={"help": "Default 0.0 (off for VRPO). Weight of the router z-loss of the policy forward."},
    )
    router_aux_loss_coef: float | None = field(
        default=0.0,
        metadata={"help": "TRL's own aux-loss path: must stay 0.0 (use load_balance_coef / z_loss_coef)."},
    )

    def __post_init__(self):
        loss_type = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        if not isinstance(loss_type, (list, tuple)) or list(loss_type) != ["sigmoid"]:
            raise ValueError(
                f"loss_type={self.loss_type!r}: VRPOTrainer supports only ['sigmoid'] (DPO on ELBO estimates)"
            )
        token_level = {
            "ld_alpha": self.ld_alpha is not None,
            "use_weighting": self.use_weighting,
            "f_divergence_type": self.f_divergence_type != "reverse_kl",
            "label_smoothing": self.label_smoothing != 0.0,
        }
        for name, set_ in token_level.items():
            if set_:
                raise ValueError(
                    f"{name}={getattr(self, name)!r}: not supported by VRPO, which has sequence-level ELBO estimates, "
                    "not per-token log-probabilities (and only the sigmoid loss keeps the variance analysis)"
                )
        if self.padding_free:
            raise ValueError(
                "padding_free=True: VRPO needs one sequence per row (bidirectional attention would mix packed "
                "sequences, and each response needs its own EOS tail)"
            )
        refuse_router_aux_loss(
            self, "TRL's aux-loss path is not used by VRPO; set load_balance_coef / z_loss_coef instead"
        )
        self._check_vrpo_fields()
        if self.num_timesteps is not None and self.num_mc_samples % self.num_timesteps:
            raise ValueError(
                f"num_timesteps={self.num_timesteps!r}: expected None or a positive divisor of "
                f"num_mc_samples={self.num_mc_samples} (each noise level gets num_mc_samples / num_timesteps masks)"
            )
        super().__post_init__()

    def _check_vrpo_fields(self) -> None:
        """Types, ranges and finiteness of this class's own fields and of `beta`: `ValueError` naming the field, its
        value and what is accepted."""
        check_mask_token_id_field(self)
        check_integer(self, "num_mc_samples", lambda v: v >= 1, "a positive integer")
        check_integer(self, "num_timesteps", lambda v: v >= 1, "None or a positive divisor of num_mc_samples", True)
        check_integer(self, "mask_seed", lambda v: 0 <= v < 2**64, "an integer seed in [0, 2**64)")
        check_number(self, "beta", lambda v: v > 0, "a finite number > 0 (the DPO temperature)")
        check_number(self, "time_epsilon", lambda v: 0 < v < 1, "a finite float in (0, 1)")
        check_number(self, "load_balance_coef", lambda v: v >= 0, "a finite weight >= 0")
        check_number(self, "z_loss_coef", lambda v: v >= 0, "a finite weight >= 0")
        check_choice(self, "elbo_form", ELBO_FORMS)
        check_flag(self, "antithetic")
        check_flag(self, "eos_tail")


@dataclass
class NoisyCopies:
    """`num_samples` noisy copies of each row of a collated preference batch (rows: [all chosen; all rejected]).

    Row r's copies are rows r * num_samples ... (r + 1) * num_samples - 1 of every [rows * num_samples, ...] tensor.
    """

    targets: torch.Tensor  # [R*n, T] clean ids; with the EOS tail filled in
    noisy_ids: torch.Tensor  # [R*n, T] targets with the masked positions set to the mask id
    masked: torch.Tensor  # [R*n, T] bool
    attention_mask: torch.Tensor  # [R*n, T]
    target_lengths: torch.Tensor  # [R*n] L: the number of positions the ELBO covers
    noise_levels: torch.Tensor  # [R*n] masking probability t ('time' form; 1 in the 'count' form)
    elbo_form: str
    num_rows: int
    num_samples: int


def build_noisy_copies(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    mask_token_id: int,
    eos_token_id: int,
    num_mc_samples: int = 8,
    num_timesteps: int | None = None,
    elbo_form: str = "count",
    time_epsilon: float = TIME_EPSILON,
    eos_tail: bool = True,
    seed: int = 0,
    stream: int = POLICY_STREAM,
    draw_round: int = 0,
) -> NoisyCopies:
    """The n noisy copies of every response of a `DataCollatorForPreference` batch, with per-example masks.

    Layout expected: row i and row B + i are the chosen and rejected completions of pair i, each right-padded, prompt
    first. Pair i draws its masks from `example_generator(seed, prompt, chosen, rejected, [stream, draw_round])`,
    over a canvas of max(len(chosen), len(rejected)) positions, so the masks of an example do not depend on the
    batch it is in. With `eos_tail` both responses are EOS-padded to that canvas and the ELBO covers it.
    """
    if elbo_form not in ELBO_FORMS:
        raise ValueError(f"elbo_form={elbo_form!r}: expected one of {ELBO_FORMS}")
    rows, width = input_ids.shape
    if rows % 2:
        raise ValueError(f"a preference batch has [chosen; rejected] rows, got an odd number ({rows})")
    num_timesteps = num_timesteps or num_mc_samples
    if num_mc_samples % num_timesteps:
        raise ValueError(f"num_timesteps={num_timesteps} does not divide num_mc_samples={num_mc_samples}")
    per_timestep = num_mc_samples // num_timesteps
    pairs, n = rows // 2, num_mc_samples
    device = input_ids.device

    ids = input_ids.detach().cpu()
    attention = attention_mask.detach().cpu().bool()
    completion = completion_mask.detach().cpu().bool()
    prompt_lengths = (attention & ~completion).sum(1)
    completion_lengths = completion.sum(1)
    positions = torch.arange(width)
    expected = (positions >= prompt_lengths[:, None]) & (positions < (prompt_lengths + completion_lengths)[:, None])
    if not torch.equal(expected, completion) or not torch.equal(
        positions < (prompt_lengths + completion_lengths)[:, None], attention
    ):
        raise ValueError(
            "VRPO expects DataCollatorForPreference's layout: each row right-padded, prompt then completion, "
            "attention_mask 1 exactly on prompt + completion"
        )

    targets = ids.clone()
    attention = attention.long()
    masked = torch.zeros(rows, n, width, dtype=torch.bool)
    target_lengths = torch.zeros(rows, dtype=torch.long)
    noise_levels = torch.ones(rows, n)
    for pair in range(pairs):
        chosen_row, rejected_row = pair, pairs + pair
        start = int(prompt_lengths[chosen_row])
        if int(prompt_lengths[rejected_row]) != start or not torch.equal(
            ids[chosen_row, :start], ids[rejected_row, :start]
        ):
            raise ValueError(f"rows {chosen_row} and {rejected_row} (pair {pair}) do not share their prompt")
        lengths = {row: int(completion_lengths[row]) for row in (chosen_row, rejected_row)}
        canvas = max(lengths.values())
        generator = example_generator(
            seed,
            ids[chosen_row, :start],
            ids[chosen_row, start : start + lengths[chosen_row]],
            ids[rejected_row, start : start + lengths[rejected_row]],
            [stream, draw_round],
        )
        for row, length in lengths.items():
            if eos_tail:
                targets[row, start + length : start + canvas] = eos_token_id
                attention[row, start : start + canvas] = 1
                length = canvas
            maskable = torch.zeros(n, canvas, dtype=torch.bool)
            maskable[:, :length] = True
            response = targets[row, start : start + canvas].expand(n, canvas)
            if elbo_form == "count":
                counts = uniform_mask_counts(torch.full((num_timesteps,), length), generator)
                _, row_masked = mask_target_positions(
                    response, maskable, counts.repeat_interleave(per_timestep), mask_token_id, generator
                )
            else:
                levels = sample_noise_levels(num_timesteps, generator, time_epsilon).repeat_interleave(per_timestep)
                _, row_masked = bernoulli_mask(response, maskable, levels, mask_token_id, generator)
                noise_levels[row] = levels
            masked[row, :, start : start + canvas] = row_masked
            target_lengths[row] = length

    targets = targets.repeat_interleave(n, dim=0)
    masked = masked.reshape(rows * n, width)
    return NoisyCopies(
        targets=targets.to(device),
        noisy_ids=targets.masked_fill(masked, mask_token_id).to(device),
        masked=masked.to(device),
        attention_mask=attention.repeat_interleave(n, dim=0).to(device=device, dtype=attention_mask.dtype),
        target_lengths=target_lengths.repeat_interleave(n).to(device),
        noise_levels=noise_levels.reshape(rows * n).to(device),
        elbo_form=elbo_form,
        num_rows=rows,
        num_samples=n,
    )


def elbo_terms(model, copies: NoisyCopies, output_router_logits: bool = False):
    """One forward over all copies: the per-sample ELBO terms [rows, n] (the estimate is their mean over n), and the
    model outputs (router losses in `aux_loss` / `z_loss` when `output_router_logits`). No `labels` are passed, so
    nothing shifts; logits are computed for the masked positions only."""
    outputs = model(
        input_ids=copies.noisy_ids,
        attention_mask=copies.attention_mask,
        logits_to_keep=copies.masked,
        output_router_logits=output_router_logits,
        use_cache=False,
    )
    if copies.elbo_form == "count":
        nll = elbo_weighted_nll(outputs.logits, copies.targets, copies.masked, copies.target_lengths)
    else:
        nll = time_weighted_nll(outputs.logits, copies.targets, copies.masked, copies.noise_levels)
    return (-nll).view(copies.num_rows, copies.num_samples), outputs


class VRPOTrainer(ShardedCheckpoints, DPOTrainer):
    """`DPOTrainer` running DPO on Monte-Carlo ELBO estimates, with VRPO's variance reductions.

    Logs DPO's `rewards/{chosen,rejected,accuracies,margins}` and `logps/{chosen,rejected}` (the policy ELBOs), plus
    `elbo/{chosen,rejected}`, `vrpo/score_std` (std over the MC samples of the per-sample preference score; not with
    precomputed reference ELBOs), `vrpo/num_mc_samples`, and `aux/load_balance` / `aux/z_loss` when weighted.
    Evaluation computes the same loss with fixed masks; there are no causal logits, so `compute_metrics` is refused.

    Gradient accumulation: the loss is the sum over a micro-batch's pairs divided by the pairs of the whole optimizer
    step (`num_items_in_batch`, all processes with `average_tokens_across_devices`), and masks depend on the example
    only, so k micro-batches give the update of one batch of the same pairs, also when the last one is shorter (MoE
    router losses are per micro-batch means averaged over the step).

    A policy sharded with FSDP2 at load time (`DistributedConfig(fsdp_size=N)`) gets sharded step checkpoints (model
    and optimizer through torch.distributed.checkpoint) that `train(resume_from_checkpoint=...)` resumes
    (`trl_ext.sharded_checkpoints`); the frozen reference is not checkpointed.
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the whole step's pairs (`num_items_in_batch`)

    _tag_names = ["trl", "vrpo", "dpo", "diffusion", "llada", "llada-moe"]
    _name = "VRPO"
    _paper = {
        "title": "LLaDA 1.5: Variance-Reduced Preference Optimization for Large Language Diffusion Models",
        "id": "2505.19223",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{zhu2025llada15,
                title   = {{LLaDA 1.5: Variance-Reduced Preference Optimization for Large Language Diffusion Models}},
                author  = {Fengqi Zhu and others},
                year    = 2025,
                journal = {arXiv preprint arXiv:2505.19223},
            }"""),
    }

    def __init__(
        self,
        model,
        ref_model=None,
        args: VRPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if not isinstance(args, VRPOConfig):
            raise ValueError(f"args must be a VRPOConfig, got {type(args).__name__}")
        if compute_metrics is not None:
            raise ValueError("VRPOTrainer computes no causal logits for compute_metrics; read the logged eval metrics")
        if processing_class is None:
            raise ValueError("VRPOTrainer needs processing_class= (the tokenizer); it is not loaded from the model")
        check_containers(train_dataset, eval_dataset)
        model, quantization_config = load_policy(model, args, quantization_config)
        if ref_model is None and peft_config is None and not is_peft_model(model):
            if not args.precompute_ref_log_probs:
                raise ValueError(
                    "VRPOTrainer needs a reference: pass ref_model= (a separately built or loaded copy of the initial "
                    "policy), or train an adapter with peft_config= (the reference is the adapter-disabled base), or "
                    "set precompute_ref_log_probs=True. The reference is never reloaded from config._name_or_path."
                )
        check_models(model, ref_model, peft_config)

        config = model.config
        self.mask_token_id = resolve_mask_token_id(args, config, processing_class, "VRPOConfig.mask_token_id")
        eos = eos_token_id(getattr(processing_class, "tokenizer", processing_class), config)
        if eos is None:
            raise ValueError("VRPOTrainer needs an eos_token_id (tokenizer or model config) for the EOS tail")
        # Set before DPOTrainer.__init__: with precompute_ref_log_probs it already calls compute_ref_log_probs.
        self.eos_token_id = eos
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )

    # ---- dataset checks ----

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name_):
        """DPOTrainer's preparation, after a one-pass check of the rows (a `ValueError` naming the row and column of a
        None, a wrong type, an empty `chosen` / `rejected`, one without an assistant turn, conversational and plain
        rows mixed, the mask token) and followed by a scan of the token ids for the mask id."""
        name = prepared_dataset_name(dataset_name_)
        check_container(dataset, name)
        present = column_names(dataset)
        missing = [column for column in ("chosen", "rejected") if column not in present]
        if missing:
            raise ValueError(
                f"{name} has columns {present}: a preference dataset needs 'chosen' and 'rejected' (and 'prompt', or "
                f"conversations that share their first turns); missing {missing}"
            )
        columns = [Column("prompt", PROMPT)] if "prompt" in present else []
        dataset = check_dataset(
            dataset,
            name,
            [*columns, Column("chosen", RESPONSE), Column("rejected", RESPONSE)],
            mask_token_id=self.mask_token_id,
            tokenizer=processing_class,
        )
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name_)
        check_not_emptied(dataset, prepared, name, args.max_length, "the prompt")
        return check_prepared_tokens(
            dataset, prepared, name, ["prompt_ids", "chosen_ids", "rejected_ids"], self.mask_token_id
        )

    # ---- noisy copies and ELBOs ----

    @property
    def _estimator_settings(self) -> dict:
        args: VRPOConfig = self.args
        return {
            "num_mc_samples": args.num_mc_samples,
            "num_timesteps": args.num_timesteps or args.num_mc_samples,
            "elbo_form": args.elbo_form,
            "time_epsilon": args.time_epsilon,
            "eos_tail": args.eos_tail,
            "seed": args.mask_seed,
        }

    def noisy_copies(self, inputs, stream: int = POLICY_STREAM, draw_round: int = 0) -> NoisyCopies:
        """The trainer's noisy copies of a collated batch (see `build_noisy_copies`)."""
        return build_noisy_copies(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["completion_mask"],
            mask_token_id=self.mask_token_id,
            eos_token_id=self.eos_token_id,
            stream=stream,
            draw_round=draw_round,
            **self._estimator_settings,
        )

    def _draw_round(self) -> int:
        """Fresh masks every epoch in training; fixed masks in evaluation and with a precomputed reference."""
        if self.precompute_ref_logps or not self.model.training:
            return 0
        return int(self.state.epoch or 0)

    def _reference_stream(self) -> int:
        return POLICY_STREAM if self.args.antithetic else REFERENCE_STREAM

    def _reference_terms(self, copies: NoisyCopies, model=None) -> torch.Tensor:
        """Per-sample reference ELBO terms, without gradients: `ref_model`, or the adapter-disabled PEFT policy."""
        if model is None:
            model = self.ref_model if self.ref_model is not None else self.model
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        elif self.ref_model is None and model is self.model and self.state.global_step > 0:
            raise RuntimeError("no reference: the full fine-tuned policy has already moved (pass ref_model=)")
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter,
            self.accelerator.autocast(),
        ):
            terms, _ = elbo_terms(model, copies)
        return terms

    def compute_ref_log_probs(self, model, inputs):
        """Reference ELBO estimates (chosen, rejected) of a padded batch, on the masks the policy will see (antithetic)
        or on the reference's own stream (independent). Used by `precompute_ref_log_probs`."""
        copies = self.noisy_copies(inputs, self._reference_stream(), draw_round=0)
        return self._reference_terms(copies, model).mean(dim=1).chunk(2, dim=0)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        # DPOTrainer keys the cache on (dataset fingerprint, reference weights); the reference ELBOs also depend on
        # every setting of the estimator, so fold them into the key.
        model_hash = self._precompute_model_hash
        key = {
            "estimator": "vrpo-elbo-v1",
            **self._estimator_settings,
            "antithetic": self.args.antithetic,
            "mask_token_id": self.mask_token_id,
            "eos_token_id": self.eos_token_id,
        }
        self._precompute_model_hash = Hasher.hash((model_hash, sorted(key.items())))
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_model_hash = model_hash

    # ---- loss ----

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The micro-batches of one optimizer step and `num_items_in_batch`: their number of preference pairs."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)  # the count is ours
        if not batches:
            return batches, None
        pairs = torch.tensor(sum(batch["input_ids"].shape[0] // 2 for batch in batches), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            pairs = self.accelerator.gather(pairs).sum()
        return batches, pairs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The micro-batch's share of the VRPO loss: Σ pairs -log σ(score) / `num_items_in_batch` (the optimizer
        step's pairs); without it (evaluation, direct calls) the mean over the micro-batch's pairs."""
        return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model, inputs, return_outputs, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        args: VRPOConfig = self.args
        draw_round = self._draw_round()
        copies = self.noisy_copies(inputs, POLICY_STREAM, draw_round)
        router_losses = args.load_balance_coef > 0 or args.z_loss_coef > 0
        policy_terms, outputs = elbo_terms(model, copies, output_router_logits=router_losses)
        policy_elbo = policy_terms.mean(dim=1)

        if self.precompute_ref_logps:
            ref_terms = None
            ref_elbo = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(policy_elbo)
        else:
            ref_copies = copies if args.antithetic else self.noisy_copies(inputs, REFERENCE_STREAM, draw_round)
            ref_terms = self._reference_terms(ref_copies)
            ref_elbo = ref_terms.mean(dim=1)

        chosen_elbo, rejected_elbo = policy_elbo.chunk(2, dim=0)
        ref_chosen_elbo, ref_rejected_elbo = ref_elbo.chunk(2, dim=0)
        chosen_logratios = chosen_elbo - ref_chosen_elbo
        rejected_logratios = rejected_elbo - ref_rejected_elbo
        scores = self.beta * (chosen_logratios - rejected_logratios)
        pairs = scores.shape[0] if num_items_in_batch is None else num_items_in_batch
        loss = -F.logsigmoid(scores).sum() / torch.as_tensor(pairs, device=scores.device) * self.loss_weights[0]
        loss = step_share_of_loss(self, loss, outputs, router_losses, num_items_in_batch)

        with torch.no_grad():
            metrics = self._metrics[mode]
            gather = self.accelerator.gather
            chosen_rewards = self.beta * chosen_logratios.detach()
            rejected_rewards = self.beta * rejected_logratios.detach()
            metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
            metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
            metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
            metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
            for name, values in (("chosen", chosen_elbo), ("rejected", rejected_elbo)):
                value = gather(values.detach()).mean().item()
                metrics[f"logps/{name}"].append(value)
                metrics[f"elbo/{name}"].append(value)
            if ref_terms is not None and copies.num_samples > 1:
                sample_logratios = policy_terms.detach() - ref_terms
                chosen_samples, rejected_samples = sample_logratios.chunk(2, dim=0)
                score_std = (self.beta * (chosen_samples - rejected_samples)).std(dim=1)
                metrics["vrpo/score_std"].append(gather(score_std).mean().item())
            metrics["vrpo/num_mc_samples"] = [float(copies.num_samples)]
            if router_losses:
                metrics["aux/load_balance"].append(gather(outputs.aux_loss.detach()).mean().item())
                metrics["aux/z_loss"].append(gather(outputs.z_loss.detach()).mean().item())
            if mode == "train":
                tokens = gather(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += tokens // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]

        if return_outputs:
            elbos = {
                "chosen_elbo": chosen_elbo.detach(),
                "rejected_elbo": rejected_elbo.detach(),
                "ref_chosen_elbo": ref_chosen_elbo.detach(),
                "ref_rejected_elbo": ref_rejected_elbo.detach(),
                "scores": scores.detach(),
            }
            return loss, elbos
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys: list[str] | None = None):
        """Evaluation: the VRPO loss (fixed masks); there are no logits or labels to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


__all__ = [
    "NoisyCopies",
    "VRPOConfig",
    "VRPOTrainer",
    "build_noisy_copies",
    "elbo_terms",
    "forward_runs_another_module",
]
