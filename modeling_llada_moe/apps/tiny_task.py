"""A synthetic task and a seconds-long trainer, so CPU tests and benchmarks decode with a model that has learned.

Digit reversal: the prompt is 8 random digits (token ids 1..10), the answer the same digits reversed. A tiny
LLaDA-MoE trained on it for a few hundred masked-diffusion steps makes confident, context-dependent predictions,
which parallel decoding and the KV caches need to be exercised meaningfully.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM
from modeling_llada_moe.apps.inference import save_model_and_tokenizer


DIGITS = 8
MASK_ID, PAD_ID = 126, 120


def reversal_batch(size: int, generator: torch.Generator) -> torch.Tensor:
    """[size, 2 * DIGITS] rows of prompt digits followed by the reversed digits."""
    digits = torch.randint(1, 11, (size, DIGITS), generator=generator)
    return torch.cat([digits, digits.flip(1)], dim=1)


TINY_CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_hidden_layers=2,
    num_experts=8,
    num_experts_per_tok=2,
    expert_intermediate_size=32,
    dense_intermediate_size=96,
    max_position_embeddings=256,
    pad_token_id=PAD_ID,
    eos_token_id=PAD_ID,
    mask_token_id=MASK_ID,
)


def tiny_config(**overrides) -> LLaDAMoEConfig:
    """The tiny config of tests, demos and benchmarks (hidden 64, 2 layers, 8 experts, top-2); keywords override."""
    return LLaDAMoEConfig(**{**TINY_CONFIG, **overrides})


def tiny_model(seed: int = 0, **overrides) -> LLaDAMoEForMaskedLM:
    """A tiny random float32 model in eval mode, initialised from `torch.manual_seed(seed)`."""
    torch.manual_seed(seed)
    return LLaDAMoEForMaskedLM(tiny_config(**overrides)).eval()


def train_to_answer(
    model: LLaDAMoEForMaskedLM, batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]], steps: int,
    seed: int = 0, lr: float = 3e-3,
) -> LLaDAMoEForMaskedLM:
    """Masked-diffusion training of `model` on `batch(generator)` -> ([B, P] prompts, [B, A] answers): each step masks
    every answer token with probability t ~ U(0.05, 1) per row and minimises the cross-entropy of the masked tokens
    (the model's own `labels` loss). Returned in eval mode."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        prompts, answers = batch(generator)
        tokens = torch.cat([prompts, answers], dim=1)
        noise_level = torch.rand(len(tokens), 1, generator=generator).clamp(min=0.05)
        masked = torch.rand(tokens.shape, generator=generator) < noise_level
        masked[:, : prompts.shape[1]] = False
        loss = model(tokens.masked_fill(masked, MASK_ID), labels=tokens.masked_fill(~masked, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def train_reversal_model(steps: int = 600, seed: int = 0, **config_overrides) -> LLaDAMoEForMaskedLM:
    """A tiny LLaDA-MoE (hidden 64, 2 layers, 8 experts, top-2) trained on digit reversal with `train_to_answer`;
    returned in eval mode. 600 steps take about 20 s on 2 CPU cores and reach ~93% token accuracy under greedy
    decoding."""
    model = tiny_model(seed, **config_overrides)
    return train_to_answer(model, lambda generator: reversal_batch(64, generator).split(DIGITS, dim=1), steps, seed)


SEPARATOR = "t100"
CHAT_MARKERS = ("<role>", "</role>", "SYSTEM", "HUMAN", "ASSISTANT", "<|role_end|>")


def tiny_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over "t0".."t127" (pad = eos = "t120", mask = "t126"). With a chat template, the Ling
    chat markers take ids 110..115 so the vocabulary (and a tiny model) stay 128 wide."""
    vocab = {f"t{i}": i for i in range(128)}
    if chat_template is not None:
        vocab = {token: i for token, i in vocab.items() if not 110 <= i < 116}
        vocab.update({marker: 110 + j for j, marker in enumerate(CHAT_MARKERS)})
    backend = Tokenizer(WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = WhitespaceSplit()
    if chat_template is not None:
        backend.add_special_tokens(list(CHAT_MARKERS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t120", eos_token="t120", mask_token="t126")
    tokenizer.chat_template = chat_template
    return tokenizer


def reversal_examples(size: int, seed: int = 0, k: int = 4) -> list[dict[str, str]]:
    """Prompt-completion rows for `tiny_tokenizer`: "d1 .. dk t100" -> " dk .. d1" (digits are t1..t10)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        digits = [f"t{rng.randint(1, 10)}" for _ in range(k)]
        rows.append({"prompt": " ".join(digits) + f" {SEPARATOR}", "completion": " " + " ".join(digits[::-1])})
    return rows


# The Ling chat format of LLaDA-MoE-Instruct, for tiny tokenizers (the real tokenizer ships its own template).
LING_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<role>SYSTEM</role>{{ message['content'] }}<|role_end|>"
    "{%- elif message['role'] == 'user' -%}<role>HUMAN</role>{{ message['content'] }}<|role_end|>"
    "{%- elif message['role'] == 'assistant' -%}<role>ASSISTANT</role>{{ message['content'] }}<|role_end|>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<role>ASSISTANT</role>{%- endif -%}"
)


def save_tiny_folder(path, model: LLaDAMoEForMaskedLM | None = None, chat: bool = True, **generation_defaults):
    """Save a tiny model (random unless given) with `tiny_tokenizer` (Ling chat template when `chat`) as a Hub
    folder that the command line, the examples and the demos load like a real checkpoint; returns the path."""
    model = model if model is not None else tiny_model()
    for name, value in generation_defaults.items():
        setattr(model.generation_config, name, value)
    save_model_and_tokenizer(model, tiny_tokenizer(LING_CHAT_TEMPLATE if chat else None), path)
    return path


# Multi-digit addition: "a + b =" -> the digits of a + b, most significant first. Every answer digit depends on a
# carry chain from the digits to its right, so committing several answer tokens in one forward makes mistakes that
# one-token-per-step decoding avoids while the model is not fully trained: the task that separates decoding modes.
ADDEND_DIGITS = 4
PLUS = "t101"


def digit_token(digit: int) -> str:
    """The tiny tokenizer's token for a decimal digit: 0..9 -> "t1".."t10"."""
    return f"t{digit + 1}"


def addition_pairs(size: int, seed: int, digits: int = ADDEND_DIGITS) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(10**digits), rng.randrange(10**digits)) for _ in range(size)]


def addition_text(a: int, b: int, digits: int = ADDEND_DIGITS) -> tuple[str, str]:
    """("a digits + b digits =", " sum digits"): addends zero-padded to `digits`, the sum to `digits + 1`."""
    prompt = [digit_token(int(d)) for d in f"{a:0{digits}d}"] + [PLUS]
    prompt += [digit_token(int(d)) for d in f"{b:0{digits}d}"] + [SEPARATOR]
    return " ".join(prompt), " " + " ".join(digit_token(int(d)) for d in f"{a + b:0{digits + 1}d}")


def addition_examples(size: int, seed: int = 0, digits: int = ADDEND_DIGITS) -> list[dict[str, str]]:
    """Prompt-completion rows for `tiny_tokenizer` and `DiffusionSFTTrainer`."""
    pairs = addition_pairs(size, seed, digits)
    return [dict(zip(("prompt", "completion"), addition_text(a, b, digits))) for a, b in pairs]


def addition_batch(size: int, seed: int = 10_000, digits: int = ADDEND_DIGITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out ([size, 2 * digits + 2] prompt ids, [size, digits + 1] answer ids), tokenised like the training rows."""
    tokenizer = tiny_tokenizer()
    rows = [addition_text(a, b, digits) for a, b in addition_pairs(size, seed, digits)]
    prompts = torch.tensor([tokenizer.convert_tokens_to_ids(p.split()) for p, _ in rows])
    answers = torch.tensor([tokenizer.convert_tokens_to_ids(c.split()) for _, c in rows])
    return prompts, answers
