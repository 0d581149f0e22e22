"""LLaDA-MoE as an lm-evaluation-harness model: `--model llada_moe` (registered when this module is imported).

- `loglikelihood`: LLaDA's Monte-Carlo ELBO through the model's `diffusion_loglikelihood` (a lower bound on
  log p(continuation | context); `mc_num` masked copies, `mc_batch_size` per forward).
- `loglikelihood_rolling`: the same ELBO over windows of at most `max_length` tokens that score every token once.
- `generate_until`: batched `diffusion_generate` on left-padded prompts; `until` strings stop rows early and cut
  the text.

lm-eval 0.4.13 finds models only in its own registry (no plugin entry points), so the command line is lm-eval's
own, started from here: `python -m modeling_llada_moe.apps.evaluation --model llada_moe --model_args pretrained=...`.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models: its registry imports them only while it is empty)
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .. import DiffusionGenerationConfig
from ..forward_process import example_generator
from ..validators import is_int
from .inference import completion_ids, end_of_turn_ids, load_model_and_tokenizer, pick_device, render_chat_template
from .settings import decoding_config


logger = logging.getLogger(__name__)

GREEDY_CHECKS = ("off", "decode", "one_step")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF default when a task sets no max_gen_toks
MC_BATCH_SIZE = 32  # LLaDA's lm-eval batch of masked copies
# Decoding settings a task (or `--gen_kwargs`) may set per request, by `settings.decoding_config`'s names.
DECODING_GEN_KWARGS = (
    "steps", "block_length", "remasking", "threshold", "factor", "cfg_scale", "top_k", "top_p", "use_cache",
    "cache_implementation",
)
# Every gen_kwarg accepted; the max-token aliases, `until` and `do_sample` are lm-eval's.
GEN_KWARGS = frozenset(
    {"until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens", "do_sample", "temperature"}
    | set(DECODING_GEN_KWARGS)
)


def rolling_windows(tokens: list[int], prefix: list[int], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, target) windows of at most `max_length` tokens that score every token of `tokens` exactly once.

    The first window scores the first `max_length - len(prefix)` tokens after `prefix` (BOS/EOS); each later one
    scores the next `max_length - max_length // 2` tokens given the `max_length // 2` tokens before them.
    """
    first = max_length - len(prefix)
    if first < 1:
        raise ValueError(f"max_length={max_length} leaves no room after the {len(prefix)}-token prefix")
    if not tokens:
        return []
    context = max_length // 2
    step = max_length - context
    windows = [(list(prefix), tokens[:first])]
    for start in range(first, len(tokens), step):
        windows.append((tokens[max(start - context, 0) : start], tokens[start : start + step]))
    return windows


def count(value: Any, name: str) -> int:
    """`value` as an int >= 1, also from its digits (lm-eval's command line passes some arguments as text)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return value


class LLaDAMoELM(TemplateLM):
    """lm-eval model for LLaDA-MoE (and any model with `diffusion_generate` / `diffusion_loglikelihood`).

    Args (lm-eval passes them from `--model_args key=value,...`; Python callers may pass objects):
        pretrained: a model folder or Hub id, loaded with `inference.load_model_and_tokenizer`; or an already
            built model (then `tokenizer` is required, and `device` / `dtype` / `bits` / `quant_method` are refused).
        tokenizer: a tokenizer object, or a folder / Hub id; default: the model's.
        batch_size: prompts per `diffusion_generate` call in `generate_until` (an integer; "auto" is refused).
        device: "cpu", "cuda" or "cuda:N"; default CUDA when available. A CUDA device without CUDA falls back to
            the CPU with a warning, as lm-eval's `hf` model does (the lm-eval CLI defaults to "cuda:0").
        dtype: "auto" (the checkpoint's), "bfloat16", "float16" or "float32". bits: 4 (NF4) or 8 via bitsandbytes;
            quant_method: with bits=4, "nf4" (default) or "int4" (torch's CPU int4 kernel, CPU only).
        trust_remote_code: for the tokenizer. max_length: longest scored / generated sequence; default the model's
            `max_position_embeddings`.
        mc_num: masked copies per likelihood (default 128, as LLaDA; 1 is enough for one-token continuations,
            which always use a single exact forward). mc_batch_size: copies per forward (divides mc_num; default
            the largest divisor of mc_num up to 32).
        greedy_check: how `loglikelihood` fills `is_greedy`: "off" (default, False for every request: LLaDA's
            recommendation; multiple-choice metrics do not use it), "decode" (LLaDA's `is_check_greedy`: greedy
            diffusion decoding of a continuation-length canvas, one token per step, low-confidence order, must
            reproduce the continuation; one forward per token) or "one_step" (one forward with the whole
            continuation masked; the argmax must equal it at every position). true / false mean decode / off.
        cfg_scale: classifier-free guidance for likelihoods and generation (the prompt masked in the
            unconditional copy).
        max_new_tokens (alias gen_length): a fixed generation canvas for every request, like LLaDA's eval; unset,
            each request's `max_gen_toks` (default 256) is the canvas. Either way it is rounded up to whole blocks
            and the output trimmed back.
        preset: named decoding settings applied first (`DiffusionGenerationConfig.from_preset`: llada, fast_dllm,
            dinfer, dinfer_smooth); the arguments below override them.
        steps, block_length, remasking, threshold, factor, cache_implementation, use_cache, temperature, top_k,
            top_p: the `DiffusionGenerationConfig` settings (unset ones keep the model's `generation_config`).
            `steps` counts denoising steps for the whole canvas (unset: one token per step);
            `cache_implementation` is none / prefix / dual, `use_cache=false` means no cache (the old
            `use_cache=prefix|dual` still works as cache_implementation). A
            request's gen_kwargs override them (`--gen_kwargs steps=64,threshold=0.9`); its `do_sample=false`
            / `temperature` override the model's temperature.
        seed: seeds the masks of each likelihood (from the seed and the request's tokens, so results do not depend
            on order or batching) and sampling.

    Unknown arguments raise a ValueError naming them.
    """

    def __init__(
        self,
        pretrained: str | Path | torch.nn.Module | None = None,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        bits: int | None = None,
        quant_method: str | None = None,
        trust_remote_code: bool = False,
        max_length: int | None = None,
        mc_num: int = 128,
        mc_batch_size: int | None = None,
        greedy_check: str | bool = "off",
        cfg_scale: float | None = None,
        max_new_tokens: int | None = None,
        gen_length: int | None = None,
        preset: str | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        remasking: str | None = None,
        threshold: float | None = None,
        factor: float | None = None,
        use_cache: str | bool | None = None,
        cache_implementation: str | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 1234,
        max_batch_size: int | None = None,  # lm-eval's auto-batching cap, passed to every model; unused here
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            accepted = sorted(set(inspect.signature(LLaDAMoELM).parameters) - {"unknown"})
            raise ValueError(f"llada_moe: unknown model argument(s) {sorted(unknown)}; accepted are {accepted}")
        # Arguments that need no model are checked before loading one.
        if isinstance(batch_size, str) and not batch_size.strip().isdigit():
            raise ValueError(f"batch_size={batch_size!r}: expected an integer ('auto' is not supported)")
        self.batch_size = count(batch_size, "batch_size")
        self.mc_num = count(mc_num, "mc_num")
        self.mc_batch_size = math.gcd(self.mc_num, MC_BATCH_SIZE) if mc_batch_size is None else mc_batch_size
        self.mc_batch_size = count(self.mc_batch_size, "mc_batch_size")
        if self.mc_num % self.mc_batch_size:
            raise ValueError(f"mc_batch_size={self.mc_batch_size} must divide mc_num={self.mc_num}")
        greedy_check = {True: "decode", False: "off", None: "off"}.get(greedy_check, greedy_check)
        if greedy_check not in GREEDY_CHECKS:
            raise ValueError(f"greedy_check={greedy_check!r}: expected one of {GREEDY_CHECKS} (or true / false)")
        self.greedy_check = greedy_check
        self.seed = int(seed)
        if max_new_tokens is not None and gen_length is not None and max_new_tokens != gen_length:
            raise ValueError(f"max_new_tokens={max_new_tokens} and gen_length={gen_length} are aliases; give one")
        canvas = max_new_tokens if max_new_tokens is not None else gen_length
        self.fixed_canvas = count(canvas, "max_new_tokens") if canvas is not None else None
        self._max_length = count(max_length, "max_length") if max_length is not None else None

        self._model, self.tokenizer = self._load(
            pretrained, tokenizer, device, dtype, bits, quant_method, trust_remote_code
        )
        self._device = self._model.device
        if self.max_length < 2:
            raise ValueError(f"max_length={self.max_length}: expected at least 2 tokens")
        settings = dict(block_length=block_length, remasking=remasking, threshold=threshold, factor=factor)
        settings.update(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
        settings.update(use_cache=use_cache, cache_implementation=cache_implementation)
        self.preset, self.steps = preset, steps  # steps counts steps of each request's canvas: applied per request
        # The model's generation config, the preset, then the model arguments (a SettingError names a bad one).
        self.generation_config = decoding_config(
            self._model, preset=preset, steps=None, stop_strings=None,
            **{name: value for name, value in settings.items() if value is not None},
        )
        self.generation_config.update(num_return_sequences=1, return_dict_in_generate=False, output_history=False)
        # Checked once up front, on the fixed canvas or one block (steps only against a fixed canvas).
        self._canvas_config(self.generation_config, self.fixed_canvas or self.generation_config.block_length,
                            self.steps if self.fixed_canvas else None)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------------------------------------ set-up
    def _load(self, pretrained, tokenizer, device, dtype, bits, quant_method, trust_remote_code):
        if pretrained is None:
            raise ValueError("llada_moe: pretrained= is required (a model folder, a Hub id, or a built model)")
        if isinstance(pretrained, (str, Path)):
            tokenizer_path = tokenizer if isinstance(tokenizer, (str, Path)) else None
            model, loaded_tokenizer = load_model_and_tokenizer(
                pretrained,
                bits=bits,
                quant_method=quant_method,
                dtype=dtype,
                device=self._pick_device(device),
                tokenizer_name_or_path=tokenizer_path,
                trust_remote_code=bool(trust_remote_code),
            )
            tokenizer = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else loaded_tokenizer
        elif isinstance(pretrained, torch.nn.Module):
            for name, value in (("bits", bits), ("quant_method", quant_method)):
                if value is not None:
                    raise ValueError(
                        f"{name}={value!r} applies when pretrained is a path; quantize a built model yourself"
                    )
            if tokenizer is None:
                raise ValueError("llada_moe: a built model needs tokenizer= (a tokenizer object or its folder)")
            if isinstance(tokenizer, (str, Path)):
                tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=bool(trust_remote_code))
            model = pretrained.eval()
        else:
            raise ValueError(f"pretrained={pretrained!r}: expected a model folder, a Hub id or a model object")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ValueError(f"tokenizer={tokenizer!r}: expected a transformers tokenizer, a folder or a Hub id")
        missing = [name for name in ("diffusion_generate", "diffusion_loglikelihood") if not hasattr(model, name)]
        if missing:
            raise ValueError(f"{type(model).__name__} has no {missing}: expected a masked-diffusion LM (LLaDA-MoE)")
        return model, tokenizer

    @staticmethod
    def _pick_device(device: str | None) -> torch.device | None:
        if device is None:
            return None  # load_model_and_tokenizer's default: CUDA when available (the CPU for quant_method=int4)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            logger.warning("device=%r but CUDA is not available: using the CPU", device)
            return torch.device("cpu")
        return pick_device(device)

    # ---------------------------------------------------------------------------------------- lm-eval interface
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def eot_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self._model.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Conditions an empty context: BOS when the tokenizer has one, else EOS (as lm-eval's `hf` model)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or self._model.config.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self.fixed_canvas or DEFAULT_MAX_GEN_TOKS

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The few-shot chat as one prompt string through the tokenizer's chat template (`--apply_chat_template`)."""
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("--apply_chat_template: the tokenizer has no chat template (use a base-model prompt)")
        return render_chat_template(self.tokenizer, chat_history, add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`; with `add_special_tokens=None` the tokenizer's default, unless `string` already
        starts with the BOS text (a chat-templated prompt)."""
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.bos_token):
            add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
            "model_dtype": str(self._model.dtype),
            "mc_num": self.mc_num,
            "greedy_check": self.greedy_check,
        }

    # ------------------------------------------------------------------------------------------- likelihoods
    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(ELBO of the continuation given the context, is_greedy) per `(context, continuation)` request.

        lm-eval's `TemplateLM` splits the text: trailing context spaces move to the continuation, context +
        continuation are encoded whole and split at the context's length, and an empty context becomes
        `prefix_token_id`. A context too long for `max_length` is cut from the left; a continuation longer than
        `max_length` is a ValueError. An empty continuation scores (0.0, True).
        """
        if self.greedy_check == "off":
            self._warn_once(
                "greedy",
                "greedy_check='off': is_greedy is False for every request. Multiple-choice metrics ignore it; the "
                "`acc` of loglikelihood tasks (e.g. lambada) needs greedy_check=decode (LLaDA's) or one_step.",
            )
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        desc = "Running loglikelihood requests (Monte-Carlo ELBO)"
        for (context, continuation), context_ids, continuation_ids in tqdm(
            requests, desc=desc, disable=disable_tqdm or self.rank != 0
        ):
            prefix, target = self._fit(list(context_ids), list(continuation_ids))
            result = (self._elbo(prefix, target), self._is_greedy(prefix, target)) if target else (0.0, True)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """ELBO of each whole document (a lower bound: masked diffusion has no exact left-to-right likelihood),
        conditioned on `prefix_token_id` and summed over `rolling_windows` of at most `max_length` tokens."""
        results = []
        for (string,) in tqdm(
            [request.args for request in requests],
            desc="Running loglikelihood_rolling requests (Monte-Carlo ELBO)",
            disable=disable_tqdm or self.rank != 0,
        ):
            tokens = self.tok_encode(string, add_special_tokens=False)
            windows = rolling_windows(tokens, [self.prefix_token_id], self.max_length)
            total = sum(self._elbo(prefix, target) for prefix, target in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    def _fit(self, prefix: list[int], target: list[int]) -> tuple[list[int], list[int]]:
        """Cut the prefix from the left so prefix + target fit in `max_length`."""
        if len(target) > self.max_length:
            raise ValueError(
                f"a continuation of {len(target)} tokens exceeds max_length={self.max_length}; it cannot be scored"
            )
        room = self.max_length - len(target)
        if len(prefix) > room:
            self._warn_once("truncate", f"contexts longer than {room} tokens are cut from the left to fit max_length")
            prefix = prefix[len(prefix) - room :]
        return prefix, target

    def _elbo(self, prefix: list[int], target: list[int]) -> float:
        # A one-token target has a single mask pattern, so one forward is the exact value of any number of copies.
        samples = self.mc_num if len(target) > 1 else 1
        return self._model.diffusion_loglikelihood(
            prefix,
            target,
            mc_samples=samples,
            batch_size=min(self.mc_batch_size, samples),
            cfg_scale=self.generation_config.cfg_scale,
            generator=example_generator(self.seed, prefix, target),
            mask_token_id=self.generation_config.mask_token_id,
        ).item()

    def _is_greedy(self, prefix: list[int], target: list[int]) -> bool:
        """`greedy_check`: whether greedy diffusion decoding of len(target) tokens after the prefix gives target."""
        if self.greedy_check == "off" or not prefix:  # diffusion decoding needs a prompt; only a max_length target
            return False
        config = DiffusionGenerationConfig(
            max_new_tokens=len(target),
            block_length=len(target),
            steps=len(target) if self.greedy_check == "decode" else 1,
            cfg_scale=self.generation_config.cfg_scale,
            mask_token_id=self.generation_config.mask_token_id,
            pad_token_id=self.generation_config.pad_token_id,
            eos_token_id=self.generation_config.eos_token_id,
        )
        prompt = torch.tensor([prefix], dtype=torch.long, device=self.device)
        decoded = self._model.diffusion_generate(prompt, generation_config=config)
        return decoded[0, len(prefix) :].tolist() == target

    # ---------------------------------------------------------------------------------------------- generation
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Generated text per `(context, gen_kwargs)` request, cut at the first `until` string (and EOS).

        Requests with equal gen_kwargs run together, `batch_size` left-padded prompts per `diffusion_generate`
        call, longest first. The canvas is `max_gen_toks` (or the fixed `max_new_tokens`) rounded up to whole
        blocks; the output is trimmed back to it. `until` strings are passed as `stop_strings`, so a row stops at
        the end of the block where one appears, and the text is cut at the first of them as lm-eval expects.
        Accepted gen_kwargs: `GEN_KWARGS`; others raise a ValueError naming them.
        """
        results = []
        progress = tqdm(
            total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running generate_until requests"
        )
        collator = Collator(
            [request.args for request in requests],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_gen_kwargs = zip(*chunk)
            gen_kwargs = all_gen_kwargs[0]  # the collator groups requests by gen_kwargs
            config, until, max_gen_toks = self._request_config(gen_kwargs)
            input_ids, attention_mask = self._left_padded(contexts, config.max_new_tokens)
            sampled = config.temperature > 0 or config.remasking == "random"
            output = self._model.diffusion_generate(
                input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                tokenizer=self.tokenizer,
                generator=example_generator(self.seed, input_ids.flatten()) if sampled else None,
            )
            for context, row in zip(contexts, output[:, input_ids.shape[1] :]):
                text = self.tokenizer.decode(
                    completion_ids(self.tokenizer, row[:max_gen_toks]), skip_special_tokens=True
                )
                text = postprocess_generated_text(text, until, None)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                results.append(text)
                progress.update(1)
        progress.close()
        return collator.get_original(results)

    def _request_config(self, gen_kwargs: dict) -> tuple[DiffusionGenerationConfig, list[str], int]:
        """The DiffusionGenerationConfig of one group of requests, its `until` strings and its max_gen_toks."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generate_until: gen_kwargs={gen_kwargs!r}: expected a dict")
        unknown = sorted(set(gen_kwargs) - GEN_KWARGS)
        if unknown:
            raise ValueError(
                f"llada_moe generate_until: unknown gen_kwargs {unknown}; accepted are {sorted(GEN_KWARGS)}"
            )
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen_toks = self.fixed_canvas or count(kwargs.pop("max_gen_toks"), "max_gen_toks")

        settings = {name: kwargs[name] for name in DECODING_GEN_KWARGS if name in kwargs}  # over the model args
        steps = settings.pop("steps", self.steps)
        if "temperature" in gen_kwargs or "do_sample" in gen_kwargs:  # the task's choice beats the model argument
            settings["temperature"] = float(kwargs.get("temperature", 0.0))
            if kwargs["do_sample"] and settings["temperature"] == 0:
                raise ValueError(f"gen_kwargs {gen_kwargs}: do_sample=True needs a temperature > 0")
        if settings.get("temperature", self.generation_config.temperature) == 0:
            settings.update(top_k=None, top_p=None)  # greedy: the model arguments' sampling filters do not apply
        config = decoding_config(self.generation_config, **settings)
        stops = end_of_turn_ids(self.tokenizer) or config.eos_token_id
        config.update(eos_token_id=stops, stop_at_eos=stops is not None and stops != [],
                      stop_strings=[stop for stop in until if stop] or None)
        return self._canvas_config(config, max_gen_toks, steps), until, max_gen_toks

    @staticmethod
    def _canvas_config(config: DiffusionGenerationConfig, max_gen_toks: int, steps: int | None):
        """`config` with a canvas for `max_gen_toks` tokens, whole blocks of its block length (one block when
        shorter), and `steps` denoising steps for it (None: one token per step)."""
        block = min(config.block_length, max_gen_toks)
        canvas = math.ceil(max_gen_toks / block) * block
        return decoding_config(config, max_new_tokens=canvas, block_length=block, steps=steps)

    def _left_padded(self, contexts: tuple[str, ...], canvas: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, P] prompt ids left-padded to the longest (cut from the left to fit `max_length` with the canvas)."""
        room = self.max_length - canvas
        if room < 1:
            raise ValueError(
                f"a {canvas}-token generation canvas leaves no room for the prompt in max_length={self.max_length}; "
                "lower max_gen_toks / max_new_tokens"
            )
        rows = []
        for context in contexts:
            ids = self.tok_encode(context) or [self.prefix_token_id]
            if len(ids) > room:
                self._warn_once("truncate-gen", f"prompts longer than {room} tokens are cut from the left")
                ids = ids[len(ids) - room :]
            rows.append(ids)
        pad = self.generation_config.pad_token_id
        pad = pad if pad is not None else self.eot_token_id or 0
        width = max(len(ids) for ids in rows)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=self.device)
        return input_ids, attention_mask

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


# A lazy "module:class" entry: the same name whether this file runs as `python -m` (module `__main__`) or is imported.
model_registry.register("llada_moe", target="modeling_llada_moe.apps.evaluation:LLaDAMoELM")


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with `llada_moe` registered; `argv` defaults to the process arguments."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
