"""The checks `diffusion_generate` and `diffusion_loglikelihood` run on their inputs before any forward: the prompt
and its attention mask, the token ids of the config against the model's vocabulary, the hooks. Each names the bad
argument and its value: `TypeError` for a wrong type, `ValueError` for a wrong value."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .validators import is_finite, is_int, is_number


@dataclass
class SpecialTokens:
    """The token ids a generation uses, resolved from the call's config and the model's: the mask token, the pad
    token that fills a stopped row's tail (the first EOS when no pad is set), the EOS ids `stop_at_eos` looks for."""

    mask: int
    pad: int | None
    eos: list[int]


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
        if ids.device.type == "meta":
            raise ValueError(f"diffusion_loglikelihood: {name} is on the meta device (no values); give real ids")
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
        outside = next((item for item in ids if not 0 <= item < vocab_size), None)
        if outside is not None:  # before the tensor: ids past int64 would overflow there
            raise ValueError(
                f"diffusion_loglikelihood: {name} holds token id {outside}, outside the vocabulary [0, {vocab_size})"
            )
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




def check_prompt_ids(input_ids) -> None:
    """The prompt is a non-empty [batch, prompt] integer tensor."""
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
    if input_ids.device.type == "meta":
        raise ValueError("diffusion_generate: input_ids is on the meta device (it holds no values); give real ids")
    if input_ids.shape[1] == 0:
        raise ValueError("diffusion_generate: the prompt is empty (input_ids has 0 columns); give >= 1 token")
    if input_ids.shape[0] == 0:
        raise ValueError("diffusion_generate: input_ids has 0 rows; give at least one prompt")


def check_prompt_tokens(input_ids: torch.Tensor, mask_id, vocab: int) -> None:
    """The mask token and every prompt token lie in the vocabulary, and the prompt holds no mask token."""
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


def check_suppressed_tokens(config, mask_id: int, vocab: int) -> None:
    """`suppress_tokens` and `confidence_suppress_tokens` lie in the vocabulary and leave tokens to propose and to
    rank."""
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


def special_tokens(config, model_config, mask_id: int, tokenizer) -> SpecialTokens:
    """The pad and EOS ids of the call (the config's, else the model's), checked against the vocabulary and against
    what stopping needs."""
    vocab = model_config.vocab_size
    pad_id = config.pad_token_id if config.pad_token_id is not None else model_config.pad_token_id
    eos = config.eos_token_id if config.eos_token_id is not None else model_config.eos_token_id
    eos_ids = [] if eos is None else [eos] if is_int(eos) else list(eos)
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
    return SpecialTokens(mask=mask_id, pad=pad_id, eos=eos_ids)


def check_attention_mask(attention_mask, input_ids: torch.Tensor) -> torch.Tensor:
    """The prompt's attention mask as a long tensor of 0 (left padding) and 1 (token), all ones when None."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"diffusion_generate: attention_mask must be a tensor of 0/1 like input_ids, got "
            f"{type(attention_mask).__name__}"
        )
    if attention_mask.device.type == "meta":
        raise ValueError("diffusion_generate: attention_mask is on the meta device (it holds no values)")
    if attention_mask.dtype.is_complex:
        raise TypeError(f"diffusion_generate: attention_mask has dtype {attention_mask.dtype}; expected 0/1 integers")
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
    return attention_mask


def check_loglikelihood_settings(mc_samples, batch_size, cfg_scale, generator) -> None:
    """The types of `diffusion_loglikelihood`'s settings, and a finite `cfg_scale` >= 0."""
    for name, value in (("mc_samples", mc_samples), ("batch_size", batch_size)):
        if not is_int(value):
            raise TypeError(f"diffusion_loglikelihood: {name}={value!r}; expected a positive integer")
    if not is_number(cfg_scale):
        raise TypeError(f"diffusion_loglikelihood: cfg_scale={cfg_scale!r}; expected a finite float >= 0")
    if not is_finite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"diffusion_loglikelihood: cfg_scale={cfg_scale!r}; expected a finite float >= 0")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"diffusion_loglikelihood: generator={generator!r}; expected a torch.Generator or None")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"diffusion_loglikelihood: generator is on {generator.device}; expected a CPU torch.Generator (the masks "
            "are drawn on the CPU, then moved to the model's device)"
        )


def check_token_type_ids(token_type_ids, input_ids: torch.Tensor) -> None:
    """A tokenizer's `token_type_ids` are accepted when all zero (the model has no token types): a tensor of the
    prompt's shape."""
    if token_type_ids is None:
        return
    if not isinstance(token_type_ids, torch.Tensor):
        raise TypeError(
            f"diffusion_generate: token_type_ids is a {type(token_type_ids).__name__}; expected None or an all-zero "
            "integer tensor like input_ids (LLaDA-MoE has no token types)"
        )
    if token_type_ids.shape != input_ids.shape or token_type_ids.device.type == "meta":
        raise ValueError(
            f"diffusion_generate: token_type_ids has shape {tuple(token_type_ids.shape)} on "
            f"{token_type_ids.device}; expected the shape of input_ids {tuple(input_ids.shape)}, all zero"
        )
    if token_type_ids.any():
        raise ValueError(
            "diffusion_generate: token_type_ids has non-zero entries; LLaDA-MoE has no token types (pass "
            "input_ids and attention_mask only)"
        )


def check_generation_hooks(streamer, generator, tokenizer, config) -> None:
    """The objects `diffusion_generate` calls into: a streamer with `put` and `end`, a `torch.Generator`, a tokenizer
    with `decode` when `stop_strings` need one."""
    if streamer is not None:
        missing = [name for name in ("put", "end") if not callable(getattr(streamer, name, None))]
        if missing:
            raise TypeError(
                f"diffusion_generate: streamer={streamer!r} has no {' / '.join(missing)}() method; expected a "
                "transformers BaseStreamer (put and end, optionally put_draft)"
            )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"diffusion_generate: generator={generator!r}; expected a torch.Generator or None (e.g. "
            "torch.Generator().manual_seed(0))"
        )
    if config.stop_strings and tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(
            f"diffusion_generate: tokenizer={tokenizer!r} has no decode(); stop_strings need a transformers tokenizer"
        )


def check_cfg_scale_fits(surface: str, cfg_scale: float, dtype: torch.dtype) -> None:
    """The guidance `(cfg_scale + 1) * (cond - uncond)` is computed in the logits dtype: a `cfg_scale` past its largest
    value makes every guided logit infinite."""
    largest = torch.finfo(dtype if dtype.is_floating_point else torch.float32).max
    if cfg_scale + 1 > largest:
        raise ValueError(
            f"{surface}: cfg_scale={cfg_scale!r} exceeds the largest {dtype} value ({largest:.3g}): the guided logits "
            "(cfg_scale + 1) * (cond - uncond) would all be infinite; use a value far below it (typically 0-5)"
        )
