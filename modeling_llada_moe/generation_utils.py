"""`diffusion_generate` for LLaDA-MoE: semi-autoregressive masked-diffusion decoding.

One sampling loop (`DiffusionGenerationMixin._decode_block`) calls small strategy functions: how many tokens a step
commits (`transfer_schedule`, `select_by_quota`, `select_by_threshold`, `select_by_factor`, `select_by_hierarchy`),
which token each masked position proposes (`propose_tokens`), how confident it is (`confidence`), and how past steps
shift a step's logits (`fuse_credit`); the cache knobs decide which steps refresh the cache and which columns a cached
step recomputes. Named presets (`DiffusionGenerationConfig.from_preset`, `decoding_preset`) bundle these settings.
In threshold / factor decoding a row whose block is final leaves the rest of that block's forwards.

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
position left (the threshold / factor ignored); NaN logits, or a position with no token left after `suppress_tokens`
and a `logits_processor`, raise a `ValueError`; a candidate with a non-finite confidence ranks last. Every argument is
checked before the first forward: `TypeError` for a wrong type, `ValueError` for a wrong value, naming it.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation.configuration_utils import CompileConfig
from transformers.generation.logits_process import SuppressTokensLogitsProcessor
from transformers.utils import GENERATION_CONFIG_NAME, ModelOutput

from .forward_process import elbo_weighted_nll, mask_target_positions, stratified_mask_counts


REMASKING_STRATEGIES = ("low_confidence", "random", "margin", "entropy")
# `factor_rule` values: "prefix" (the rule as stated) or "fast_dllm" (Fast-dLLM's code: when only the last of the
# sorted candidates fails, it commits all of them).
FACTOR_RULES = ("prefix", "fast_dllm")
# `confidence_dtype` values: None = the logits dtype (the LLaDA reference), or the dtype the softmax is computed in.
CONFIDENCE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# `cache_implementation` values: the approximate block caches of Fast-dLLM (None = no cache, exact).
CACHE_IMPLEMENTATIONS = ("prefix", "dual")

# GenerationConfig fields that only mean something for autoregressive decoding, with the values that mean "off".
AR_ONLY_FIELDS = {
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "diversity_penalty": (None, 0.0),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "length_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "bad_words_ids": (None,),
    "force_words_ids": (None,),
    "constraints": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "begin_suppress_tokens": (None,),
    "sequence_bias": (None,),
    "penalty_alpha": (None,),
    "dola_layers": (None,),
    "prompt_lookup_num_tokens": (None,),
    "assistant_early_exit": (None,),
    "guidance_scale": (None,),
    "typical_p": (None, 1.0),
    "min_p": (None,),
    "top_h": (None,),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "exponential_decay_length_penalty": (None,),
    "watermarking_config": (None,),
    "output_scores": (None, False),
    "output_logits": (None, False),
}

DIFFUSION_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 128,
    "temperature": 0.0,
    "top_k": None,
    "top_p": None,
    "num_return_sequences": 1,
    "return_dict_in_generate": False,
}


# Named decoding settings for `DiffusionGenerationConfig.from_preset`: only the decoding-strategy fields, every one
# written out so that a preset also switches off what another one turned on.
DECODING_PRESETS: dict[str, dict[str, Any]] = {
    # LLaDA `generate.py`: greedy, one token per step, low-confidence remasking, no cache (token-exact).
    "llada": dict(
        temperature=0.0, remasking="low_confidence", threshold=None, factor=None, cache_implementation=None,
        use_cache=None,
    ),
    # Fast-dLLM (`llada/generate.py`): confidence threshold 0.9 with the dual cache, refreshed at every block start.
    # Softmax in float64, as its code computes it.
    "fast_dllm": dict(
        temperature=0.0, remasking="low_confidence", threshold=0.9, factor=None, cache_implementation="dual",
        use_cache=True, confidence_dtype="float64",
    ),
    # dInfer's LLaDA-MoE evaluation (`evaluations/eval_llada_moe.sh`): threshold 0.76 with the hierarchical low
    # threshold 0.62, the dual cache with vicinity refresh 16 / 16 and 4 warm-up forwards.
    "dinfer": dict(
        temperature=0.0, remasking="low_confidence", threshold=0.76, low_threshold=0.62, factor=None,
        cache_implementation="dual", use_cache=True, cache_vicinity=(16, 16), cache_warmup_steps=4,
    ),
    # The same with the script's iteration smoothing (`cont_weight` 0.3: in dInfer it selects the smoothing
    # iteration, which also decays the threshold from 1.0 by 0.02 per forward of the generation).
    "dinfer_smooth": dict(
        temperature=0.0, remasking="low_confidence", threshold=0.76, low_threshold=0.62, factor=None,
        cache_implementation="dual", use_cache=True, cache_vicinity=(16, 16), cache_warmup_steps=4,
        cont_weight=0.3, cont_weight_init=0.15, cont_weight_growth=0.02, threshold_decay=0.02,
    ),
}
# Every strategy field a preset may set, with its "off" value: a preset switches off what it does not name.
PRESET_FIELDS_OFF = dict(
    threshold=None, factor=None, factor_rule="prefix", confidence_dtype=None, low_threshold=None, credit_alpha=None,
    cache_implementation=None, use_cache=None, cache_refresh_interval=None, cache_vicinity=None, cache_warmup_steps=0,
    cont_weight=None, cont_weight_init=0.15, cont_weight_growth=0.02, threshold_decay=None,
)


def decoding_preset(name: str) -> dict[str, Any]:
    """The `DiffusionGenerationConfig` fields of a named preset, every strategy field written out (those the preset
    does not use at their "off" value), to apply over any config: e.g. `model.generate(ids, **decoding_preset(
    "fast_dllm"))` keeps the model's token ids and lengths. An unknown name raises a `ValueError` naming the accepted
    ones."""
    if not isinstance(name, str) or name not in DECODING_PRESETS:
        raise ValueError(
            f"DiffusionGenerationConfig.from_preset: unknown preset {name!r}; expected one of {tuple(DECODING_PRESETS)}"
        )
    return {**PRESET_FIELDS_OFF, **DECODING_PRESETS[name]}


def is_int(value) -> bool:
    """An integer that is not a bool (True / False are not token ids or counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float that is not a bool (finiteness is checked separately)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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


class DiffusionGenerationConfig(GenerationConfig):
    r"""
    Settings of `diffusion_generate` / `generate`. Keyword arguments of those calls override them per call.

    Args:
        max_new_tokens (`int`, defaults to 128): generated canvas length (LLaDA's `gen_length`).
        max_length (`int`, *optional*): transformers' total length, prompt + canvas: when set (in the call, or in a
            config whose call sets no `max_new_tokens`) the canvas is `max_length` minus the prompt length. A call
            giving both `max_length` and `max_new_tokens` must make them agree.
        steps (`int`, *optional*): total denoising steps; `None` = `max_new_tokens` (one token per step). They are
            split over the blocks in proportion to the block lengths (at least one step per block), so with equal
            blocks and a multiple of their number each block gets `steps / num_blocks`, as in LLaDA. At most
            `max_new_tokens`: every step commits at least one token.
        block_length (`int`, defaults to 32): semi-autoregressive block size. A canvas that is not a whole number of
            blocks ends with a shorter block (e.g. `max_new_tokens=40`: blocks of 32 and 8).
        temperature (`float`, defaults to 0.0): 0 is greedy; > 0 samples with float64 Gumbel-max.
        do_sample (`bool`): transformers' switch, kept in step with `temperature`: unset, it follows it
            (`temperature > 0`); `do_sample=False` alone means greedy; `do_sample=True` needs `temperature > 0`.
        top_k (`int`, *optional*), top_p (`float`, *optional*): sampling filters, only with `temperature > 0`.
        cfg_scale (`float`, defaults to 0.0): classifier-free guidance, `u + (cfg_scale + 1) * (c - u)` with the
            prompt masked in the unconditional copy.
        remasking (`str`, defaults to `"low_confidence"`): how to rank masked positions: `"low_confidence"`
            (probability of the proposed token), `"random"`, `"margin"` (top-1 minus top-2 probability) or
            `"entropy"` (negative entropy).
        threshold (`float`, *optional*): Fast-dLLM parallel decoding: each step commits the most confident masked
            position of the block plus every other one with confidence >= threshold; a block then runs until it is
            filled, whatever `steps` says (at most its length + 2 forwards: the last one commits every position left).
        factor (`float`, *optional*): Fast-dLLM factor rule: commit the longest confidence-sorted prefix with
            c_i >= 1 - factor / (i + 1) (the first always). Exclusive with `threshold`.
        factor_rule (`str`, defaults to `"prefix"`): `"prefix"` is the factor rule as stated above; `"fast_dllm"`
            reproduces Fast-dLLM's code, which also commits every candidate when only the last one of the sorted
            candidates fails. With `confidence_dtype="float64"` the factor and threshold decisions are then exactly
            those of Fast-dLLM's `llada/generate.py` (ties aside).
        confidence_dtype (`str`, *optional*): the dtype confidences are computed in: `None` = the logits dtype (the
            LLaDA reference, token-exact), `"float32"` or `"float64"` (Fast-dLLM computes its softmax in float64).
        low_threshold (`float`, *optional*): dInfer's hierarchical decoding, with `threshold` as the high threshold:
            each step commits the most confident masked position of the block, every one with confidence >=
            `threshold`, and in each run of adjacent masked positions its most confident one (all of them on a tie)
            when its confidence is >= `low_threshold`. Adjacent masked tokens depend on each other most, so a
            mid-confidence token is committed only where no neighbour is committed with it. In (0, threshold].
        credit_alpha (`float`, *optional*): credit decoding (CreditDecoding, arXiv 2510.06133, as dInfer runs it):
            every step, each masked position of the block adds `p_top1 ** credit_boost` to the credit of its top-1
            token after the old credits decay by `credit_decay`; the step's logits become
            `logits + credit_alpha * log(1 + credit)`, so a prediction that stays the same over steps gains
            confidence and is committed earlier. Credits start at zero in every block. `None` = off (dInfer: 0.7).
            Memory: one float32 [rows, block_length, vocab] tensor.
        credit_decay (`float`, defaults to 0.8), credit_boost (`float`, defaults to 0.2): the credit's decay per step
            and the exponent applied to the top-1 probability, both in (0, 1].
        cont_weight (`float`, *optional*): dInfer's iteration smoothing: the model's input at a still-masked position
            is the mask token's embedding plus `w * (softmax(logits) @ embedding matrix)`, the expected embedding
            under the last prediction made for that position, so later forwards see what earlier ones predicted.
            `w` grows with the forwards `n` run so far in the generation, `w = min(cont_weight_init +
            cont_weight_growth * n, cont_weight)`. The predictions are those of the last forward that computed the
            position: with a cache, a refresh computes the rest of the canvas, a cached step its window (the block
            and its vicinity; prefix cache: the block and the suffix). `None` = off (dInfer: 0.3). Memory: one
            [rows, canvas, hidden] tensor, and the forward's logits over that window rather than the block (a
            refresh: [rows, rest of the canvas, vocab]); cost: a [window, vocab] x [vocab, hidden] product per
            forward.
        cont_weight_init (`float`, defaults to 0.15), cont_weight_growth (`float`, defaults to 0.02): the smoothing
            weight's start and growth per forward, both >= 0 (dInfer's defaults).
        threshold_decay (`float`, *optional*): with `threshold`, the threshold of the `n`-th forward of the
            generation (from 0) is `max(1 - threshold_decay * n, threshold)`: the first forwards, whose predictions
            are the least informed, commit only their most confident positions (dInfer runs 0.02 with iteration
            smoothing). Hierarchical decoding lowers its high threshold this way; the low one stays. `None` = off.
        cache_implementation (`str`, *optional*): the approximate KV cache: `"prefix"` (cache K/V before the block)
            or `"dual"` (cache prefix and suffix, recompute only the block), refreshed by a full forward at every
            block start. `None` = no cache (exact).
        cache_refresh_interval (`int`, *optional*): with a cache, also refresh it (a full forward, which decodes
            too) every this many steps of a block; `None` = only at the block start (dInfer's `cache_update_freq`).
        cache_vicinity (`tuple[int, int]`, *optional*): with a cache, every cached step also recomputes the keys /
            values of `left` positions before the block and (dual cache) `right` positions after it, the cache's
            stalest entries next to the block (dInfer's vicinity refresh, `prefix_look` / `after_look`; 16 / 16 in
            its LLaDA-MoE evaluation). `None` = (0, 0): recompute the block only (prefix cache: the block and the
            suffix).
        cache_warmup_steps (`int`, defaults to 0): with a cache, the first this many forwards of a generation are
            full forwards that refresh the cache (dInfer's `warmup_times`, 4 in its LLaDA-MoE evaluation), so the
            first block's early steps, when the canvas is all masks and cached values go stale fastest, are exact.
        use_cache (`bool`, *optional*): transformers' switch: `False` turns the cache off whatever
            `cache_implementation` says; `True` with no `cache_implementation` means `"prefix"`; unset follows
            `cache_implementation`. The old `use_cache="prefix" | "dual"` still loads, as `cache_implementation`
            with a `FutureWarning`.
        compile_config (`transformers.CompileConfig`, *optional*): run every forward of the sampling loop through
            `torch.compile` (transformers' `model.get_compiled_call(compile_config)`, compiled once per model and
            config); `None` (the default) or `disable_compile=True` = eager. While compiling, rows whose block is
            final stay in the batch (committing nothing, counted in no NFE), so a block's steps have one static
            shape: a generation compiles a bounded number of graphs, however many blocks it has (dual cache: the
            refresh, the first block's step and the step of any later block, with `dynamic=None`). CPU:
            `CompileConfig(mode="default", dynamic=None)`. CUDA graphs (`mode="reduce-overhead"`, CompileConfig's
            default) need the uncached loop: the block cache keeps graph outputs across replays, so with a cache
            on CUDA that mode is refused (use `mode="default"` or `"max-autotune-no-cudagraphs"`).
        mask_token_id (`int`, *optional*): defaults to the model config's `mask_token_id`. It is never proposed, and
            a prompt holding it (padding included) is rejected.
        suppress_tokens (`list[int]`, *optional*): token ids whose logits are set to -inf before sampling; with the
            mask token they must leave at least one token of the vocabulary.
        confidence_suppress_tokens (`list[int]`, *optional*): token ids (e.g. EOS/EOT) whose probability is removed
            from the confidence softmax, so positions proposing them rank last.
        stop_at_eos (`bool`, defaults to `False`): stop a row once a finished block holds an EOS; the output up to the
            first EOS is unchanged and the rest is `pad_token_id`.
        stop_strings (`str` or `list[str]`, *optional*): stop a row once its finished text contains one of these
            (pass `tokenizer=`); tokens after the completing one become `pad_token_id`.
        num_return_sequences (`int`, defaults to 1), output_history (`bool`, defaults to `False`),
        return_dict_in_generate (`bool`, defaults to `False`): return a `DiffusionGenerateOutput`.
    """

    def __init__(self, **kwargs):
        self.steps = kwargs.pop("steps", None)
        self.block_length = kwargs.pop("block_length", 32)
        self.cfg_scale = kwargs.pop("cfg_scale", 0.0)
        self.remasking = kwargs.pop("remasking", "low_confidence")
        self.threshold = kwargs.pop("threshold", None)
        self.factor = kwargs.pop("factor", None)
        self.factor_rule = kwargs.pop("factor_rule", "prefix")
        self.confidence_dtype = kwargs.pop("confidence_dtype", None)
        self.low_threshold = kwargs.pop("low_threshold", None)
        self.credit_alpha = kwargs.pop("credit_alpha", None)
        self.credit_decay = kwargs.pop("credit_decay", 0.8)
        self.credit_boost = kwargs.pop("credit_boost", 0.2)
        self.cont_weight = kwargs.pop("cont_weight", None)
        self.cont_weight_init = kwargs.pop("cont_weight_init", 0.15)
        self.cont_weight_growth = kwargs.pop("cont_weight_growth", 0.02)
        self.threshold_decay = kwargs.pop("threshold_decay", None)
        self.cache_refresh_interval = kwargs.pop("cache_refresh_interval", None)
        self.cache_vicinity = kwargs.pop("cache_vicinity", None)
        self.cache_warmup_steps = kwargs.pop("cache_warmup_steps", 0)
        self.mask_token_id = kwargs.pop("mask_token_id", None)
        self.confidence_suppress_tokens = kwargs.pop("confidence_suppress_tokens", None)
        self.stop_at_eos = kwargs.pop("stop_at_eos", False)
        self.output_history = kwargs.pop("output_history", False)
        for key, value in DIFFUSION_DEFAULTS.items():
            kwargs.setdefault(key, value)
        if kwargs.get("do_sample") is None and isinstance(kwargs["temperature"], (int, float)):
            # Written out, so that pipelines see greedy decoding as set and add no sampling defaults of their own.
            kwargs["do_sample"] = kwargs["temperature"] > 0
        super().__init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DiffusionGenerationConfig:
        """A config holding the decoding settings of a named sampler (`DECODING_PRESETS`), then `overrides`.

        `"llada"`: the LLaDA reference sampler (greedy, low-confidence remasking, no cache, token-exact);
        `"fast_dllm"`: Fast-dLLM's threshold 0.9 with a dual cache; `"dinfer"`: dInfer's LLaDA-MoE evaluation
        settings; `"dinfer_smooth"`: the same with the iteration smoothing and threshold decay its script also
        turns on (`cont_weight=0.3`, `threshold_decay=0.02`). Lengths (`max_new_tokens`, `block_length`, `steps`)
        and token ids stay at their defaults unless overridden, e.g. `from_preset("fast_dllm", max_new_tokens=256,
        threshold=0.8)`. An unknown name raises a `ValueError` listing the accepted ones; the result is validated.
        """
        config = cls(**{**decoding_preset(name), **overrides})
        config.validate()
        return config

    @staticmethod
    def _get_default_generation_params() -> dict[str, Any]:
        # transformers fills unset fields from these; its own (temperature 1.0, top_k 50) must never apply here.
        return dict(DIFFUSION_DEFAULTS)

    @classmethod
    def from_model_config(cls, model_config) -> DiffusionGenerationConfig:
        return cls(
            eos_token_id=getattr(model_config, "eos_token_id", None),
            pad_token_id=getattr(model_config, "pad_token_id", None),
            bos_token_id=getattr(model_config, "bos_token_id", None),
            mask_token_id=getattr(model_config, "mask_token_id", None),
        )

    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None) -> None:
        """Raise `ValueError` naming the field for any setting `diffusion_generate` cannot honour."""

        def fail(field: str, accepted: str, error: type[Exception] = ValueError) -> None:
            raise error(f"DiffusionGenerationConfig: `{field}`={getattr(self, field)!r} is invalid; {accepted}.")

        def positive_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value > 0

        if isinstance(self.use_cache, str) and self.use_cache in CACHE_IMPLEMENTATIONS:
            warnings.warn(
                f"use_cache={self.use_cache!r} is deprecated: use cache_implementation={self.use_cache!r} (use_cache "
                "is transformers' bool: True = a cache, 'prefix' unless cache_implementation says otherwise)",
                FutureWarning,
                stacklevel=3,
            )
            self.cache_implementation, self.use_cache = self.use_cache, True
        for field in (
            "max_new_tokens", "block_length", "num_return_sequences", "max_length", "steps", "top_k",
            "cache_refresh_interval", "cache_warmup_steps",
        ):
            value = getattr(self, field, None)
            if value is not None and not is_int(value):
                fail(field, "expected a positive integer", TypeError)
        for field in (
            "temperature", "top_p", "cfg_scale", "threshold", "factor", "low_threshold", "credit_alpha",
            "credit_decay", "credit_boost", "cont_weight", "cont_weight_init", "cont_weight_growth", "threshold_decay",
        ):
            value = getattr(self, field, None)
            if value is not None and not is_number(value):
                fail(field, "expected a finite number", TypeError)
            if value is not None and not math.isfinite(value):
                fail(field, "expected a finite number")
        for field in ("stop_at_eos", "output_history", "return_dict_in_generate"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "expected True or False", TypeError)
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            fail("do_sample", "expected True, False or None", TypeError)
        if self.mask_token_id is not None and not is_int(self.mask_token_id):
            fail("mask_token_id", "expected an integer token id", TypeError)
        for field in ("pad_token_id", "bos_token_id"):
            if getattr(self, field, None) is not None and not is_int(getattr(self, field)):
                fail(field, "expected an integer token id or None", TypeError)
        eos = self.eos_token_id
        if eos is not None and not is_int(eos) and not (
            isinstance(eos, (list, tuple)) and all(is_int(item) for item in eos)
        ):
            fail("eos_token_id", "expected an integer token id, a list of them, or None", TypeError)
        for field in ("suppress_tokens", "confidence_suppress_tokens"):
            value = getattr(self, field, None)
            if value is not None and not (
                isinstance(value, (list, tuple)) and all(is_int(item) for item in value)
            ):
                fail(field, "expected a list of integer token ids or None", TypeError)
        if self.stop_strings is not None:
            if isinstance(self.stop_strings, str):
                self.stop_strings = [self.stop_strings]
            if not isinstance(self.stop_strings, (list, tuple)) or not all(
                isinstance(item, str) and item for item in self.stop_strings
            ):
                fail("stop_strings", "expected a non-empty string or a list of non-empty strings")
        if not positive_int(self.max_new_tokens):
            fail("max_new_tokens", "expected a positive integer")
        if self.max_length is not None and not positive_int(self.max_length):
            fail("max_length", "expected a positive integer (prompt + generated tokens) or None")
        if not positive_int(self.block_length):
            fail("block_length", "expected a positive integer")
        if self.steps is not None and (not positive_int(self.steps) or self.steps < self.num_blocks):
            fail("steps", f"expected a positive integer, at least the number of blocks ({self.num_blocks})")
        if self.steps is not None and self.steps > self.max_new_tokens:
            # More steps than tokens would run forwards that commit nothing: every step commits at least one.
            fail("steps", f"expected at most max_new_tokens={self.max_new_tokens} (one token per step)")
        if self.temperature is None or self.temperature < 0:
            fail("temperature", "expected a finite float >= 0 (0 = greedy)")
        if self.do_sample is False and self.temperature > 0:
            fail("do_sample", f"do_sample=False means greedy, but temperature={self.temperature}")
        if self.do_sample is True and self.temperature == 0:
            fail("do_sample", "do_sample=True needs temperature > 0")
        if self.top_k is not None and (not positive_int(self.top_k) or self.temperature == 0):
            fail("top_k", "expected a positive integer, used only when sampling (temperature > 0)")
        if self.top_p is not None and (not 0 < self.top_p <= 1 or self.temperature == 0):
            fail("top_p", "expected a float in (0, 1], used only when sampling (temperature > 0)")
        if self.cfg_scale is None or self.cfg_scale < 0:
            fail("cfg_scale", "expected a finite float >= 0")
        if self.remasking not in REMASKING_STRATEGIES:
            fail("remasking", f"expected one of {REMASKING_STRATEGIES}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            fail("threshold", "expected a float in (0, 1]")
        if self.factor is not None and not self.factor > 0:
            fail("factor", "expected a finite positive float")
        if self.threshold is not None and self.factor is not None:
            fail("factor", "threshold and factor are exclusive parallel-decoding rules")
        if self.factor_rule not in FACTOR_RULES:
            fail("factor_rule", f"expected one of {FACTOR_RULES}")
        if self.confidence_dtype is not None and self.confidence_dtype not in CONFIDENCE_DTYPES:
            fail("confidence_dtype", f"expected None (the logits dtype) or one of {tuple(CONFIDENCE_DTYPES)}")
        if self.low_threshold is not None and self.threshold is None:
            fail("low_threshold", "hierarchical decoding needs `threshold` (the high threshold) too")
        if self.low_threshold is not None and not 0 < self.low_threshold <= self.threshold:
            fail("low_threshold", f"expected a float in (0, threshold={self.threshold}]")
        if self.credit_alpha is not None and not self.credit_alpha > 0:
            fail("credit_alpha", "expected a finite positive float (None = no credit decoding)")
        for field in ("credit_decay", "credit_boost"):
            if getattr(self, field) is None or not 0 < getattr(self, field) <= 1:
                fail(field, "expected a float in (0, 1]")
        if self.cont_weight is not None and not self.cont_weight > 0:
            fail("cont_weight", "expected a finite positive float (None = no iteration smoothing)")
        for field in ("cont_weight_init", "cont_weight_growth"):
            if getattr(self, field) is None or getattr(self, field) < 0:
                fail(field, "expected a finite float >= 0")
        if self.threshold_decay is not None and self.threshold is None:
            fail("threshold_decay", "it decays `threshold`: set threshold too")
        if self.threshold_decay is not None and not self.threshold_decay > 0:
            fail("threshold_decay", "expected a finite positive float (None = no decay)")
        if self.cache_refresh_interval is not None and not positive_int(self.cache_refresh_interval):
            fail("cache_refresh_interval", "expected a positive integer (steps between refreshes) or None")
        if self.cache_warmup_steps is None or self.cache_warmup_steps < 0:
            fail("cache_warmup_steps", "expected an integer >= 0")
        if self.cache_vicinity is not None:
            if not isinstance(self.cache_vicinity, (list, tuple)) or len(self.cache_vicinity) != 2 or not all(
                is_int(item) for item in self.cache_vicinity
            ):
                fail("cache_vicinity", "expected None or a pair of integers (left, right)", TypeError)
            if min(self.cache_vicinity) < 0:
                fail("cache_vicinity", "expected a pair of integers >= 0 (left, right)")
            self.cache_vicinity = tuple(self.cache_vicinity)
        if self.use_cache is not None and not isinstance(self.use_cache, bool):
            fail("use_cache", f"expected True, False or None (the cache kind is cache_implementation, one of "
                 f"{CACHE_IMPLEMENTATIONS})")
        if self.cache_implementation is not None and self.cache_implementation not in CACHE_IMPLEMENTATIONS:
            fail("cache_implementation", f"expected None (no cache) or one of {CACHE_IMPLEMENTATIONS}")
        if self.cache_mode is None:
            for field, off in (("cache_refresh_interval", None), ("cache_vicinity", None), ("cache_warmup_steps", 0)):
                if getattr(self, field) != off:
                    fail(field, "it applies to a cache only: set cache_implementation ('prefix' or 'dual')")
        if not positive_int(self.num_return_sequences):
            fail("num_return_sequences", "expected a positive integer")
        if self.compile_config is not None and not isinstance(self.compile_config, CompileConfig):
            fail("compile_config", "expected a transformers.CompileConfig or None", TypeError)
        if self.disable_compile is not None and not isinstance(self.disable_compile, bool):
            fail("disable_compile", "expected True, False or None", TypeError)
        for field, neutral in AR_ONLY_FIELDS.items():
            if getattr(self, field, None) not in neutral:
                fail(field, "it applies to autoregressive decoding only (use cfg_scale for guidance)")

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else self.max_new_tokens

    @property
    def num_blocks(self) -> int:
        return -(-self.max_new_tokens // self.block_length)

    @property
    def cache_mode(self) -> str | None:
        """The cache `diffusion_generate` uses: None, "prefix" or "dual" (from use_cache and cache_implementation)."""
        if self.use_cache is False:
            return None
        if self.cache_implementation is not None:
            return self.cache_implementation
        return "prefix" if self.use_cache else None


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


class DiffusionCacheLayer(CacheLayerMixin):
    """One layer's keys/values (after RoPE) of the whole canvas, from the block-start forward."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.window: tuple[int, int] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.window is None:  # block-start forward over the whole canvas: remember it
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        start, end = self.window
        if self.mode == "prefix":  # the new tokens are [start, L): attend to the frozen prefix and to each other
            return (
                torch.cat([self.keys[:, :, :start], key_states], dim=-2),
                torch.cat([self.values[:, :, :start], value_states], dim=-2),
            )
        if key_states.shape[-2] != end - start:
            raise ValueError(f"dual cache: got {key_states.shape[-2]} new tokens for the block [{start}, {end})")
        self.keys[:, :, start:end] = key_states  # replace the block, keep the frozen prefix and suffix
        self.values[:, :, start:end] = value_states
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if self.window is None else self.window[0]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.window is None:
            return query_length, 0
        if self.mode == "prefix":
            return self.window[0] + query_length, 0
        return self.keys.shape[-2], 0

    def get_max_length(self) -> int:
        return -1


class DiffusionBlockCache(Cache):
    """Approximate KV cache for a bidirectional model decoding one block at a time (Fast-dLLM semantics).

    `refresh()` before a forward over the whole canvas stores every layer's keys/values. `select_block(start, end)`
    then makes later forwards see the cache as "everything except the new tokens": in `"prefix"` mode the inputs are
    the canvas from `start` on and attend to the frozen prefix; in `"dual"` mode the inputs are the block
    [start, end), whose keys/values replace the cached ones, and attend to the frozen prefix and suffix.
    `get_seq_length()` is the first new position, so the model numbers the new tokens' positions from there.
    """

    def __init__(self, mode: str, num_layers: int):
        if mode not in ("prefix", "dual"):
            raise ValueError(f"DiffusionBlockCache: mode={mode!r}; expected 'prefix' or 'dual'")
        super().__init__(layers=[DiffusionCacheLayer(mode) for _ in range(num_layers)])
        self.mode = mode

    def refresh(self) -> None:
        for layer in self.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False
            layer.window = None

    def select_block(self, start: int, end: int) -> None:
        for layer in self.layers:
            layer.window = (start, end)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows `index` (rows that finished their block leave the forwards)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[index], layer.values[index]


# Forwards per block in threshold / factor decoding: the block length (one commit per forward at least) plus this.
FORWARD_CAP_MARGIN = 2


def smooth_predictions(state: dict, rows: torch.Tensor, logits: torch.Tensor, window: tuple[int, int],
                       embedding: torch.Tensor, config) -> None:
    """Iteration smoothing (dInfer's `cont_weight`): store `w * softmax(logits) @ embedding` for the canvas columns
    [window) of `rows`, `w = min(cont_weight_init + cont_weight_growth * n, cont_weight)` at the generation's
    `n`-th forward; the next forwards add it to the mask embedding wherever the position is still masked."""
    weight = min(config.cont_weight_init + config.cont_weight_growth * state["forwards"], config.cont_weight)
    probabilities = torch.softmax(logits.float(), dim=-1).to(embedding.dtype)
    state["smooth"][rows, window[0] : window[1]] = weight * (probabilities @ embedding)


def exclude_mask_token(logits: torch.Tensor, mask_id: int, lo: int, hi: int, config) -> torch.Tensor:
    """`logits` [B, W, V] with the mask token's logit at -inf, so it is never proposed. (Confidences still come from
    the model's whole distribution, mask token included, as in the LLaDA reference: its rankings stay token-exact.)

    Checks the columns [lo, hi) (the current block): NaN logits or a position where no token is left (every logit
    -inf, e.g. from a `logits_processor`) raise a `ValueError` instead of decoding garbage or looping."""
    logits = logits.clone()
    logits[..., mask_id] = float("-inf")
    block = logits[:, lo:hi]
    if torch.isnan(block).any():
        raise ValueError(
            f"diffusion_generate: the model's logits hold NaN (cfg_scale={config.cfg_scale}; check a "
            "logits_processor, the weights and the dtype)"
        )
    if torch.isneginf(block.amax(dim=-1)).any():
        raise ValueError(
            "diffusion_generate: a position has no token left to propose (every logit is -inf after the mask "
            "token, suppress_tokens and the logits_processor are applied)"
        )
    return logits


def transfer_schedule(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit at each of `steps` steps for each row: an even split, remainder on the first steps."""
    base = masked_count[:, None] // steps
    remainder = masked_count[:, None] % steps
    return base + (torch.arange(steps, device=masked_count.device)[None] < remainder).long()


def propose_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Greedy argmax, or a float64 Gumbel-max sample exp(l) / (-log u)^T (LLaDA's exact categorical sampler)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.double()
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    device = generator.device if generator is not None else logits.device
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=device).to(logits.device)
    gumbel = -torch.log(noise)
    proposal = (logits.exp() / gumbel**temperature).argmax(dim=-1)
    chosen = logits.gather(-1, proposal[..., None]).squeeze(-1)
    stray = torch.isneginf(chosen)  # exp under/overflow (extreme logits or temperature) picked an excluded token
    if stray.any():  # the same draw in log space: log(exp(l) / g^T) = l - T log g, excluded tokens kept at -inf
        keys = (logits - temperature * gumbel.log()).masked_fill(torch.isneginf(logits), float("-inf"))
        proposal = torch.where(stray, keys.nan_to_num(nan=float("-inf")).argmax(dim=-1), proposal)
    return proposal


def confidence(
    logits: torch.Tensor,
    proposal: torch.Tensor,
    remasking: str,
    suppressed: list[int] | None,
    generator: torch.Generator | None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Score of each position's proposal, from the softmax of the raw logits in the logits dtype (or `dtype`)."""
    if remasking == "random":
        device = generator.device if generator is not None else logits.device
        return torch.rand(proposal.shape, generator=generator, device=device).to(logits.device)
    if dtype is not None:
        logits = logits.to(dtype)
    if suppressed:
        logits = logits.clone()
        logits[..., suppressed] = float("-inf")
    probs = logits.softmax(dim=-1)
    if remasking == "low_confidence":
        return probs.gather(-1, proposal[..., None]).squeeze(-1)
    if remasking == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return (probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(dim=-1)  # entropy: -H, higher = surer


def select_by_quota(scores: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Per row, the `quota[j]` best positions of the whole row (the reference's per-row `topk`)."""
    selected = torch.zeros_like(scores, dtype=torch.bool)
    for row in range(scores.shape[0]):
        if quota[row] > 0:
            selected[row, scores[row].topk(int(quota[row])).indices] = True
    return selected


def select_by_threshold(scores: torch.Tensor, candidates: torch.Tensor, threshold: float) -> torch.Tensor:
    """The best candidate of each row, plus every candidate with score >= threshold."""
    scores = scores.masked_fill(~candidates, float("-inf"))
    selected = candidates & (scores >= threshold)
    best = scores.argmax(dim=-1)
    has_candidate = candidates.any(dim=-1)
    selected[has_candidate, best[has_candidate]] = True
    return selected


def select_by_factor(
    scores: torch.Tensor, candidates: torch.Tensor, factor: float, rule: str = "prefix"
) -> torch.Tensor:
    """The longest prefix of candidates sorted by score with c_i >= 1 - factor / (i + 1) (1-based i; c_1 always).

    `rule="fast_dllm"`: as Fast-dLLM's code, which commits all n candidates when the first failure is the n-th."""
    scores = scores.masked_fill(~candidates, float("-inf"))
    sorted_scores, order = scores.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(1, scores.shape[-1] + 1, device=scores.device, dtype=torch.float64)
    passes = sorted_scores.double() >= 1 - factor / (rank + 1)
    passes[:, 0] = True
    count = passes.long().cumprod(dim=-1).sum(dim=-1, keepdim=True).clamp(max=candidates.sum(dim=-1, keepdim=True))
    if rule == "fast_dllm":
        total = candidates.sum(dim=-1, keepdim=True)
        count = torch.where(count == total - 1, total, count)
    keep = rank[None] <= count
    return torch.zeros_like(candidates).scatter(-1, order, keep) & candidates


def select_by_hierarchy(
    scores: torch.Tensor, candidates: torch.Tensor, threshold: float, low_threshold: float
) -> torch.Tensor:
    """dInfer's hierarchical rule: `select_by_threshold` plus, in every run of adjacent candidates, its best one (all
    of them on a tie) when its score is >= `low_threshold`."""
    scores = scores.masked_fill(~candidates, float("-inf"))
    selected = select_by_threshold(scores, candidates, threshold)
    previous = torch.cat([torch.zeros_like(candidates[:, :1]), candidates[:, :-1]], dim=1)
    run = (candidates & ~previous).long().cumsum(dim=-1)  # 1, 2, ... on each run of candidates, 0 before the first
    run = run.masked_fill(~candidates, 0)
    run_best = torch.full_like(scores, float("-inf")).scatter_reduce(-1, run, scores, "amax")
    best_of_run = candidates & (scores == run_best.gather(-1, run)) & (scores >= low_threshold)
    return selected | best_of_run


def fuse_credit(
    logits: torch.Tensor,
    credit: torch.Tensor | None,
    masked: torch.Tensor,
    mask_id: int,
    alpha: float,
    decay: float,
    boost: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Credit decoding for one step: `logits` [B, W, V] of the block, `credit` [B, W, V] float32 (None on the block's
    first step), `masked` [B, W] its still-masked positions. Decays the credit, adds p_top1 ** boost at each masked
    position's top-1 token (the mask token never counts) and returns (logits + alpha * log(1 + credit), credit)."""
    credit = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device) if credit is None else credit * decay
    probs = logits.float().softmax(dim=-1)
    top1 = probs.index_fill(-1, torch.tensor([mask_id], device=logits.device), -1.0).argmax(dim=-1, keepdim=True)
    gain = probs.gather(-1, top1).nan_to_num(nan=0.0).pow(boost) * masked[..., None]
    credit = credit.scatter_add(-1, top1, gain)
    return logits + (alpha * credit.log1p()).to(logits.dtype), credit


def process_block_logits(
    processors: LogitsProcessorList, canvas: torch.Tensor, logits: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """`logits` [B, W, V] with the columns [lo, hi) (the current block) passed through `processors`, one row per
    position: `scores` [B * (hi - lo), V], `input_ids` the canvas row of each position [B * (hi - lo), L]."""
    batch, _, vocab = logits.shape
    block = logits[:, lo:hi].reshape(-1, vocab)
    processed = processors(canvas.repeat_interleave(hi - lo, dim=0), block).reshape(batch, hi - lo, vocab)
    return torch.cat([logits[:, :lo], processed.to(logits.dtype), logits[:, hi:]], dim=1)


def as_list_of(value, kind: type, name: str):
    """`value` (None, or a list of callables) as a transformers `LogitsProcessorList` / `StoppingCriteriaList`."""
    if value is None:
        return kind()
    if not isinstance(value, (list, tuple)) or not all(callable(item) for item in value):
        raise TypeError(f"diffusion_generate: {name}={value!r}; expected a {kind.__name__} (a list of callables)")
    return value if isinstance(value, kind) else kind(value)


def token_id_sequence(name: str, ids, vocab_size: int, mask_id: int) -> torch.Tensor:
    """`ids` (a list of ints, or an integer tensor [T] or [1, T]) as a CPU LongTensor [T], checked against the
    vocabulary: `TypeError` for floats / bools / other types, `ValueError` for other shapes, ids outside [0,
    vocab_size) and the mask token."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise TypeError(f"diffusion_loglikelihood: {name} has dtype {ids.dtype}; expected integer token ids")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(
                f"diffusion_loglikelihood: {name} has shape {tuple(ids.shape)}; expected one sequence, [T] or [1, T] "
                "(score each row in its own call)"
            )
        ids = ids.detach().to("cpu", torch.long)
    elif isinstance(ids, (list, tuple)):
        if not all(is_int(item) for item in ids):
            bad = next(item for item in ids if not is_int(item))
            raise TypeError(f"diffusion_loglikelihood: {name} holds {bad!r}; expected a list of integer token ids")
        ids = torch.tensor(list(ids), dtype=torch.long)
    else:
        raise TypeError(
            f"diffusion_loglikelihood: {name} is a {type(ids).__name__}; expected a list of ints or a LongTensor"
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        outside = ids[(ids < 0) | (ids >= vocab_size)][0].item()
        raise ValueError(
            f"diffusion_loglikelihood: {name} holds token id {outside}, outside the vocabulary [0, {vocab_size})"
        )
    if (ids == mask_id).any():
        raise ValueError(f"diffusion_loglikelihood: {name} holds the mask token ({mask_id}); give unmasked text")
    return ids


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
        base = generation_config if generation_config is not None else self.generation_config
        if not isinstance(base, DiffusionGenerationConfig):
            base = DiffusionGenerationConfig.from_dict(base.to_dict())
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
        if token_type_ids is not None and torch.as_tensor(token_type_ids).any():
            raise ValueError(
                "diffusion_generate: token_type_ids has non-zero entries; LLaDA-MoE has no token types (pass "
                "input_ids and attention_mask only)"
            )
        logits_processor = as_list_of(logits_processor, LogitsProcessorList, "logits_processor")
        stopping_criteria = as_list_of(stopping_criteria, StoppingCriteriaList, "stopping_criteria")
        prompt_length = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) else None
        config = self._resolve_generation_config(generation_config, kwargs, prompt_length)
        input_ids, attention_mask, special = self._check_generation_inputs(input_ids, attention_mask, config, tokenizer)
        if stopping_criteria and special["pad"] is None:
            raise ValueError(
                "diffusion_generate: stopping_criteria need a pad_token_id (or eos_token_id) to fill the tail"
            )
        input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
        attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        return self._diffusion_sample(
            input_ids, attention_mask, config, special, streamer, generator, tokenizer, logits_processor,
            stopping_criteria,
        )

    def _check_generation_inputs(self, input_ids, attention_mask, config, tokenizer):
        """Check the prompt and the token ids of `config` against the model, before any forward pass."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(
                f"diffusion_generate: input_ids must be a [batch, prompt] integer tensor (torch.long), got "
                f"{type(input_ids).__name__}"
            )
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"diffusion_generate: input_ids has dtype {input_ids.dtype}; expected an integer tensor of token ids "
                "(torch.long or torch.int32)"
            )
        if input_ids.dim() != 2:
            raise ValueError(
                f"diffusion_generate: input_ids must be a [batch, prompt] LongTensor, got {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] == 0:
            raise ValueError("diffusion_generate: the prompt is empty (input_ids has 0 columns); give >= 1 token")
        if input_ids.shape[0] == 0:
            raise ValueError("diffusion_generate: input_ids has 0 rows; give at least one prompt")
        model_config = self.config
        vocab = model_config.vocab_size
        mask_id = config.mask_token_id if config.mask_token_id is not None else model_config.mask_token_id
        if not is_int(mask_id) or not 0 <= mask_id < vocab:
            raise ValueError(
                f"diffusion_generate: mask_token_id={mask_id!r} is not in the vocabulary [0, {vocab})"
                "; pass mask_token_id= (the official 7B uses 156895)"
            )
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"diffusion_generate: input_ids holds token id {low if low < 0 else high}, outside the vocabulary "
                f"[0, {vocab})"
            )
        if (input_ids == mask_id).any():
            row, col = (input_ids == mask_id).nonzero()[0].tolist()
            raise ValueError(
                f"diffusion_generate: input_ids[{row}, {col}] is the mask token ({mask_id}); a prompt (padding "
                "included) must not contain it: pad with pad_token_id and leave the masks to max_new_tokens"
            )
        for field in ("suppress_tokens", "confidence_suppress_tokens"):
            outside = [token for token in getattr(config, field) or () if not 0 <= token < vocab]
            if outside:
                raise ValueError(
                    f"diffusion_generate: {field}={getattr(config, field)!r} holds {outside}, outside the vocabulary "
                    f"[0, {vocab})"
                )
        suppressed = set(config.suppress_tokens or ()) | {mask_id}
        if len(suppressed) >= vocab:
            raise ValueError(
                f"diffusion_generate: suppress_tokens (with the mask token) cover the whole vocabulary of {vocab}; "
                "no token could be generated"
            )
        if len(suppressed | set(config.confidence_suppress_tokens or ())) >= vocab:
            raise ValueError(
                "diffusion_generate: suppress_tokens, confidence_suppress_tokens and the mask token cover the whole "
                f"vocabulary of {vocab}; confidences would be undefined"
            )
        pad_id = config.pad_token_id if config.pad_token_id is not None else model_config.pad_token_id
        eos = config.eos_token_id if config.eos_token_id is not None else model_config.eos_token_id
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if pad_id is None:
            pad_id = eos_ids[0] if eos_ids else None
        for name, token in [("pad_token_id", pad_id)] + [("eos_token_id", token) for token in eos_ids]:
            if token is not None and (not is_int(token) or not 0 <= token < vocab):
                raise ValueError(f"diffusion_generate: {name}={token!r} is not in the vocabulary [0, {vocab})")
        if pad_id == mask_id:
            raise ValueError(f"diffusion_generate: pad_token_id={pad_id} equals mask_token_id; they must differ")
        if (config.stop_at_eos or config.stop_strings) and pad_id is None:
            raise ValueError("diffusion_generate: stopping needs a pad_token_id (or eos_token_id) to fill the tail")
        if config.stop_at_eos and not eos_ids:
            raise ValueError("diffusion_generate: stop_at_eos=True needs an eos_token_id")
        if config.stop_strings and tokenizer is None:
            raise ValueError(f"diffusion_generate: stop_strings={config.stop_strings} need `tokenizer=` to decode")
        total = input_ids.shape[1] + config.max_new_tokens
        if total > model_config.max_position_embeddings:
            raise ValueError(
                f"diffusion_generate: prompt ({input_ids.shape[1]}) + max_new_tokens ({config.max_new_tokens}) = "
                f"{total} exceeds max_position_embeddings={model_config.max_position_embeddings}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(
                f"diffusion_generate: attention_mask must be a tensor of 0/1 like input_ids, got "
                f"{type(attention_mask).__name__}"
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"diffusion_generate: attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                f"{tuple(input_ids.shape)}"
            )
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            values = sorted({float(v) for v in attention_mask.unique().tolist()} - {0.0, 1.0})
            raise ValueError(
                f"diffusion_generate: attention_mask holds {values[:5]}; expected only 0 (left padding) and 1 (token)"
            )
        attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
        if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
            raise ValueError(
                "diffusion_generate: the attention_mask has right padding (a 0 after a 1); left-pad the prompts "
                "(tokenizer.padding_side = 'left')"
            )
        if (attention_mask.sum(dim=1) == 0).any():
            raise ValueError("diffusion_generate: a row of the attention_mask is all padding (an empty prompt)")
        special = {"mask": mask_id, "pad": pad_id, "eos": eos_ids}
        return input_ids, attention_mask, special

    def _diffusion_sample(
        self, input_ids, attention_mask, config, special, streamer, generator, tokenizer, logits_processor,
        stopping_criteria,
    ):
        device = input_ids.device
        batch, prompt_len = input_ids.shape
        gen_len = config.max_new_tokens
        blocks = split_blocks(gen_len, config.block_length)
        block_steps = split_steps(config.total_steps, blocks)
        mask_id = special["mask"]

        x = torch.cat([input_ids, torch.full((batch, gen_len), mask_id, dtype=input_ids.dtype, device=device)], 1)
        full_mask = torch.cat([attention_mask, torch.ones((batch, gen_len), dtype=torch.long, device=device)], 1)
        prompt_index = x != mask_id  # the reference masks exactly these in the unconditional CFG copy
        state = {
            "nfe": torch.zeros(batch, dtype=torch.long, device=device),
            "unmask_step": torch.full((batch, gen_len), -1, dtype=torch.long, device=device),
            "history": [] if config.output_history else None,
            "logits_processor": logits_processor,
            "draft_streamer": streamer if hasattr(streamer, "put_draft") else None,
            "forwards": 0,  # denoising steps run so far in this generation (cache_warmup_steps, the smoothing schedule)
            # iteration smoothing: the weighted expected embedding of each position's last prediction (zero: none)
            "smooth": None,
            "forward": self.__call__,
            "static_rows": False,  # compiled: finished rows stay in the batch, so shapes stay static per block
            "cudagraphs": False,  # compiled with CUDA graphs: mark each step and copy the logits out of the graph
        }
        if config.compile_config is not None and not config.disable_compile:
            if (
                config.compile_config.mode == "reduce-overhead" and device.type == "cuda"
                and config.cache_mode is not None
            ):
                raise ValueError(
                    "diffusion_generate: compile_config.mode='reduce-overhead' (CUDA graphs) cannot run with "
                    f"cache_implementation={config.cache_mode!r}: the block cache keeps graph outputs across "
                    "replays; use mode='default' or 'max-autotune-no-cudagraphs', or no cache"
                )
            state["forward"] = self.get_compiled_call(config.compile_config)
            state["static_rows"] = True
            state["cudagraphs"] = config.compile_config.mode == "reduce-overhead" and device.type == "cuda"
        if config.cont_weight is not None:
            embedding = self.get_input_embeddings().weight
            state["smooth"] = torch.zeros(
                (*x.shape, embedding.shape[1]), dtype=embedding.dtype, device=embedding.device
            )
        active = torch.ones(batch, dtype=torch.bool, device=device)
        if streamer is not None:
            streamer.put(input_ids.cpu())

        start = prompt_len
        for length, steps in zip(blocks, block_steps):
            rows = active.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            end = start + length
            self._decode_block(x, full_mask, prompt_index, rows, start, end, steps, config, special, state, generator)
            for row in rows.tolist():
                stops = self._row_stops(x, row, prompt_len, start, end, config, special, tokenizer, stopping_criteria)
                if stops is not None:
                    state["unmask_step"][row, stops:] = -1
                    active[row] = False
            if streamer is not None:
                streamer.put(x[:, start:end].cpu())
            start = end
        if streamer is not None:
            streamer.end()

        if not config.return_dict_in_generate:
            return x
        kept = (state["unmask_step"] >= 0).sum(dim=1).float()
        return DiffusionGenerateOutput(
            sequences=x,
            nfe=state["nfe"],
            tokens_per_forward=kept / state["nfe"].clamp(min=1),
            unmask_step=state["unmask_step"],
            history=tuple(state["history"]) if state["history"] is not None else None,
        )

    def _decode_block(self, x, full_mask, prompt_index, rows, start, end, steps, config, special, state, generator):
        """Denoise the block [start, end) of the canvas rows `rows` in place."""
        mask_id, prompt_len = special["mask"], x.shape[1] - config.max_new_tokens
        xs, masks, prompts = x[rows], full_mask[rows], prompt_index[rows]
        parallel = config.threshold is not None or config.factor is not None
        quota = transfer_schedule((xs[:, start:end] == mask_id).sum(dim=1), steps)
        cache, credit = None, None
        if config.cache_mode is not None:
            cache = DiffusionBlockCache(config.cache_mode, self.config.num_hidden_layers)
        # Threshold / factor rules commit at least one position per forward, so `end - start` forwards fill the block;
        # the cap is a guard: its last forward commits every remaining position (the threshold / factor ignored).
        max_forwards = end - start + FORWARD_CAP_MARGIN
        step = 0
        while True:
            still_masked = (xs[:, start:end] == mask_id).any(dim=1)
            if (step >= steps) if not parallel else not still_masked.any():
                break
            if parallel and not still_masked.all() and not state["static_rows"]:
                # a row whose block is final takes part in no more forwards
                keep = still_masked.nonzero().squeeze(1)
                rows, xs, masks, prompts = rows[keep], xs[keep], masks[keep], prompts[keep]
                credit = credit[keep] if credit is not None else None
                if cache is not None:  # with CFG the cache holds the conditional rows, then the unconditional ones
                    cache.keep_rows(torch.cat([keep, keep + len(still_masked)]) if config.cfg_scale > 0 else keep)
                still_masked = still_masked[keep]
            refresh = cache is not None and (
                step == 0
                or state["forwards"] < config.cache_warmup_steps
                or (config.cache_refresh_interval is not None and step % config.cache_refresh_interval == 0)
            )
            smooth = state["smooth"][rows] if state["smooth"] is not None else None
            logits, window = self._step_logits(
                xs, masks, prompts, mask_id, cache, refresh, start, end, config, smooth, state
            )
            lo, hi = start - window[0], end - window[0]  # the block's columns in the step's logits
            if smooth is not None:  # the step's predictions feed the next forwards' inputs; then the block's own
                smooth_predictions(  # generated columns only (a CFG copy's masked prompt keeps its plain mask)
                    state, rows, logits[:, lo:], (start, window[1]), self.get_input_embeddings().weight, config
                )
                logits, window, lo, hi = logits[:, lo:hi], (start, end), 0, end - start
            if state["logits_processor"]:
                logits = process_block_logits(state["logits_processor"], xs, logits, lo, hi)
            if config.credit_alpha is not None:
                fused, credit = fuse_credit(
                    logits[:, lo:hi], credit, xs[:, start:end] == mask_id, mask_id, config.credit_alpha,
                    config.credit_decay, config.credit_boost,
                )
                logits = torch.cat([logits[:, :lo], fused, logits[:, hi:]], dim=1)
            allowed = exclude_mask_token(logits, mask_id, lo, hi, config)
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
            candidates[:, start:end] = is_mask[:, start:end]
            # A candidate's score that is not a number (its softmax undefined, e.g. +inf logits) ranks below every
            # finite one but above the -inf of the other positions, so the quota / best-first rules still take it.
            low, high = torch.finfo(scores.dtype).min, torch.finfo(scores.dtype).max
            scores = torch.where(candidates, scores.nan_to_num(nan=low, posinf=high, neginf=low), float("-inf"))
            proposal = torch.where(is_mask, proposal, xs)

            threshold = config.threshold
            if config.threshold_decay is not None:
                threshold = max(1.0 - config.threshold_decay * state["forwards"], config.threshold)
            if parallel and step + 1 >= max_forwards:
                commit = candidates  # the forward cap: commit the rest of the block now
            elif config.low_threshold is not None:
                commit = select_by_hierarchy(scores, candidates, threshold, config.low_threshold)
            elif config.threshold is not None:
                commit = select_by_threshold(scores, candidates, threshold)
            elif config.factor is not None:
                commit = select_by_factor(scores, candidates, config.factor, config.factor_rule)
            else:
                commit = select_by_quota(scores, quota[:, step])

            participating = still_masked if parallel else torch.ones_like(still_masked)
            step_index = state["nfe"][rows]
            state["nfe"][rows] += participating.long()
            generated = commit[:, prompt_len:]
            unmask = state["unmask_step"][rows]
            unmask[generated] = step_index[:, None].expand_as(generated)[generated]
            state["unmask_step"][rows] = unmask
            xs = torch.where(commit, proposal, xs)
            x[rows] = xs
            if state["history"] is not None:
                state["history"].append(x.clone())
            if state["draft_streamer"] is not None:
                state["draft_streamer"].put_draft(x[:, start:end].cpu())
            step += 1
            state["forwards"] += 1
        if (xs[:, start:end] == mask_id).any():  # cannot happen: proposals exclude the mask and quotas fill the block
            raise RuntimeError(f"diffusion_generate: the block [{start}, {end}) still holds mask tokens after decoding")

    def _step_logits(self, xs, masks, prompts, mask_id, cache, refresh, start, end, config, smooth, state):
        """Logits of the columns [window) the step needs, with CFG applied; the window start is its offset.

        With a cache: `refresh` runs the whole canvas and stores its keys / values; other steps run the columns the
        cache recomputes (the block, widened by `cache_vicinity`; the prefix cache: from there to the end).
        `smooth` (iteration smoothing, [rows, canvas, hidden]) is added to the embeddings of masked positions; the
        window then also covers the masked columns after the block that the forward computes."""
        inputs, attention = xs, masks
        if config.cfg_scale > 0:
            inputs = torch.cat([xs, xs.masked_fill(prompts, mask_id)])
            attention = torch.cat([masks, masks])
        total = xs.shape[1]

        def run(lo, hi, **kwargs):  # the model on the canvas columns [lo, hi)
            forward = state["forward"]
            if state["cudagraphs"]:  # the previous replay's outputs are read already: let the next overwrite
                torch.compiler.cudagraph_mark_step_begin()
            if smooth is None:
                logits = forward(inputs[:, lo:hi], attention_mask=attention, **kwargs).logits
            else:
                ids = inputs[:, lo:hi]
                extra = smooth[:, lo:hi].repeat(inputs.shape[0] // xs.shape[0], 1, 1)
                embeds = self.get_input_embeddings()(ids)
                embeds = embeds + torch.where((ids == mask_id)[..., None], extra.to(embeds.dtype), 0)
                logits = forward(inputs_embeds=embeds, attention_mask=attention, **kwargs).logits
            return logits.clone() if state["cudagraphs"] else logits

        if cache is None:
            logits, window = run(0, total), (0, total)
        elif refresh:
            cache.refresh()
            window = (start, total if smooth is not None else end)
            logits = run(0, total, past_key_values=cache, logits_to_keep=torch.arange(*window, device=xs.device))
            left, right = config.cache_vicinity or (0, 0)
            cache.select_block(max(start - left, 0), min(end + right, total))
        else:
            lo, hi = cache.layers[0].window
            hi = total if cache.mode == "prefix" else hi
            window = (start, hi if smooth is not None else end)
            keep = torch.arange(window[0] - lo, window[1] - lo, device=xs.device)
            logits = run(lo, hi, past_key_values=cache, logits_to_keep=keep)
        if config.cfg_scale > 0:
            cond, uncond = logits.chunk(2)
            logits = uncond + (config.cfg_scale + 1) * (cond - uncond)
        if config.suppress_tokens:
            logits = SuppressTokensLogitsProcessor(config.suppress_tokens, device=logits.device)(None, logits)
        return logits, window

    def _row_stops(self, x, row, prompt_len, start, end, config, special, tokenizer, stopping_criteria) -> int | None:
        """After the block [start, end) is final: where row `row` stops (EOS, a stop string or one of the
        `stopping_criteria`, at the first position of the block where one applies): the number of generated tokens
        it keeps, its tail padded; None if it goes on."""
        generated = x[row, prompt_len:end]
        cut = None
        if config.stop_at_eos:
            hits = torch.isin(generated, torch.tensor(special["eos"], device=x.device)).nonzero()
            if hits.numel():
                cut = int(hits[0]) + 1
        first, last = start - prompt_len + 1, generated.numel() if cut is None else cut - 1
        if config.stop_strings:
            for length in range(first, last + 1):
                text = tokenizer.decode(generated[:length])
                if any(stop in text for stop in config.stop_strings):
                    cut = last = length
                    break
        if stopping_criteria:
            for length in range(first, last + 1):
                if bool(stopping_criteria(x[row : row + 1, : prompt_len + length], None).any()):
                    cut = length
                    break
        if cut is not None:
            x[row, prompt_len + cut :] = special["pad"]
        return cut

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
        for name, value in (("mc_samples", mc_samples), ("batch_size", batch_size)):
            if not is_int(value):
                raise TypeError(f"diffusion_loglikelihood: {name}={value!r}; expected a positive integer")
        if not is_number(cfg_scale):
            raise TypeError(f"diffusion_loglikelihood: cfg_scale={cfg_scale!r}; expected a finite float >= 0")
        if not math.isfinite(cfg_scale) or cfg_scale < 0:
            raise ValueError(f"diffusion_loglikelihood: cfg_scale={cfg_scale!r}; expected a finite float >= 0")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"diffusion_loglikelihood: generator={generator!r}; expected a torch.Generator or None")
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
            total += elbo_weighted_nll(logits, sequence, masked, lengths).sum().item()
        return torch.tensor(-total / mc_samples)
