"""Online RL (GRPO) for LLaDA-MoE as a TRL `GRPOTrainer`: rollouts from `diffusion_generate`, masked-diffusion
likelihood estimators in place of the causal log-probabilities.

A masked-diffusion model has no tractable per-token log-probability, so every log-probability TRL's GRPO loss uses
(current, old and reference policy) is a Monte-Carlo estimate over masks, selected by `likelihood_estimator`:

- `"d1"` (diffu-GRPO, arXiv 2504.12216): one forward with the whole completion canvas masked and each prompt token
  masked with probability `p_mask`; the token's log-probability is read at its masked position.
- `"coupled"` (DiffuCoder's coupled-GRPO, arXiv 2506.20639): t ~ U(`coupled_min_t`, `coupled_max_t`), a mask M of
  rate t and its complement, three forwards (full mask, M, M^c): each token is scored once in a partial context,
  l_k = (l0_k + [k in M] l1_k / t + [k in M^c] l2_k / (1 - t)) / 2; the prompt stays clean.
- `"elbo"`: `num_mc_samples` views with stratified masked-token counts l_j (LLaDA's count form, weight L / l_j),
  l_k = mean_j [k masked in view j] (L / l_j) log p_j(k): the per-token terms of the sequence ELBO, whose sum over
  the completion is the ELBO estimate. With `elbo_upper_bound` (SPG, arXiv 2510.09541), rows with a negative
  advantage use an upper-bound term on the same views, u_k = W_k (1/`eubo_beta`) log sum_j (w_jk / W_k) p_j(k)^beta
  (W_k = sum_j w_jk, the ELBO term's total weight; u_k >= l_k), so pushing a bad completion down does not push down
  a lower bound.

Masks are drawn from per-row seeds (`mask_seeds`, [B, num_iterations]) drawn at rollout time; inner iteration i uses
seed i for the old, reference and current policy (the same masks: their ratio and KL are antithetic). The seeds and
the old / reference log-probabilities ([B, num_iterations, T]) are tensors of the generation batch, so TRL's
`shuffle_sequence_dict` and `split_tensor_dict` keep them aligned with their rows. The old log-probabilities are
computed whenever `num_iterations > 1` (or TRL's generation and optimizer steps are misaligned); otherwise the
current ones, detached, stand in (they are equal).

Reference model (only with `beta > 0`): the adapter-disabled base under PEFT, or `ref_model=` (a frozen copy built
or loaded separately; never reloaded from `config._name_or_path`, and a `copy.deepcopy` of a TRL-patched model is
refused).
"""

from __future__ import annotations

import contextlib
import textwrap
import time
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation
from trl.trainer.utils import pad, use_adapter

from modeling_llada_moe import DiffusionGenerationConfig
from modeling_llada_moe.forward_process import (
    bernoulli_mask,
    example_generator,
    mask_target_positions,
    stratified_mask_counts,
    uniform_mask_counts,
)

from .common import (
    check_choice,
    check_flag,
    check_integer,
    check_mask_token_id_field,
    check_models,
    check_number,
    load_policy,
    refuse_router_aux_loss,
    resolve_mask_token_id,
    restore_router_settings,
    router_settings,
)
from .data_checks import PROMPT, Column, check_container, check_dataset, column_names, named_datasets
from .sharded_checkpoints import ShardedCheckpoints


ESTIMATORS = ("d1", "coupled", "elbo")
REMASKING = ("low_confidence", "random", "margin", "entropy")
# Independent random streams of `example_generator`: per-row mask seeds, rollout sampling.
SEED_STREAM, ROLLOUT_STREAM = 10, 11
VIEWS_PER_ESTIMATOR = {"d1": lambda n: 1, "coupled": lambda n: 3, "elbo": lambda n: n}


@dataclass
class DiffusionGRPOConfig(GRPOConfig):
    r"""
    `GRPOConfig` for a masked-diffusion policy. TRL's fields keep their meaning (`num_generations`, `num_iterations`,
    `beta`, `epsilon`, `loss_type`, `scale_rewards`, `importance_sampling_level`, `reward_weights`, ...); `temperature`,
    `top_p`, `top_k` and `max_completion_length` (the canvas length) apply to the diffusion rollouts, and
    `generation_kwargs` overrides any `DiffusionGenerationConfig` field of them. vLLM, continuous batching and TRL's
    MoE aux-loss path do not apply to a diffusion model and are refused.
    """

    mask_token_id: int | None = field(
        default=None, metadata={"help": "Mask token id; None reads `model.config.mask_token_id` (156895 for the 7B)."}
    )
    likelihood_estimator: str = field(
        default="d1",
        metadata={
            "help": "How the per-token log-probabilities of a completion are estimated: 'd1' (one forward, "
            "completion fully masked, prompt masked at p_mask), 'coupled' (DiffuCoder: complementary mask pair plus "
            "a full-mask pass, 3 forwards), 'elbo' (num_mc_samples antithetic ELBO views)."
        },
    )
    p_mask: float = field(
        default=0.15,
        metadata={"help": "d1: probability of masking each prompt token (d1's paper config 0.15; its code 0.3)."},
    )
    coupled_min_t: float = field(default=0.2, metadata={"help": "coupled: lower end of the mask rate t."})
    coupled_max_t: float = field(default=0.8, metadata={"help": "coupled: upper end of the mask rate t."})
    num_mc_samples: int = field(
        default=2, metadata={"help": "elbo: masked views per completion and inner iteration (forwards per row)."}
    )
    elbo_upper_bound: bool = field(
        default=False,
        metadata={
            "help": "elbo: SPG's choice, the ELBO for rows with advantage >= 0 and an upper bound (EUBO) on the same "
            "views for rows with a negative advantage."
        },
    )
    eubo_beta: float = field(default=1.0, metadata={"help": "elbo_upper_bound: the Renyi order beta of the EUBO."})
    decoding_preset: str | None = field(
        default=None,
        metadata={
            "help": "Rollouts: a named decoding preset of DiffusionGenerationConfig.from_preset ('llada', "
            "'fast_dllm', 'dinfer', 'dinfer_smooth'); its greedy temperature is replaced by `temperature`."
        },
    )
    diffusion_steps: int | None = field(
        default=None, metadata={"help": "Rollouts: denoising steps over the canvas; None = max_completion_length."}
    )
    block_length: int | None = field(
        default=32, metadata={"help": "Rollouts: semi-autoregressive block length; None = the whole canvas."}
    )
    remasking: str = field(
        default="low_confidence",
        metadata={"help": "Rollouts: low_confidence, random, margin or entropy (see DiffusionGenerationConfig)."},
    )
    router_aux_loss_coef: float | None = field(
        default=0.0, metadata={"help": "TRL's own MoE aux-loss path: must stay 0.0 (not used by this trainer)."}
    )

    def __post_init__(self):
        self._check_diffusion_fields()
        refuse_router_aux_loss(self, "TRL's aux-loss path does not apply to DiffusionGRPOTrainer; expected 0.0")
        for name in ("use_vllm", "use_transformers_continuous_batching", "use_transformers_paged"):
            if getattr(self, name, False):
                raise ValueError(f"{name}=True: rollouts of a masked-diffusion model come from diffusion_generate")
        super().__post_init__()

    def _check_diffusion_fields(self) -> None:
        """Types, ranges and finiteness of this class's own fields: `ValueError` naming the field, its value and what
        is accepted."""
        check_mask_token_id_field(self)
        check_choice(self, "likelihood_estimator", ESTIMATORS)
        check_number(self, "p_mask", lambda v: 0 <= v < 1, "a probability in [0, 1)")
        check_number(self, "coupled_min_t", lambda v: 0 < v < 1, "a float in (0, 1)")
        check_number(self, "coupled_max_t", lambda v: 0 < v < 1, "a float in (0, 1)")
        if self.coupled_max_t < self.coupled_min_t:
            raise ValueError(f"coupled_max_t={self.coupled_max_t!r}: expected >= coupled_min_t={self.coupled_min_t!r}")
        check_integer(self, "num_mc_samples", lambda v: v >= 1, "a positive integer")
        check_flag(self, "elbo_upper_bound")
        if self.elbo_upper_bound and self.likelihood_estimator != "elbo":
            raise ValueError(
                f"elbo_upper_bound=True: only with likelihood_estimator='elbo' (got {self.likelihood_estimator!r})"
            )
        check_number(self, "eubo_beta", lambda v: v > 0, "a finite float > 0")
        if self.decoding_preset is not None:
            from modeling_llada_moe.generation_config import DECODING_PRESETS

            if not isinstance(self.decoding_preset, str) or self.decoding_preset not in DECODING_PRESETS:
                raise ValueError(
                    f"decoding_preset={self.decoding_preset!r}: expected None or one of {tuple(DECODING_PRESETS)}"
                )
        check_integer(self, "diffusion_steps", lambda v: v >= 1, "None or a positive integer", True)
        check_integer(self, "block_length", lambda v: v >= 1, "None or a positive integer", True)
        check_choice(self, "remasking", REMASKING)
        check_integer(self, "max_completion_length", lambda v: v >= 1, "a positive integer (the rollout canvas length)")
        if self.diffusion_steps is not None and self.diffusion_steps > self.max_completion_length:
            raise ValueError(
                f"diffusion_steps={self.diffusion_steps}: expected at most max_completion_length="
                f"{self.max_completion_length} (every step commits at least one token)"
            )
        check_number(self, "temperature", lambda v: v >= 0, "a finite float >= 0 (rollout sampling temperature)")


# ---- the likelihood estimators ----


@dataclass
class LikelihoodViews:
    """The masked copies ("views") of a batch that one estimate needs. Row b's views are rows b*V .. b*V + V - 1."""

    noisy_ids: torch.Tensor  # [B*V, P + C] prompt and canvas with masks in place
    attention_mask: torch.Tensor  # [B*V, P + C]
    scored: torch.Tensor  # [B*V, P + C] bool: canvas positions whose log-probability is read
    weights: torch.Tensor  # [B*V, C] float: weight of each canvas position's log-probability in the estimate
    num_views: int


def build_views(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    canvas_ids: torch.Tensor,
    seeds: torch.Tensor,
    *,
    estimator: str,
    mask_token_id: int,
    p_mask: float = 0.15,
    num_mc_samples: int = 2,
    coupled_t_range: tuple[float, float] = (0.2, 0.8),
) -> LikelihoodViews:
    """The views of `estimator` for a left-padded prompt batch [B, P] and a completion canvas [B, C], row b's masks
    drawn from `torch.Generator().manual_seed(seeds[b])` only (the same seed, the same masks, whatever the batch)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: expected one of {ESTIMATORS}")
    rows, prompt_width = prompt_ids.shape
    canvas_width = canvas_ids.shape[1]
    views = VIEWS_PER_ESTIMATOR[estimator](num_mc_samples)
    device = prompt_ids.device
    prompt_cpu, prompt_mask_cpu, canvas_cpu = prompt_ids.cpu(), prompt_mask.cpu().bool(), canvas_ids.cpu()
    noisy_prompt = prompt_cpu.repeat_interleave(views, 0).clone()
    canvas_masked = torch.zeros(rows * views, canvas_width, dtype=torch.bool)
    weights = torch.zeros(rows * views, canvas_width)
    everything = torch.ones(1, canvas_width, dtype=torch.bool)
    for row in range(rows):
        generator = torch.Generator().manual_seed(int(seeds[row]))
        first = row * views
        if estimator == "d1":
            level = torch.tensor([float(p_mask)])
            noisy, _ = bernoulli_mask(
                prompt_cpu[row : row + 1], prompt_mask_cpu[row : row + 1], level, mask_token_id, generator
            )
            noisy_prompt[first] = noisy[0]
            canvas_masked[first] = True
            weights[first] = 1.0
        elif estimator == "coupled":
            low, high = coupled_t_range
            t = low + (high - low) * float(torch.rand((), generator=generator))
            _, part = bernoulli_mask(canvas_cpu[row : row + 1], everything, torch.tensor([t]), mask_token_id, generator)
            part = part[0]
            canvas_masked[first] = True
            weights[first] = 0.5
            canvas_masked[first + 1] = part
            weights[first + 1] = part.float() * 0.5 / t
            canvas_masked[first + 2] = ~part
            weights[first + 2] = (~part).float() * 0.5 / (1 - t)
        else:
            if views > 1:
                counts = stratified_mask_counts(canvas_width, views, generator)
            else:
                counts = uniform_mask_counts(torch.tensor([canvas_width]), generator)
            _, masked = mask_target_positions(
                canvas_cpu[row : row + 1].expand(views, -1),
                everything.expand(views, -1),
                counts,
                mask_token_id,
                generator,
            )
            canvas_masked[first : first + views] = masked
            weights[first : first + views] = masked.float() * (canvas_width / counts.float())[:, None] / views
    noisy_canvas = canvas_cpu.repeat_interleave(views, 0).masked_fill(canvas_masked, mask_token_id)
    noisy_ids = torch.cat([noisy_prompt, noisy_canvas], dim=1)
    attention = torch.cat(
        [prompt_mask_cpu.long().repeat_interleave(views, 0), torch.ones(rows * views, canvas_width, dtype=torch.long)],
        dim=1,
    )
    scored = torch.cat([torch.zeros(rows * views, prompt_width, dtype=torch.bool), canvas_masked], dim=1)
    return LikelihoodViews(noisy_ids.to(device), attention.to(device), scored.to(device), weights.to(device), views)


def diffusion_token_logps(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    canvas_ids: torch.Tensor,
    seeds: torch.Tensor,
    *,
    estimator: str,
    upper_bound_rows: torch.Tensor | None = None,
    eubo_beta: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int | None = None,
    **view_settings,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probability estimates [B, C] of canvas `canvas_ids` after prompt `prompt_ids` (see the module
    docstring), and the predictive entropies [B, C] at the scored positions with `compute_entropy`. Rows flagged in
    `upper_bound_rows` ([B] bool, "elbo" only) get SPG's upper-bound terms. Runs the model on `chunk_size` rows (all
    their views) at a time. `view_settings` are `build_views`' keywords: `mask_token_id` (required), `p_mask`,
    `num_mc_samples`, `coupled_t_range`."""
    rows, canvas_width = canvas_ids.shape
    chunk_size = chunk_size or rows
    all_logps, all_entropy = [], []
    for start in range(0, rows, chunk_size):
        end = min(start + chunk_size, rows)
        views = build_views(
            prompt_ids[start:end],
            prompt_mask[start:end],
            canvas_ids[start:end],
            seeds[start:end],
            estimator=estimator,
            **view_settings,
        )
        outputs = model(
            input_ids=views.noisy_ids,
            attention_mask=views.attention_mask,
            logits_to_keep=views.scored,
            use_cache=False,
            output_router_logits=False,
        )
        log_probs = torch.log_softmax(outputs.logits.float(), dim=-1)  # [M, V] the scored positions, row-major
        targets = views.noisy_ids.new_zeros(views.noisy_ids.shape)
        targets[:, -canvas_width:] = canvas_ids[start:end].repeat_interleave(views.num_views, 0)
        picked = log_probs.gather(-1, targets[views.scored][:, None])[:, 0]
        token_logps = torch.zeros(views.scored.shape, dtype=picked.dtype, device=picked.device)
        token_logps = token_logps.masked_scatter(views.scored, picked)[:, -canvas_width:]
        n, size = views.num_views, end - start
        weights = views.weights.to(token_logps.dtype)
        estimate = (weights * token_logps).view(size, n, canvas_width).sum(1)
        if upper_bound_rows is not None and estimator == "elbo" and upper_bound_rows[start:end].any():
            # EUBO_k = W_k (1/beta) log sum_j (w_jk / W_k) p_jk^beta with W_k = sum_j w_jk (0 where no view masks
            # k): the ELBO term's weight on a power mean of the token's probabilities, >= the ELBO term (Jensen).
            total = weights.view(size, n, canvas_width).sum(1)
            share = weights.view(size, n, canvas_width) / total.clamp(min=1e-30)[:, None]
            log_share = torch.where(share > 0, share.clamp(min=1e-30).log(), float("-inf"))
            terms = log_share + eubo_beta * token_logps.view(size, n, canvas_width)
            power_mean = torch.logsumexp(terms, dim=1) / eubo_beta
            eubo = torch.where(total > 0, total * power_mean, torch.zeros_like(estimate))
            flagged = upper_bound_rows[start:end].to(estimate.device)[:, None]
            estimate = torch.where(flagged, eubo, estimate)
        all_logps.append(estimate)
        if compute_entropy:
            with torch.no_grad():
                entropy = -(log_probs.exp() * log_probs).sum(-1)
                per_position = torch.zeros(views.scored.shape, dtype=entropy.dtype, device=entropy.device)
                per_position = per_position.masked_scatter(views.scored, entropy)[:, -canvas_width:]
                seen = (weights > 0).to(entropy.dtype)
                total = (per_position * seen).view(size, n, canvas_width).sum(1)
                all_entropy.append(total / seen.view(size, n, canvas_width).sum(1).clamp(min=1))
    return torch.cat(all_logps), (torch.cat(all_entropy) if compute_entropy else None)


def check_prompt_datasets(train_dataset, eval_dataset, mask_token_id: int, tokenizer) -> None:
    """The prompt datasets, once before TRL reads them: a `datasets` dataset with rows and a `prompt` column, each
    prompt a string or a list of messages (never None, never mixed), and no mask token in any prompt; a ValueError
    names the dataset, the row and the column."""
    for name, dataset in named_datasets(train_dataset, eval_dataset):
        check_container(dataset, name)
        if "prompt" not in column_names(dataset):
            raise ValueError(f"{name} has no 'prompt' column (columns: {column_names(dataset)})")
        check_dataset(dataset, name, [Column("prompt", PROMPT)], mask_token_id=mask_token_id, tokenizer=tokenizer)


class DiffusionGRPOTrainer(ShardedCheckpoints, GRPOTrainer):
    """`GRPOTrainer` for LLaDA-MoE: rollouts from `diffusion_generate` (batched, left-padded prompts, seeded per
    generation batch, each row stopping at its end of turn), log-probabilities from a masked-diffusion estimator
    (`DiffusionGRPOConfig.likelihood_estimator`). Everything else is TRL's: datasets (plain or conversational
    prompts), reward functions and reward models with `reward_weights`, group advantages (`scale_rewards`), the clipped
    loss of `loss_type`, `importance_sampling_level`, k3 KL with `beta`, buffering over `num_iterations`.

    Logs TRL's metrics plus `rollout/nfe` (forwards per rollout row), `rollout/tokens_per_forward`,
    `rollout/seconds` (per generation batch) and `likelihood/forwards_per_row`.

    Reproducibility: rollout sampling and mask seeds come from generators keyed by `args.seed`, the optimizer step,
    the micro-step within it and the process, never the global RNG, so a run resumed from a checkpoint draws what the
    uninterrupted run drew.
    """

    _tag_names = ["trl", "grpo", "diffusion", "llada", "llada-moe"]
    _name = "Diffusion GRPO"
    _paper = {
        "title": "d1: Scaling Reasoning in Diffusion Large Language Models via Reinforcement Learning",
        "id": "2504.12216",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{zhao2025d1,
                title   = {{d1: Scaling Reasoning in Diffusion Large Language Models via Reinforcement Learning}},
                author  = {Siyan Zhao and others},
                year    = 2025,
                journal = {arXiv preprint arXiv:2504.12216},
            }"""),
    }

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: DiffusionGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        ref_model=None,
        rollout_func=None,
    ):
        if not isinstance(args, DiffusionGRPOConfig):
            raise ValueError(f"args must be a DiffusionGRPOConfig, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("DiffusionGRPOTrainer needs processing_class= (the tokenizer); it is not loaded")
        model, quantization_config = load_policy(model, args, quantization_config)
        peft = peft_config is not None or is_peft_model(model)
        if args.beta != 0.0 and ref_model is None and not peft:
            raise ValueError(
                f"beta={args.beta}: the KL term needs a reference. Pass ref_model= (a separately built or loaded copy "
                "of the initial policy) or train an adapter with peft_config= (the reference is the adapter-disabled "
                "base); beta=0.0 needs none. The reference is never reloaded from config._name_or_path."
            )
        if ref_model is not None and (args.beta == 0.0 or peft):
            raise ValueError(
                "ref_model= is used only for full fine-tuning with beta > 0 (beta=0 needs no reference; under PEFT "
                "the reference is the adapter-disabled base)"
            )
        check_models(model, ref_model, peft_config)
        config = model.config
        self.mask_token_id = resolve_mask_token_id(args, config, processing_class, "DiffusionGRPOConfig.mask_token_id")
        check_prompt_datasets(train_dataset, eval_dataset, self.mask_token_id, processing_class)
        saved = router_settings(config)
        self._skip_parent_logps = False
        self._logps_context = None
        # GRPOTrainer builds a reference from `config._name_or_path` when beta > 0 and there is no adapter; with our
        # own reference, hide beta from it and put the reference in place afterwards.
        beta, sync, own_reference = args.beta, args.sync_ref_model, ref_model is not None
        if own_reference:
            args.beta, args.sync_ref_model = 0.0, False
        try:
            super().__init__(
                model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                reward_processing_classes=reward_processing_classes,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
                rollout_func=rollout_func,
            )
        finally:
            args.beta, args.sync_ref_model = beta, sync
        self.beta = beta
        if own_reference:
            ref_model.eval().requires_grad_(False)
            if self.is_deepspeed_enabled:
                from trl.models.utils import prepare_deepspeed

                ref_model = prepare_deepspeed(ref_model, self.accelerator)
            elif self.is_fsdp_enabled:
                from trl.models.utils import prepare_fsdp

                ref_model = prepare_fsdp(ref_model, self.accelerator)
            else:
                ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
            self.ref_model = ref_model
            if args.sync_ref_model:
                from trl.trainer.callbacks import SyncRefModelCallback

                self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        restore_router_settings(self.model.config, saved)
        self.diffusion_generation_config = self._build_generation_config(args)

    def _build_generation_config(self, args: DiffusionGRPOConfig) -> DiffusionGenerationConfig:
        """The rollouts' `DiffusionGenerationConfig`: preset, then the config's decoding fields, then
        `generation_kwargs`; stops each row at its first end-of-turn / EOS id."""
        fields = dict(
            max_new_tokens=args.max_completion_length,
            steps=args.diffusion_steps,
            block_length=args.block_length or args.max_completion_length,
            temperature=args.temperature,
            top_p=args.top_p if args.temperature > 0 and args.top_p < 1.0 else None,
            top_k=args.top_k if args.temperature > 0 and args.top_k else None,
            remasking=args.remasking,
            stop_at_eos=True,
            eos_token_id=list(self.eos_token_ids),
            pad_token_id=self._tokenizer.pad_token_id,
            mask_token_id=self.mask_token_id,
            return_dict_in_generate=True,
        )
        fields.update(args.generation_kwargs or {})
        if args.decoding_preset is not None:
            preset = {key: value for key, value in fields.items() if key != "temperature" or value > 0}
            config = DiffusionGenerationConfig.from_preset(args.decoding_preset, **preset)
            config.temperature = args.temperature
            config.do_sample = args.temperature > 0
        else:
            config = DiffusionGenerationConfig(**fields)
        try:
            config.validate()
        except ValueError as error:
            raise ValueError(f"DiffusionGRPOConfig decoding settings: {error}") from error
        return config

    # ---- random streams ----

    def _step_key(self) -> list[int]:
        """(optimizer step, micro-step in it, process): what identifies a generation batch, also after resuming."""
        return [self.state.global_step, self._step % self.args.gradient_accumulation_steps, self.args.process_index]

    # ---- rollouts ----

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None or multimodal_fields:
            raise ValueError("DiffusionGRPOTrainer: LLaDA-MoE takes text prompts only (no images)")
        device = self.accelerator.device
        prompts = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids]
        pad_id = self._tokenizer.pad_token_id
        input_ids = pad(prompts, padding_value=pad_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left").to(device)
        mode = "train" if self.model.training else "eval"
        generator = example_generator(self.args.seed, [ROLLOUT_STREAM, int(mode == "eval"), *self._step_key()])
        started = time.perf_counter()
        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            output = unwrapped.diffusion_generate(
                input_ids,
                attention_mask=attention_mask,
                generation_config=self.diffusion_generation_config,
                generator=generator,
            )
        seconds = time.perf_counter() - started
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        metrics["rollout/nfe"].append(gather(output.nfe.float().to(device)).mean().item())
        metrics["rollout/tokens_per_forward"].append(gather(output.tokens_per_forward.float().to(device)).mean().item())
        metrics["rollout/seconds"].append(seconds)
        completion = output.sequences[:, input_ids.shape[1] :].cpu()
        stops = torch.isin(completion, torch.tensor(self.eos_token_ids))
        ends = torch.where(stops.any(1), stops.int().argmax(1) + 1, completion.shape[1])
        return [row[:end].tolist() for row, end in zip(completion, ends.tolist())], None

    # ---- log-probabilities ----

    def _estimator_kwargs(self) -> dict:
        args: DiffusionGRPOConfig = self.args
        return dict(
            estimator=args.likelihood_estimator,
            mask_token_id=self.mask_token_id,
            p_mask=args.p_mask,
            num_mc_samples=args.num_mc_samples,
            coupled_t_range=(args.coupled_min_t, args.coupled_max_t),
            eubo_beta=args.eubo_beta,
        )

    def _canvas(self, completion_ids: torch.Tensor) -> torch.Tensor:
        """The completion as the rollout's canvas: right-padded with pad (what `stop_at_eos` fills) to the canvas
        length `max_completion_length`."""
        extra = self.args.max_completion_length - completion_ids.shape[1]
        if extra <= 0:
            return completion_ids
        return torch.cat(
            [completion_ids, completion_ids.new_full((completion_ids.shape[0], extra), self._tokenizer.pad_token_id)], 1
        )

    def token_logps(self, model, inputs: dict, seeds: torch.Tensor, compute_entropy: bool = False):
        """Per-token log-probability estimates [B, T] (and entropies) of the completions of a generation batch
        `inputs` (TRL's keys) under `model`, with row b's masks drawn from `seeds[b]`."""
        width = inputs["completion_ids"].shape[1]
        upper = None
        if self.args.elbo_upper_bound:
            advantages = inputs["advantages"]
            upper = (advantages if advantages.dim() == 1 else advantages[:, 0]) < 0
        chunk = self.args.per_device_train_batch_size if self.model.training else self.args.per_device_eval_batch_size
        logps, entropy = diffusion_token_logps(
            model,
            inputs["prompt_ids"],
            inputs["prompt_mask"],
            self._canvas(inputs["completion_ids"]),
            seeds,
            upper_bound_rows=upper,
            compute_entropy=compute_entropy,
            chunk_size=chunk,
            **self._estimator_kwargs(),
        )
        return logps[:, :width], (entropy[:, :width] if entropy is not None else None)

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **kwargs,
    ):
        if self._skip_parent_logps:  # TRL's rollout scoring: replaced by the per-iteration estimates
            return None, None, None
        if self._logps_context is None:
            raise RuntimeError("DiffusionGRPOTrainer: per-token log-probabilities need the batch's mask seeds")
        inputs, seeds = self._logps_context
        logps, entropy = self.token_logps(model, inputs, seeds, compute_entropy=compute_entropy)
        if compute_entropy and entropy is None:
            entropy = torch.zeros_like(logps)
        return logps, entropy, None

    def _reference_context(self):
        if self.ref_model is not None:
            return self.ref_model, contextlib.nullcontext()
        unwrapped = self.accelerator.unwrap_model(self.model)
        return self.model, use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        self._skip_parent_logps = True
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._skip_parent_logps = False
        rows = output["prompt_ids"].shape[0]
        device = output["prompt_ids"].device
        iterations = self.num_iterations if mode == "train" else 1
        generator = example_generator(self.args.seed, [SEED_STREAM, int(mode == "eval"), *self._step_key()])
        seeds = torch.randint(0, 2**62, (rows, iterations), generator=generator)
        output["mask_seeds"] = seeds.to(device)
        generate_every = self.args.steps_per_generation * self.num_iterations
        need_old = mode == "train" and (
            self.num_iterations > 1 or self.args.gradient_accumulation_steps % generate_every != 0
        )
        views = VIEWS_PER_ESTIMATOR[self.args.likelihood_estimator](self.args.num_mc_samples)
        self._metrics[mode]["likelihood/forwards_per_row"].append(
            float(views * (1 + (iterations if need_old else 0) + (iterations if self.beta != 0.0 else 0)))
        )
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if need_old:
                output["old_per_token_logps"] = torch.stack(
                    [self.token_logps(self.model, output, seeds[:, i])[0] for i in range(iterations)], dim=1
                )
            if self.beta != 0.0:
                model, context = self._reference_context()
                with context:
                    output["ref_per_token_logps"] = torch.stack(
                        [self.token_logps(model, output, seeds[:, i])[0] for i in range(iterations)], dim=1
                    )
        return output

    def _iteration(self) -> int:
        """Index of the current inner iteration over a buffered generation batch (0 in evaluation)."""
        if not self.model.training:
            return 0
        return (self._step // self.args.steps_per_generation) % self.num_iterations

    def _compute_loss(self, model, inputs):
        iteration = self._iteration()
        seeds = inputs["mask_seeds"][:, iteration].cpu()
        sliced = dict(inputs)
        for key in ("old_per_token_logps", "ref_per_token_logps"):
            if key in inputs:
                sliced[key] = inputs[key][:, iteration]
        self._logps_context = (inputs, seeds)
        try:
            return super()._compute_loss(model, sliced)
        finally:
            self._logps_context = None


__all__ = [
    "DiffusionGRPOConfig",
    "DiffusionGRPOTrainer",
    "LikelihoodViews",
    "build_views",
    "diffusion_token_logps",
]
