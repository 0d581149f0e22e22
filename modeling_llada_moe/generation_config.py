"""`DiffusionGenerationConfig`: the settings of `diffusion_generate`, its named presets and its declared checks.

Every field is checked by one rule of `FIELD_RULES` (its type and range, `validators.FieldRule`), then by the few
checks that relate fields (`steps` and the blocks, sampling filters and `temperature`, the decoding rules that need
`threshold`, the cache settings that need a cache). Errors name the field and its value: `TypeError` for a wrong
type, `ValueError` for a wrong value.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import CompileConfig

from .validators import FieldRule


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
    "early_stopping": (None, False),
    "use_mtp": (None, False),
    "speculation_type": (None,),
    "cache_config": (None,),
    "max_cache_len": (None,),
    "token_healing": (None, False),
    "decoder_start_token_id": (None,),
    "low_memory": (None, False),
    "prefill_chunk_size": (None,),
    "continuous_batching_config": (None,),
}
# GenerationConfig outputs that diffusion decoding does not return, with the values that mean "off".
NOT_RETURNED_FIELDS = {
    "output_attentions": (None, False),
    "output_hidden_states": (None, False),
}
# GenerationConfig fields that are accepted with any value and change nothing, with why (see docs/generation.md).
HARMLESS_FIELDS = {
    "is_assistant": "marks a model used as another's assistant model; generate refuses `assistant_model`",
    "num_assistant_tokens": "a setting of assisted decoding, which generate refuses (`assistant_model`)",
    "num_assistant_tokens_schedule": "a setting of assisted decoding, which generate refuses (`assistant_model`)",
    "assistant_confidence_threshold": "a setting of assisted decoding, which generate refuses (`assistant_model`)",
    "max_matching_ngram_size": "a setting of prompt-lookup decoding, refused as `prompt_lookup_num_tokens`",
    "assistant_lookbehind": "a setting of assisted decoding, which generate refuses (`assistant_model`)",
    "target_lookbehind": "a setting of assisted decoding, which generate refuses (`assistant_model`)",
    "assistant_ensemble_weight": "a setting of assisted decoding, which generate refuses (`assistant_model`)",
    "_from_model_config": "transformers' bookkeeping: whether the config was built from the model config",
    "transformers_version": "the version that wrote the file",
}
# The key a saved generation config stores the diffusion cache kind under: transformers' own validation rejects
# "prefix" / "dual" as `cache_implementation`, so a saved file keeps that field out and plain
# `GenerationConfig.from_pretrained` reads it. `DiffusionGenerationConfig` reads both keys back.
SAVED_CACHE_KEY = "diffusion_cache_implementation"

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



def count(minimum: int = 1, accepted: str = "expected a positive integer", allow_none: bool = False) -> FieldRule:
    """An integer field (a type error says "expected a positive integer", as every count's does)."""
    return FieldRule(
        "int", minimum=minimum, allow_none=allow_none, accepted=accepted, type_accepted="expected a positive integer"
    )


def real(accepted: str, minimum: float | None = None, above: float | None = None, maximum: float | None = None,
         allow_none: bool = False) -> FieldRule:
    """A finite-number field."""
    return FieldRule("number", minimum=minimum, above=above, maximum=maximum, allow_none=allow_none, accepted=accepted)


def choice(options, accepted: str, allow_none: bool = False) -> FieldRule:
    """A field that takes one of `options`."""
    return FieldRule(choices=tuple(options), allow_none=allow_none, accepted=accepted)


def flag(allow_none: bool = False) -> FieldRule:
    """True or False (or None)."""
    return FieldRule("bool", allow_none=allow_none, type_accepted="expected True, False or None" if allow_none else "")


def token_ids(accepted: str, kind: str | tuple[str, ...] = "int") -> FieldRule:
    """A token id or a list of them, or None (the vocabulary bounds are checked against the model at call time)."""
    return FieldRule(kind, allow_none=True, type_accepted=accepted)


UNIT = "expected a float in (0, 1]"
SAMPLING = "used only when sampling (temperature > 0)"
# The type and range of every field `validate` checks, in the order it checks them (first the types of all, then the
# ranges of all); the checks that relate fields follow in `DiffusionGenerationConfig._check_relations`.
FIELD_RULES: dict[str, FieldRule] = {
    "max_new_tokens": count(),
    "block_length": count(),
    "num_return_sequences": count(),
    "max_length": count(accepted="expected a positive integer (prompt + generated tokens) or None", allow_none=True),
    "steps": FieldRule("int", allow_none=True, type_accepted="expected a positive integer"),  # bounds: by the blocks
    "top_k": count(accepted=f"expected a positive integer, {SAMPLING}", allow_none=True),
    "cache_refresh_interval": count(
        accepted="expected a positive integer (steps between refreshes) or None", allow_none=True
    ),
    "cache_warmup_steps": count(minimum=0, accepted="expected an integer >= 0"),
    "temperature": real("expected a finite float >= 0 (0 = greedy)", minimum=0),
    "top_p": real(f"expected a float in (0, 1], {SAMPLING}", above=0, maximum=1, allow_none=True),
    "cfg_scale": real("expected a finite float >= 0", minimum=0),
    "threshold": real(UNIT, above=0, maximum=1, allow_none=True),
    "factor": real("expected a finite positive float", above=0, allow_none=True),
    "low_threshold": real("", allow_none=True),  # its range, (0, threshold], is checked with `threshold`
    "credit_alpha": real("expected a finite positive float (None = no credit decoding)", above=0, allow_none=True),
    "credit_decay": real(UNIT, above=0, maximum=1),
    "credit_boost": real(UNIT, above=0, maximum=1),
    "cont_weight": real("expected a finite positive float (None = no iteration smoothing)", above=0, allow_none=True),
    "cont_weight_init": real("expected a finite float >= 0", minimum=0),
    "cont_weight_growth": real("expected a finite float >= 0", minimum=0),
    "threshold_decay": real("expected a finite positive float (None = no decay)", above=0, allow_none=True),
    "stop_at_eos": flag(),
    "output_history": flag(),
    "return_dict_in_generate": flag(),
    "do_sample": flag(allow_none=True),
    "mask_token_id": token_ids("expected an integer token id"),
    "pad_token_id": token_ids("expected an integer token id or None"),
    "bos_token_id": token_ids("expected an integer token id or None"),
    "eos_token_id": token_ids("expected an integer token id, a list of them, or None", kind=("int", "int_list")),
    "suppress_tokens": token_ids("expected a list of integer token ids or None", kind="int_list"),
    "confidence_suppress_tokens": token_ids("expected a list of integer token ids or None", kind="int_list"),
    "stop_strings": FieldRule(
        "text_list", allow_none=True, type_error=ValueError,
        type_accepted="expected a non-empty string or a list of non-empty strings",
    ),
    "remasking": choice(REMASKING_STRATEGIES, f"expected one of {REMASKING_STRATEGIES}"),
    "factor_rule": choice(FACTOR_RULES, f"expected one of {FACTOR_RULES}"),
    "confidence_dtype": choice(
        CONFIDENCE_DTYPES, f"expected None (the logits dtype) or one of {tuple(CONFIDENCE_DTYPES)}", allow_none=True
    ),
    "cache_vicinity": FieldRule(
        "int_list", length=2, minimum=0, allow_none=True, accepted="expected a pair of integers >= 0 (left, right)",
        type_accepted="expected None or a pair of integers (left, right)",
    ),
    "use_cache": FieldRule(
        "bool", allow_none=True, type_error=ValueError,
        type_accepted="expected True, False or None (the cache kind is cache_implementation, one of "
        f"{CACHE_IMPLEMENTATIONS})",
    ),
    "cache_implementation": choice(
        CACHE_IMPLEMENTATIONS, f"expected None (no cache) or one of {CACHE_IMPLEMENTATIONS}", allow_none=True
    ),
    "compile_config": FieldRule(
        CompileConfig, allow_none=True, type_accepted="expected a transformers.CompileConfig or None"
    ),
    "disable_compile": flag(allow_none=True),
    "max_time": real("expected a finite float >= 0 (seconds) or None", minimum=0, allow_none=True),
    "remove_invalid_values": flag(allow_none=True),
    "renormalize_logits": flag(allow_none=True),
    # transformers' fields that mean something for autoregressive decoding only: their "off" values alone
    **{
        field: FieldRule(
            choices=off, allow_none=True, accepted="it applies to autoregressive decoding only"
            + (" (use cfg_scale for guidance: cfg_scale = guidance_scale - 1)" if field == "guidance_scale" else ""),
        )
        for field, off in AR_ONLY_FIELDS.items()
    },
    **{
        field: FieldRule(
            choices=off, allow_none=True, accepted="diffusion decoding does not return it (output_history=True "
            "returns the canvas after every step)",
        )
        for field, off in NOT_RETURNED_FIELDS.items()
    },
}
# Cache settings that only mean something with a cache, with their "off" values.
CACHE_ONLY_FIELDS = {"cache_refresh_interval": None, "cache_vicinity": None, "cache_warmup_steps": 0}


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
        max_time (`float`, *optional*): a time budget in seconds, counted from the start of the decoding (after the
            argument checks). Once it is spent, the next forward commits every masked position left, in the current
            block and every later one, with that forward's proposals (the argmax at `temperature=0`): the canvas
            comes back with no mask left, after one more forward at most. Blocks are then checked for stops in
            order, as usual. `None` = no budget. `max_time=0` decodes the whole canvas in one forward.
        remove_invalid_values (`bool`, *optional*): as transformers' `InfNanRemoveLogitsProcessor`, after the
            `logits_processor`: NaN logits become 0 and +inf / -inf the dtype's largest / smallest value, so
            decoding goes on where it would otherwise raise. Off (the default), non-finite logits raise a
            `ValueError` naming the likely cause.
        renormalize_logits (`bool`, *optional*): accepted; always the case here: proposals and confidences are
            computed from the softmax of the processed logits, so they are normalised after the processors either
            way.
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
        saved_cache = kwargs.pop(SAVED_CACHE_KEY, None)
        if saved_cache is not None and kwargs.get("cache_implementation") is None:
            kwargs["cache_implementation"] = saved_cache
        for key, value in DIFFUSION_DEFAULTS.items():
            kwargs.setdefault(key, value)
        if kwargs.get("do_sample") is None and isinstance(kwargs["temperature"], (int, float)):
            # Written out, so that pipelines see greedy decoding as set and add no sampling defaults of their own.
            kwargs["do_sample"] = kwargs["temperature"] > 0
        super().__init__(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """transformers' `to_dict`, with the diffusion cache kind ("prefix" / "dual") under `SAVED_CACHE_KEY` instead
        of `cache_implementation`, whose values transformers' own `GenerationConfig` validates: a saved
        `generation_config.json` then loads with plain `GenerationConfig.from_pretrained` too."""
        output = super().to_dict()
        if output.get("cache_implementation") in CACHE_IMPLEMENTATIONS:
            output[SAVED_CACHE_KEY] = output.pop("cache_implementation")
        return output

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
        """Raise `TypeError` / `ValueError` naming the field for any setting `diffusion_generate` cannot honour: the
        type and range each field declares in `FIELD_RULES`, then the checks that relate fields."""
        self._normalize()
        for check in ("type_problem", "value_problem"):
            for field, rule in FIELD_RULES.items():
                problem = getattr(rule, check)(getattr(self, field, None))
                if problem is not None:
                    self._fail(field, problem[1], problem[0])
        if self.cache_vicinity is not None:
            self.cache_vicinity = tuple(self.cache_vicinity)
        self._check_relations()

    def _fail(self, field: str, accepted: str, error: type[Exception] = ValueError) -> None:
        raise error(f"DiffusionGenerationConfig: `{field}`={getattr(self, field, None)!r} is invalid; {accepted}.")

    def _normalize(self) -> None:
        """The spellings `validate` accepts for another: a deprecated `use_cache="prefix" | "dual"` (the cache kind,
        now `cache_implementation`) and one stop string for a list of one."""
        if isinstance(self.use_cache, str) and self.use_cache in CACHE_IMPLEMENTATIONS:
            warnings.warn(
                f"use_cache={self.use_cache!r} is deprecated: use cache_implementation={self.use_cache!r} (use_cache "
                "is transformers' bool: True = a cache, 'prefix' unless cache_implementation says otherwise)",
                FutureWarning,
                stacklevel=4,
            )
            self.cache_implementation, self.use_cache = self.use_cache, True
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]

    def _check_relations(self) -> None:
        """The checks that relate fields, once each field is valid on its own."""
        if self.steps is not None and self.steps < self.num_blocks:
            self._fail("steps", f"expected a positive integer, at least the number of blocks ({self.num_blocks})")
        if self.steps is not None and self.steps > self.max_new_tokens:
            # More steps than tokens would run forwards that commit nothing: every step commits at least one.
            self._fail("steps", f"expected at most max_new_tokens={self.max_new_tokens} (one token per step)")
        if self.do_sample is False and self.temperature > 0:
            self._fail("do_sample", f"do_sample=False means greedy, but temperature={self.temperature}")
        if self.do_sample is True and self.temperature == 0:
            self._fail("do_sample", "do_sample=True needs temperature > 0")
        for field in ("top_k", "top_p"):
            if getattr(self, field) is not None and self.temperature == 0:
                self._fail(field, FIELD_RULES[field].accepted)
        if self.threshold is not None and self.factor is not None:
            self._fail("factor", "threshold and factor are exclusive parallel-decoding rules")
        if self.low_threshold is not None and self.threshold is None:
            self._fail("low_threshold", "hierarchical decoding needs `threshold` (the high threshold) too")
        if self.low_threshold is not None and not 0 < self.low_threshold <= self.threshold:
            self._fail("low_threshold", f"expected a float in (0, threshold={self.threshold}]")
        if self.threshold_decay is not None and self.threshold is None:
            self._fail("threshold_decay", "it decays `threshold`: set threshold too")
        if self.cache_mode is None:
            for field, off in CACHE_ONLY_FIELDS.items():
                if getattr(self, field) != off:
                    self._fail(field, "it applies to a cache only: set cache_implementation ('prefix' or 'dual')")

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

