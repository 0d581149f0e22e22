"""`diffusion_generate` for LLaDA-MoE: semi-autoregressive masked-diffusion decoding.

The generation code is split by concern into flat files (shipped with a saved model): the settings
(`generation_config.py`: `DiffusionGenerationConfig`, presets, declared checks), the block cache
(`generation_cache.py`), the unmasking rules (`unmasking.py`), the input checks (`generation_inputs.py`) and, here,
the loop: `DiffusionGenerationMixin` with `generate`, `diffusion_generate` and `diffusion_loglikelihood`. The names
those files define are importable from here too.

Each call builds one `DecodingState` (a typed dataclass) holding the canvas, its bookkeeping and the strategies the
config asks for, chosen once: an `UnmaskingPolicy` (which masked positions a step commits: the reference quota,
threshold, factor, hierarchy, under credit decoding or not) and an `InputSmoothing` (iteration smoothing or none).
The loop then denoises one `ActiveBlock` at a time; each step runs the model on the columns the cache needs, lets the
smoothing, the `logits_processor` and the policy see the logits, proposes a token and a confidence per position and
commits the positions the policy selects. In threshold / factor decoding a row whose block is final leaves the rest
of that block's forwards.

With `temperature=0`, no `threshold` / `factor` and no cache (every strategy off: the defaults), the result is
token-identical to the LLaDA reference sampler (`generate.py`): same per-block step split, confidences in the logits
dtype, per-row top-k over the whole row with -inf past the current block.

`generate` takes every calling form of transformers' `GenerationMixin.generate` (so `pipeline("text-generation")`
works), and follows transformers' diffusion conventions (DiffusionGemma): `logits_processor` acts on every step's
logits, `stopping_criteria` are checked once a block is final, and a streamer gets `put_draft(block)` after every
denoising step and `put(block)` once the block is final.

Guarantees, in every mode (reference, threshold, factor, caches, CFG, sampling, batches): the mask token is never
proposed (its logit is -inf for proposals; confidences still use the model's whole distribution, as the reference
does, so its rankings are unchanged); threshold / factor steps commit at least one masked position of every
unfinished row, and a block gets at most its length + `FORWARD_CAP_MARGIN` forwards, the last of which commits every
position left (the threshold / factor ignored); NaN or +inf logits (unless `remove_invalid_values=True`), or a
position with no token left after `suppress_tokens` and a `logits_processor`, raise a `ValueError` naming the likely
cause (one check per forward); a candidate with a non-finite confidence ranks last. `max_time` ends refinement: the
forward after the budget is spent commits every mask left. Every argument is checked before the first forward
(processors and stopping criteria when they are called): `TypeError` for a wrong type, `ValueError` for a wrong
value, naming it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.logits_process import InfNanRemoveLogitsProcessor, SuppressTokensLogitsProcessor
from transformers.utils import GENERATION_CONFIG_NAME, ModelOutput

from .forward_process import elbo_weighted_nll, mask_target_positions, stratified_mask_counts
from .generation_cache import DiffusionBlockCache, DiffusionCacheLayer
from .generation_config import (
    AR_ONLY_FIELDS,
    CACHE_IMPLEMENTATIONS,
    CONFIDENCE_DTYPES,
    DECODING_PRESETS,
    DIFFUSION_DEFAULTS,
    FACTOR_RULES,
    FIELD_RULES,
    PRESET_FIELDS_OFF,
    REMASKING_STRATEGIES,
    SAVED_CACHE_KEY,
    DiffusionGenerationConfig,
    decoding_preset,
)
from .generation_inputs import (
    SpecialTokens,
    as_list_of,
    check_attention_mask,
    check_cfg_scale_fits,
    check_generation_hooks,
    check_loglikelihood_settings,
    check_prompt_ids,
    check_prompt_tokens,
    check_suppressed_tokens,
    check_token_type_ids,
    special_tokens,
    token_id_sequence,
)
from .unmasking import (
    FORWARD_CAP_MARGIN,
    CreditPolicy,
    FactorPolicy,
    HierarchyPolicy,
    InputSmoothing,
    IterationSmoothing,
    NoSmoothing,
    QuotaPolicy,
    ThresholdPolicy,
    UnmaskingPolicy,
    confidence,
    exclude_mask_token,
    fuse_credit,
    input_smoothing,
    non_finite_message,
    propose_tokens,
    select_by_factor,
    select_by_hierarchy,
    select_by_quota,
    select_by_threshold,
    transfer_schedule,
    unmasking_policy,
)
from .validators import is_int, is_number


__all__ = [
    "AR_ONLY_FIELDS",
    "CACHE_IMPLEMENTATIONS",
    "CONFIDENCE_DTYPES",
    "DECODING_PRESETS",
    "DIFFUSION_DEFAULTS",
    "FACTOR_RULES",
    "FIELD_RULES",
    "FORWARD_CAP_MARGIN",
    "PRESET_FIELDS_OFF",
    "REMASKING_STRATEGIES",
    "ActiveBlock",
    "CreditPolicy",
    "DecodingHooks",
    "DecodingState",
    "DiffusionBlockCache",
    "DiffusionCacheLayer",
    "DiffusionGenerateOutput",
    "DiffusionGenerationConfig",
    "DiffusionGenerationMixin",
    "FactorPolicy",
    "HierarchyPolicy",
    "InputSmoothing",
    "IterationSmoothing",
    "NoSmoothing",
    "QuotaPolicy",
    "SpecialTokens",
    "ThresholdPolicy",
    "UnmaskingPolicy",
    "as_list_of",
    "confidence",
    "decoding_preset",
    "exclude_mask_token",
    "fuse_credit",
    "input_smoothing",
    "is_int",
    "is_number",
    "process_block_logits",
    "propose_tokens",
    "select_by_factor",
    "select_by_hierarchy",
    "select_by_quota",
    "select_by_threshold",
    "split_blocks",
    "split_steps",
    "token_id_sequence",
    "transfer_schedule",
    "unmasking_policy",
]


def split_blocks(max_new_tokens: int, block_length: int) -> list[int]:
    """Block lengths of a canvas: whole blocks of `block_length`, then a shorter last block for the remainder."""
    full, rest = divmod(max_new_tokens, block_length)
    return [block_length] * full + ([rest] if rest else [])


def split_steps(total_steps: int, blocks: list[int]) -> list[int]:
    """Denoising steps per block, in proportion to the block lengths (cumulative rounding, >= 1 each, summing to
    `total_steps`). With equal blocks and a multiple of their number this is the reference's even split."""
    canvas, done, end, steps = sum(blocks), 0, 0, []
    for k, length in enumerate(blocks, start=1):
        end += length
        target = (2 * total_steps * end + canvas) // (2 * canvas)  # total_steps * end / canvas, rounded half up
        target = min(max(target, done + 1), total_steps - (len(blocks) - k))
        steps.append(target - done)
        done = target
    return steps



@dataclass
class DiffusionGenerateOutput(ModelOutput):
    """
    sequences: [B, P + max_new_tokens] prompt and generated tokens.
    nfe: [B] forward passes each row took part in.
    tokens_per_forward: [B] generated tokens kept (not pad-filled) per forward pass.
    unmask_step: [B, max_new_tokens] index of the forward pass whose output committed each generated token
        (-1 where the token was filled with pad after a stop).
    history: one [B, P + max_new_tokens] canvas after every step, with `output_history=True`.
    """

    sequences: torch.LongTensor | None = None
    nfe: torch.LongTensor | None = None
    tokens_per_forward: torch.FloatTensor | None = None
    unmask_step: torch.LongTensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None



def process_block_logits(
    processors: LogitsProcessorList, canvas: torch.Tensor, logits: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """`logits` [B, W, V] with the columns [lo, hi) (the current block) passed through `processors`, one row per
    position: `scores` [B * (hi - lo), V], `input_ids` the canvas row of each position [B * (hi - lo), L]."""
    batch, _, vocab = logits.shape
    block = logits[:, lo:hi].reshape(-1, vocab)
    processed = processors(canvas.repeat_interleave(hi - lo, dim=0), block)
    if not isinstance(processed, torch.Tensor) or processed.shape != block.shape:
        shown = tuple(processed.shape) if isinstance(processed, torch.Tensor) else type(processed).__name__
        raise ValueError(
            f"diffusion_generate: the logits_processor returned {shown}; expected a tensor of the scores' shape "
            f"{tuple(block.shape)} (one row per position of the block)"
        )
    processed = processed.reshape(batch, hi - lo, vocab)
    return torch.cat([logits[:, :lo], processed.to(logits.dtype), logits[:, hi:]], dim=1)



@dataclass
class _Guidance:
    """The one setting of `diffusion_loglikelihood` that can make its logits non-finite, for `non_finite_message`."""

    cfg_scale: float


@dataclass
class DecodingHooks:
    """The objects of a `diffusion_generate` call that are not config fields: the streamer, the RNG, the tokenizer
    (for `stop_strings`), the logits processors and the stopping criteria."""

    streamer: Any = None
    generator: torch.Generator | None = None
    tokenizer: Any = None
    logits_processor: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    stopping_criteria: StoppingCriteriaList = field(default_factory=StoppingCriteriaList)


@dataclass
class ActiveBlock:
    """The block [start, end) being denoised in `steps` steps (a budget the reference quota spends; the parallel
    rules run until it is filled), the canvas rows still decoding it (`rows`, with their canvas `xs`, attention
    `masks` and `prompts` positions: a row whose block is final may leave), its cache, and the step it is at."""

    start: int
    end: int
    steps: int
    rows: torch.Tensor
    xs: torch.Tensor
    masks: torch.Tensor
    prompts: torch.Tensor
    cache: DiffusionBlockCache | None = None
    step: int = 0

    @classmethod
    def open(cls, state: DecodingState, columns: tuple[int, int], steps: int, rows: torch.Tensor, num_layers: int):
        mode = state.config.cache_mode
        cache = DiffusionBlockCache(mode, num_layers) if mode is not None else None
        return cls(
            *columns, steps, rows, state.canvas[rows], state.attention_mask[rows], state.prompt_index[rows], cache
        )

    def masked(self, mask_id: int) -> torch.Tensor:
        """[rows, length]: the block's positions that are still masks."""
        return self.xs[:, self.start : self.end] == mask_id

    def keep_rows(self, keep: torch.Tensor, guided: bool) -> None:
        """Only the rows `keep` go on (with CFG, `guided`, the cache holds the conditional rows then the
        unconditional ones)."""
        count = self.rows.shape[0]
        self.rows, self.xs = self.rows[keep], self.xs[keep]
        self.masks, self.prompts = self.masks[keep], self.prompts[keep]
        if self.cache is not None:
            self.cache.keep_rows(torch.cat([keep, keep + count]) if guided else keep)


@dataclass
class DecodingState:
    """Everything the sampling loop of one call reads and updates: the canvas [B, P + N] (the prompt, then
    `max_new_tokens` positions, masked until committed), its attention mask, the positions the unconditional CFG
    copy masks (the prompt), the settings and the strategies chosen once for the call, and the bookkeeping of the
    output (`nfe`, `unmask_step`, `history`). Its methods are the loop's steps that touch no model: the proposals
    and scores of a step, committing them, and where a row stops."""

    canvas: torch.Tensor
    attention_mask: torch.Tensor
    prompt_index: torch.Tensor
    config: DiffusionGenerationConfig
    special: SpecialTokens
    hooks: DecodingHooks
    policy: UnmaskingPolicy
    smoothing: InputSmoothing
    forward: Callable  # the model's call: eager, or compiled with `compile_config`
    static_rows: bool = False  # compiled: finished rows stay in the batch, so a block's steps keep one shape
    cudagraphs: bool = False  # compiled with CUDA graphs: mark each step and copy the logits out of the graph
    nfe: torch.Tensor = field(init=False)  # [B] forwards each row took part in
    unmask_step: torch.Tensor = field(init=False)  # [B, N] the forward that committed each token (-1: none)
    history: list[torch.Tensor] | None = field(init=False)  # the canvas after every step, with output_history
    forwards: int = 0  # denoising steps run so far in this call (cache_warmup_steps, the smoothing and decay schedules)
    deadline: float | None = None  # time.monotonic() at which `max_time` is spent (None: no budget)

    def __post_init__(self):
        batch, device = self.canvas.shape[0], self.canvas.device
        self.nfe = torch.zeros(batch, dtype=torch.long, device=device)
        self.unmask_step = torch.full((batch, self.config.max_new_tokens), -1, dtype=torch.long, device=device)
        self.history = [] if self.config.output_history else None

    def out_of_time(self) -> bool:
        """Whether the `max_time` budget is spent (checked before each forward)."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    @property
    def prompt_length(self) -> int:
        return self.canvas.shape[1] - self.config.max_new_tokens

    @property
    def draft_streamer(self):
        """The streamer when it takes the draft of every step (`put_draft`, as `TextDiffusionStreamer`), else None."""
        return self.hooks.streamer if hasattr(self.hooks.streamer, "put_draft") else None

    def refreshes_cache(self, block: ActiveBlock) -> bool:
        """Whether the step runs the whole canvas to refresh the cache: at the block start, in the call's warm-up
        forwards, and every `cache_refresh_interval` steps."""
        config = self.config
        return (
            block.step == 0
            or self.forwards < config.cache_warmup_steps
            or (config.cache_refresh_interval is not None and block.step % config.cache_refresh_interval == 0)
        )

    def proposals(self, block: ActiveBlock, logits: torch.Tensor, window: tuple[int, int]):
        """(proposal, scores, candidates), each [rows, canvas]: the token each masked position would take (the
        others keep theirs), its confidence (-inf outside the block's masked positions, the `candidates`)."""
        config, mask_id, xs, generator = self.config, self.special.mask, block.xs, self.hooks.generator
        allowed = exclude_mask_token(
            logits, mask_id, block.start - window[0], block.end - window[0], config,
            processed=bool(self.hooks.logits_processor),
        )
        proposal_w = propose_tokens(allowed, config.temperature, config.top_k, config.top_p, generator)
        scores_w = confidence(
            logits, proposal_w, config.remasking, config.confidence_suppress_tokens, generator,
            CONFIDENCE_DTYPES.get(config.confidence_dtype),
        )
        proposal = xs.clone()
        proposal[:, window[0] : window[1]] = proposal_w
        scores = torch.full(xs.shape, float("-inf"), dtype=scores_w.dtype, device=xs.device)
        scores[:, window[0] : window[1]] = scores_w
        is_mask = xs == mask_id
        candidates = torch.zeros_like(is_mask)
        candidates[:, block.start : block.end] = is_mask[:, block.start : block.end]
        # A candidate's score that is not a number (its softmax undefined, e.g. +inf logits) ranks below every
        # finite one but above the -inf of the other positions, so the quota / best-first rules still take it.
        low, high = torch.finfo(scores.dtype).min, torch.finfo(scores.dtype).max
        scores = torch.where(candidates, scores.nan_to_num(nan=low, posinf=high, neginf=low), float("-inf"))
        return torch.where(is_mask, proposal, xs), scores, candidates

    def commit(self, block: ActiveBlock, xs: torch.Tensor, selected: torch.Tensor, still_masked: torch.Tensor) -> None:
        """Write the step's canvas `xs` of the block's rows (its `selected` positions filled), count the forward for
        the rows that took part and record which forward committed each token; stream the draft."""
        rows = block.rows
        participating = still_masked if self.policy.fills_block else torch.ones_like(still_masked)
        step_index = self.nfe[rows]
        self.nfe[rows] += participating.long()
        generated = selected[:, self.prompt_length :]
        unmask = self.unmask_step[rows]
        unmask[generated] = step_index[:, None].expand_as(generated)[generated]
        self.unmask_step[rows] = unmask
        block.xs = xs
        self.canvas[rows] = xs
        if self.history is not None:
            self.history.append(self.canvas.clone())
        if self.draft_streamer is not None:
            self.draft_streamer.put_draft(self.canvas[:, block.start : block.end].cpu())

    def row_stops(self, row: int, columns: tuple[int, int]) -> int | None:
        """After the block [start, end) is final: where row `row` stops (EOS, a stop string or one of the
        `stopping_criteria`, at the first position of the block where one applies): the number of generated tokens
        it keeps, its tail padded; None if it goes on."""
        x, config, prompt_len, (start, end) = self.canvas, self.config, self.prompt_length, columns
        generated = x[row, prompt_len:end]
        cut = None
        if config.stop_at_eos:
            hits = torch.isin(generated, torch.tensor(self.special.eos, device=x.device)).nonzero()
            if hits.numel():
                cut = int(hits[0]) + 1
        first, last = start - prompt_len + 1, generated.numel() if cut is None else cut - 1
        if config.stop_strings:
            for length in range(first, last + 1):
                text = self.hooks.tokenizer.decode(generated[:length])
                if any(stop in text for stop in config.stop_strings):
                    cut = last = length
                    break
        if self.hooks.stopping_criteria:
            for length in range(first, last + 1):
                if stopping_says_stop(self.hooks.stopping_criteria, x[row : row + 1, : prompt_len + length]):
                    cut = length
                    break
        if cut is not None:
            x[row, prompt_len + cut :] = self.special.pad
        return cut

    def output(self) -> torch.LongTensor | DiffusionGenerateOutput:
        if not self.config.return_dict_in_generate:
            return self.canvas
        kept = (self.unmask_step >= 0).sum(dim=1).float()
        return DiffusionGenerateOutput(
            sequences=self.canvas,
            nfe=self.nfe,
            tokens_per_forward=kept / self.nfe.clamp(min=1),
            unmask_step=self.unmask_step,
            history=tuple(self.history) if self.history is not None else None,
        )


def stopping_says_stop(criteria: StoppingCriteriaList, input_ids: torch.Tensor) -> bool:
    """Whether any of `criteria` says the one row `input_ids` [1, L] is done: each must return a bool or a bool tensor
    of one value per row (transformers' contract), else a `ValueError` names the criterion."""
    for criterion in criteria:
        result = criterion(input_ids, None)
        if isinstance(result, bool):
            done = result
        elif isinstance(result, torch.Tensor) and result.numel() == input_ids.shape[0] and (
            result.dtype == torch.bool or not result.dtype.is_floating_point
        ):
            done = bool(result.any())
        else:
            shown = f"shape {tuple(result.shape)}" if isinstance(result, torch.Tensor) else repr(result)
            raise ValueError(
                f"diffusion_generate: the stopping criterion {type(criterion).__name__} returned {shown}; expected "
                f"a bool tensor of one value per row ({input_ids.shape[0]})"
            )
        if done:
            return True
    return False


class DiffusionGenerationMixin:
    """Adds `diffusion_generate`, `generate` and `diffusion_loglikelihood` to a masked-diffusion LM."""

    generation_config_class = DiffusionGenerationConfig

    def adjust_generation_fn(
        self,
        generation_config: GenerationConfig | None,
        from_auto_class: bool,
        from_pipeline: bool,
        pretrained_model_name_or_path,
        cache_dir=None,
        force_download: bool = False,
        proxies=None,
        local_files_only: bool = False,
        token=None,
        revision: str = "main",
        subfolder: str = "",
        **kwargs,
    ) -> None:
        """Called by `from_pretrained`: load `generation_config.json` as a `DiffusionGenerationConfig`."""
        if generation_config is not None:
            self.generation_config = DiffusionGenerationConfig.from_dict(generation_config.to_dict())
            return
        if pretrained_model_name_or_path is None:  # from_pretrained(None, config=, state_dict=): no folder to read
            return
        try:
            self.generation_config = DiffusionGenerationConfig.from_pretrained(
                pretrained_model_name_or_path,
                cache_dir=cache_dir,
                force_download=force_download,
                proxies=proxies,
                local_files_only=local_files_only,
                token=token,
                revision=revision,
                subfolder=subfolder,
            )
        except OSError as err:
            local = Path(pretrained_model_name_or_path, subfolder or "", GENERATION_CONFIG_NAME)
            if local.is_file():  # there, but unreadable: never fall back to defaults silently
                raise ValueError(f"'{local}' is a corrupt generation config: {err}") from err
            # no generation_config.json: keep the one built from the model config

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        prefix_allowed_tokens_fn=None,
        synced_gpus: bool | None = None,
        assistant_model=None,
        streamer=None,
        negative_prompt_ids: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        custom_generate=None,
        **kwargs,
    ) -> torch.LongTensor | DiffusionGenerateOutput:
        """transformers' `GenerationMixin.generate` signature, decoded by `diffusion_generate`.

        Takes the prompt positionally or as `input_ids=` (with `attention_mask=`, e.g. `**tokenizer(text,
        return_tensors="pt")`), a `generation_config` and field overrides as keyword arguments, so pipelines and
        harnesses written for `generate` work unchanged. The arguments that only mean something for autoregressive
        decoding (`prefix_allowed_tokens_fn`, `assistant_model`, `negative_prompt_ids`, `custom_generate`, ...)
        raise a `ValueError` when set.
        """
        given = {
            "prefix_allowed_tokens_fn": prefix_allowed_tokens_fn,
            "synced_gpus": synced_gpus,
            "assistant_model": assistant_model,
            "negative_prompt_ids": negative_prompt_ids,
            "negative_prompt_attention_mask": negative_prompt_attention_mask,
            "custom_generate": custom_generate,
        }
        for name, value in given.items():
            if value is not None and value is not False:
                shown = repr(value) if isinstance(value, (bool, int, float, str)) else f"<{type(value).__name__}>"
                raise ValueError(
                    f"generate: {name}={shown} is not supported by masked-diffusion decoding; leave it unset"
                )
        if inputs is not None and kwargs.get("input_ids") is not None:
            raise ValueError("generate: the prompt was given twice, as `inputs` and as `input_ids=`; pass one")
        input_ids = kwargs.pop("input_ids", None)
        return self.diffusion_generate(
            inputs if inputs is not None else input_ids,
            generation_config=generation_config,
            streamer=streamer,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            **kwargs,
        )

    def _resolve_generation_config(
        self, generation_config, kwargs: dict, prompt_length: int | None = None
    ) -> DiffusionGenerationConfig:
        """A validated copy of `generation_config` (default: the model's) with the call's `kwargs` applied.

        With `prompt_length`, a `max_length` (prompt + canvas, as in transformers) becomes `max_new_tokens`."""
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            shown = repr(generation_config) if isinstance(generation_config, (str, int, float)) else (
                f"a {type(generation_config).__name__}"
            )
            raise TypeError(
                f"diffusion_generate: generation_config={shown}; expected a DiffusionGenerationConfig or a "
                "transformers GenerationConfig (pass settings as keyword arguments, e.g. **{...}, or "
                "DiffusionGenerationConfig(**{...}))"
            )
        base = generation_config if generation_config is not None else self.generation_config
        if not isinstance(base, DiffusionGenerationConfig):
            base = self._from_plain_config(base)
        config = copy.deepcopy(base)
        fields = {name for name in vars(config) if not name.startswith("_")}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise ValueError(
                f"diffusion_generate: unknown keyword argument(s) {unknown}; accepted are the DiffusionGeneration"
                "Config fields, `attention_mask`, `streamer`, `generator`, `tokenizer`, `logits_processor` and "
                "`stopping_criteria`."
            )
        if kwargs.get("use_cache") is False and kwargs.get("cache_implementation") is not None:
            raise ValueError(
                f"diffusion_generate: use_cache=False turns the cache off, but cache_implementation="
                f"{kwargs['cache_implementation']!r} asks for one; pass one of them"
            )
        for name, value in kwargs.items():
            setattr(config, name, value)
        if "temperature" in kwargs and "do_sample" not in kwargs:
            config.do_sample = None  # the call's temperature decides (0 greedy, > 0 sampling)
        elif kwargs.get("do_sample") is False and "temperature" not in kwargs:
            config.temperature = 0.0  # transformers' meaning: do_sample=False is greedy decoding
        if "max_new_tokens" in kwargs and "max_length" not in kwargs:
            config.max_length = None  # the call's canvas beats a configured total length, as in transformers
        if config.max_length is not None and prompt_length is not None:
            canvas = config.max_length - prompt_length
            if canvas < 1:
                raise ValueError(
                    f"diffusion_generate: max_length={config.max_length} (prompt + new tokens) leaves no room after "
                    f"the {prompt_length}-token prompt; pass a larger max_length, or max_new_tokens"
                )
            if "max_new_tokens" in kwargs and kwargs["max_new_tokens"] != canvas:
                raise ValueError(
                    f"diffusion_generate: max_new_tokens={kwargs['max_new_tokens']} and max_length="
                    f"{config.max_length} disagree for a {prompt_length}-token prompt (max_length means prompt + new "
                    "tokens); pass one of them"
                )
            config.max_new_tokens = canvas
        config.validate()
        return config

    def _from_plain_config(self, plain: GenerationConfig) -> DiffusionGenerationConfig:
        """A plain transformers `GenerationConfig` as transformers' `generate` reads one: the fields it sets (not
        None, custom entries included) over the model's generation config, whose values fill the rest."""
        model_config = self.generation_config
        if not isinstance(model_config, DiffusionGenerationConfig):
            model_config = DiffusionGenerationConfig()
        settings = {
            key: value for key, value in plain.to_dict().items()
            if value is not None and key not in ("transformers_version", "_from_model_config")
        }
        merged = {**model_config.to_dict(), **settings}
        if "cache_implementation" in settings:  # the plain field, when set, wins over the saved cache key
            merged.pop(SAVED_CACHE_KEY, None)
        if "temperature" in settings and "do_sample" not in settings:
            merged["do_sample"] = None  # the plain config's temperature decides, as a call's does
        elif settings.get("do_sample") is False and "temperature" not in settings:
            merged["temperature"] = 0.0
        if "max_new_tokens" in settings and "max_length" not in settings:
            merged["max_length"] = None
        return DiffusionGenerationConfig.from_dict(merged)

    @torch.no_grad()
    def diffusion_generate(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        streamer=None,
        generator: torch.Generator | None = None,
        tokenizer=None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        **kwargs,
    ) -> torch.LongTensor | DiffusionGenerateOutput:
        """Fill `max_new_tokens` masked positions after a left-padded prompt, block by block.

        Args:
            input_ids: [B, P] prompt ids, left-padded when rows differ in length (also accepted as `inputs=`).
            attention_mask: [B, P] 1 for real tokens, 0 for left padding (right padding is rejected). A tokenizer's
                all-zero `token_type_ids` are accepted and unused (the model has no token types).
            generation_config: a `DiffusionGenerationConfig`; keyword arguments override its fields.
            streamer: a transformers `BaseStreamer`: gets `put(prompt)`, then `put_draft(block)` after every
                denoising step (if it has `put_draft`, e.g. `TextDiffusionStreamer`: the current block [B, length]
                with masks in place), `put(block)` once each block is final, and `end()`.
            generator: a `torch.Generator` for `temperature > 0`, `remasking="random"` (reproducible runs).
            tokenizer: needed with `stop_strings`.
            logits_processor: transformers logits processors, applied to every step's logits of the current
                block before proposals and confidences: called with the canvas rows (masks in place, repeated per
                position) as `input_ids` [B * length, L] and the block's logits as `scores` [B * length, V].
            stopping_criteria: transformers stopping criteria, checked once a block is final on every prefix of
                it (`input_ids` = prompt + generated tokens up to that position, `scores=None`): a row stops at the
                first position where one returns True; its later tokens become `pad_token_id`.

        Returns:
            LongTensor [B * num_return_sequences, P + max_new_tokens], or a `DiffusionGenerateOutput` with
            `return_dict_in_generate=True`.
        """
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        token_type_ids = kwargs.pop("token_type_ids", None)
        logits_processor = as_list_of(logits_processor, LogitsProcessorList, "logits_processor")
        stopping_criteria = as_list_of(stopping_criteria, StoppingCriteriaList, "stopping_criteria")
        prompt_length = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) else None
        config = self._resolve_generation_config(generation_config, kwargs, prompt_length)
        check_generation_hooks(streamer, generator, tokenizer, config)
        input_ids, attention_mask, special = self._check_generation_inputs(
            input_ids, attention_mask, config, tokenizer, token_type_ids
        )
        if stopping_criteria and special.pad is None:
            raise ValueError(
                "diffusion_generate: stopping_criteria need a pad_token_id (or eos_token_id) to fill the tail"
            )
        hooks = DecodingHooks(streamer, generator, tokenizer, logits_processor, stopping_criteria)
        copies = config.num_return_sequences
        rows = input_ids.shape[0] * copies
        # every forward computes logits of at least one block per row: refuse what could never be allocated
        # rather than fail (or be killed) inside the first forward
        if rows * (input_ids.shape[1] + config.max_new_tokens) > torch.iinfo(torch.int32).max:
            raise ValueError(
                f"diffusion_generate: num_return_sequences={copies} gives {rows} rows of "
                f"{input_ids.shape[1] + config.max_new_tokens} positions, more than one batch can index "
                f"({torch.iinfo(torch.int32).max} positions); generate in smaller batches"
            )
        input_ids = input_ids.repeat_interleave(copies, dim=0)
        attention_mask = attention_mask.repeat_interleave(copies, dim=0)
        return self._diffusion_sample(input_ids, attention_mask, config, special, hooks)

    def _check_generation_inputs(self, input_ids, attention_mask, config, tokenizer, token_type_ids=None):
        """Check the prompt and the token ids of `config` against the model, before any forward pass."""
        check_prompt_ids(input_ids)
        check_token_type_ids(token_type_ids, input_ids)
        check_cfg_scale_fits("diffusion_generate", config.cfg_scale, self.dtype)
        model_config = self.config
        vocab = model_config.vocab_size
        mask_id = config.mask_token_id if config.mask_token_id is not None else model_config.mask_token_id
        check_prompt_tokens(input_ids, mask_id, vocab)
        check_suppressed_tokens(config, mask_id, vocab)
        special = special_tokens(config, model_config, mask_id, tokenizer)
        total = input_ids.shape[1] + config.max_new_tokens
        if total > model_config.max_position_embeddings:
            raise ValueError(
                f"diffusion_generate: prompt ({input_ids.shape[1]}) + max_new_tokens ({config.max_new_tokens}) = "
                f"{total} exceeds max_position_embeddings={model_config.max_position_embeddings}"
            )
        return input_ids, check_attention_mask(attention_mask, input_ids), special

    def _decoding_forward(self, config: DiffusionGenerationConfig, device: torch.device) -> tuple[Callable, bool, bool]:
        """The model call the loop runs, with whether finished rows stay in the batch (compiled: static shapes) and
        whether it replays CUDA graphs."""
        if config.compile_config is None or config.disable_compile:
            return self.__call__, False, False
        cudagraphs = config.compile_config.mode == "reduce-overhead" and device.type == "cuda"
        if cudagraphs and config.cache_mode is not None:
            raise ValueError(
                "diffusion_generate: compile_config.mode='reduce-overhead' (CUDA graphs) cannot run with "
                f"cache_implementation={config.cache_mode!r}: the block cache keeps graph outputs across "
                "replays; use mode='default' or 'max-autotune-no-cudagraphs', or no cache"
            )
        return self.get_compiled_call(config.compile_config), True, cudagraphs

    def _decoding_state(self, input_ids, attention_mask, config, special, hooks) -> DecodingState:
        """The state of one call: the canvas (the prompt, then `max_new_tokens` masks) and the strategies."""
        batch, gen_len, device = input_ids.shape[0], config.max_new_tokens, input_ids.device
        masks = torch.full((batch, gen_len), special.mask, dtype=input_ids.dtype, device=device)
        canvas = torch.cat([input_ids, masks], 1)
        full_mask = torch.cat([attention_mask, torch.ones((batch, gen_len), dtype=torch.long, device=device)], 1)
        forward, static_rows, cudagraphs = self._decoding_forward(config, device)
        return DecodingState(
            canvas=canvas,
            attention_mask=full_mask,
            prompt_index=canvas != special.mask,  # the reference masks exactly these in the unconditional CFG copy
            config=config,
            special=special,
            hooks=hooks,
            policy=unmasking_policy(config, special.mask),
            smoothing=input_smoothing(config, self.get_input_embeddings(), canvas.shape, special.mask),
            forward=forward,
            static_rows=static_rows,
            cudagraphs=cudagraphs,
            deadline=None if config.max_time is None else time.monotonic() + config.max_time,
        )

    def _diffusion_sample(
        self, input_ids, attention_mask, config, special, hooks
    ) -> torch.LongTensor | DiffusionGenerateOutput:
        """Decode the canvas block by block; rows that stop (EOS, stop strings, stopping criteria) leave."""
        state = self._decoding_state(input_ids, attention_mask, config, special, hooks)
        blocks = split_blocks(config.max_new_tokens, config.block_length)
        block_steps = split_steps(config.total_steps, blocks)
        active = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        streamer = hooks.streamer
        if streamer is not None:
            streamer.put(input_ids.cpu())
        start = state.prompt_length
        for length, steps in zip(blocks, block_steps):
            rows = active.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            columns = (start, start + length)
            if not state.out_of_time():
                self._decode_block(state, ActiveBlock.open(state, columns, steps, rows, self.config.num_hidden_layers))
            if state.out_of_time() and (state.canvas[rows, start:] == special.mask).any():
                self._finish_canvas(state, start, rows)
            for row in rows.tolist():
                stops = state.row_stops(row, columns)
                if stops is not None:
                    state.unmask_step[row, stops:] = -1
                    active[row] = False
            if streamer is not None:
                streamer.put(state.canvas[:, start : start + length].cpu())
            start += length
        if streamer is not None:
            streamer.end()
        return state.output()

    def _decode_block(self, state: DecodingState, block: ActiveBlock) -> None:
        """Denoise the block of the canvas rows `block.rows` in place."""
        mask_id, policy = state.special.mask, state.policy
        policy.start_block(block.masked(mask_id), block.steps)
        while True:
            still_masked = block.masked(mask_id).any(dim=1)
            if policy.block_done(block.step, still_masked):
                break
            if state.out_of_time():
                return  # `_finish_canvas` commits what is left
            if policy.fills_block and not still_masked.all() and not state.static_rows:
                # a row whose block is final takes part in no more forwards
                keep = still_masked.nonzero().squeeze(1)
                block.keep_rows(keep, guided=state.config.cfg_scale > 0)
                policy.keep_rows(keep)
                still_masked = still_masked[keep]
            self._denoise_step(state, block, still_masked)
        if block.masked(mask_id).any():  # cannot happen: proposals exclude the mask and quotas fill the block
            raise RuntimeError(
                f"diffusion_generate: the block [{block.start}, {block.end}) still holds mask tokens after decoding"
            )

    def _finish_canvas(self, state: DecodingState, start: int, rows: torch.Tensor) -> None:
        """`max_time` is spent: one forward over the whole canvas of `rows` (no cache) commits every masked position
        from `start` on, the current block and every later one, with that forward's proposals."""
        mask_id = state.special.mask
        block = ActiveBlock(
            start, state.canvas.shape[1], 1, rows, state.canvas[rows], state.attention_mask[rows],
            state.prompt_index[rows],
        )
        state.policy.start_block(block.masked(mask_id), 1)
        self._denoise_step(state, block, block.masked(mask_id).any(dim=1), finish=True)

    def _denoise_step(
        self, state: DecodingState, block: ActiveBlock, still_masked: torch.Tensor, finish: bool = False
    ) -> None:
        """One forward: the logits the step decodes from, a proposal and a score per position, the policy's commits
        (`finish`: every masked position of the block)."""
        logits, window = self._step_logits(state, block)
        # the step's predictions feed the next forwards' inputs; then the block's own columns only are decoded
        logits, window = state.smoothing.observe(logits, window, (block.start, block.end), block.rows, state.forwards)
        lo, hi = block.start - window[0], block.end - window[0]  # the block's columns in the step's logits
        if state.hooks.logits_processor:
            logits = process_block_logits(state.hooks.logits_processor, block.xs, logits, lo, hi)
        if state.config.remove_invalid_values:
            logits = InfNanRemoveLogitsProcessor()(None, logits)
        logits = state.policy.adjust_logits(logits, (lo, hi), block.masked(state.special.mask))
        proposal, scores, candidates = state.proposals(block, logits, window)
        # out of time: this forward commits every masked position left (`max_time`)
        commit = candidates if finish else state.policy.select(scores, candidates, block.step, state.forwards)
        state.commit(block, torch.where(commit, proposal, block.xs), commit, still_masked)
        block.step += 1
        state.forwards += 1

    def _step_logits(self, state: DecodingState, block: ActiveBlock) -> tuple[torch.Tensor, tuple[int, int]]:
        """Logits of the canvas columns [window) the step needs, with CFG and `suppress_tokens` applied.

        With a cache: a refresh runs the whole canvas and stores its keys / values; other steps run the columns the
        cache recomputes (the block, widened by `cache_vicinity`; the prefix cache: from there to the end). The
        window is the block, widened to every column the forward computes after the block start when the smoothing
        needs them."""
        config, cache, total = state.config, block.cache, block.xs.shape[1]
        wide = state.smoothing.widens_window
        if cache is None:
            window = (0, total)
            logits = self._run_model(state, block, window)
        elif state.refreshes_cache(block):
            cache.refresh()
            window = (block.start, total if wide else block.end)
            keep = torch.arange(*window, device=block.xs.device)
            logits = self._run_model(state, block, (0, total), past_key_values=cache, logits_to_keep=keep)
            left, right = config.cache_vicinity or (0, 0)
            cache.select_block(max(block.start - left, 0), min(block.end + right, total))
        else:
            lo, hi = cache.layers[0].window
            hi = total if cache.mode == "prefix" else hi
            window = (block.start, hi if wide else block.end)
            keep = torch.arange(window[0] - lo, window[1] - lo, device=block.xs.device)
            logits = self._run_model(state, block, (lo, hi), past_key_values=cache, logits_to_keep=keep)
        if config.cfg_scale > 0:
            cond, uncond = logits.chunk(2)
            logits = uncond + (config.cfg_scale + 1) * (cond - uncond)
        if config.suppress_tokens:
            logits = SuppressTokensLogitsProcessor(config.suppress_tokens, device=logits.device)(None, logits)
        return logits, window

    def _run_model(self, state: DecodingState, block: ActiveBlock, columns: tuple[int, int], **kwargs) -> torch.Tensor:
        """The model's logits on the canvas columns [columns) of the block's rows, then (CFG) of their unconditional
        copies, whose prompt is masked."""
        inputs, attention = block.xs, block.masks
        if state.config.cfg_scale > 0:
            inputs = torch.cat([block.xs, block.xs.masked_fill(block.prompts, state.special.mask)])
            attention = torch.cat([block.masks, block.masks])
        if state.cudagraphs:  # the previous replay's outputs are read already: let the next overwrite
            torch.compiler.cudagraph_mark_step_begin()
        ids = inputs[:, columns[0] : columns[1]]
        embeds = state.smoothing.inputs_embeds(ids, block.rows, columns[0])
        if embeds is None:
            logits = state.forward(ids, attention_mask=attention, **kwargs).logits
        else:
            logits = state.forward(inputs_embeds=embeds, attention_mask=attention, **kwargs).logits
        return logits.clone() if state.cudagraphs else logits

    @torch.no_grad()
    def diffusion_loglikelihood(
        self,
        prefix_ids: torch.Tensor | list[int],
        target_ids: torch.Tensor | list[int],
        mc_samples: int = 128,
        batch_size: int = 16,
        cfg_scale: float = 0.0,
        generator: torch.Generator | None = None,
        mask_token_id: int | None = None,
    ) -> torch.Tensor:
        """Monte-Carlo ELBO estimate of log p(target | prefix) (LLaDA's lm-eval estimator; a lower bound).

        `prefix_ids` / `target_ids`: one sequence each, as a list of ints or an integer tensor of shape [T] (or [1, T],
        one row); batches are not flattened into one sequence but rejected (score each pair in its own call). Ids must
        lie in the vocabulary and not be the mask token; prefix + target must fit `max_position_embeddings`.
        `mc_samples` masked copies of prefix+target, `batch_size` per forward, each with a stratified number of
        masked target tokens (never prefix tokens); returns -(mean over copies of the 1/t-weighted masked
        cross-entropy) as a 0-d float tensor. Deterministic for a given `generator`.
        """
        device = self.device
        vocab = self.config.vocab_size
        check_loglikelihood_settings(mc_samples, batch_size, cfg_scale, generator)
        check_cfg_scale_fits("diffusion_loglikelihood", cfg_scale, self.dtype)
        mask_id = mask_token_id if mask_token_id is not None else self.config.mask_token_id
        if not is_int(mask_id) or not 0 <= mask_id < vocab:
            raise ValueError(
                f"diffusion_loglikelihood: mask_token_id={mask_id!r} is not in the vocabulary [0, {vocab})"
            )
        prefix = token_id_sequence("prefix_ids", prefix_ids, vocab, mask_id).to(device)
        target = token_id_sequence("target_ids", target_ids, vocab, mask_id).to(device)
        if target.numel() == 0:
            raise ValueError("diffusion_loglikelihood: target_ids is empty")
        total_length = prefix.numel() + target.numel()
        if total_length > self.config.max_position_embeddings:
            raise ValueError(
                f"diffusion_loglikelihood: prefix ({prefix.numel()}) + target ({target.numel()}) = {total_length} "
                f"tokens exceed max_position_embeddings={self.config.max_position_embeddings}"
            )
        if mc_samples < 1 or batch_size < 1 or mc_samples % batch_size:
            raise ValueError(
                f"diffusion_loglikelihood: mc_samples={mc_samples} must be a positive multiple of "
                f"batch_size={batch_size}"
            )
        if batch_size * total_length > torch.iinfo(torch.int32).max:
            raise ValueError(
                f"diffusion_loglikelihood: batch_size={batch_size} copies of {total_length} tokens are more than one "
                f"forward can index ({torch.iinfo(torch.int32).max} positions); use a smaller batch_size"
            )
        sequence = torch.cat([prefix, target])[None].expand(batch_size, -1)
        target_mask = torch.zeros_like(sequence, dtype=torch.bool)
        target_mask[:, prefix.numel() :] = True
        lengths = torch.full((batch_size,), target.numel(), device=device)
        total = 0.0
        for _ in range(mc_samples // batch_size):
            counts = stratified_mask_counts(target.numel(), batch_size, generator, device)
            noisy, masked = mask_target_positions(sequence, target_mask, counts, mask_id, generator)
            if cfg_scale > 0:
                uncond = noisy.masked_fill(~target_mask, mask_id)
                cond_logits, uncond_logits = self(torch.cat([noisy, uncond])).logits.chunk(2)
                logits = uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)
            else:
                logits = self(noisy).logits
            batch_total = elbo_weighted_nll(logits, sequence, masked, lengths).sum().item()
            if not math.isfinite(batch_total):  # the one sync per forward there is anyway
                cause = non_finite_message("diffusion_loglikelihood", "logits", _Guidance(cfg_scale))
                raise ValueError(f"{cause}; or a target token the model gives probability 0")
            total += batch_total
        return torch.tensor(-total / mc_samples)
