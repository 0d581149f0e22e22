"""A synthetic task and a seconds-long trainer, so CPU tests and benchmarks decode with a model that has learned.

Digit reversal: the prompt is 8 random digits (token ids 1..10), the answer the same digits reversed. A tiny
LLaDA-MoE trained on it for a few hundred masked-diffusion steps makes confident, context-dependent predictions,
which parallel decoding and the KV caches need to be exercised meaningfully.
"""

from __future__ import annotations

import torch

from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM


DIGITS = 8
MASK_ID, PAD_ID = 126, 120


def reversal_batch(size: int, generator: torch.Generator) -> torch.Tensor:
    """[size, 2 * DIGITS] rows of prompt digits followed by the reversed digits."""
    digits = torch.randint(1, 11, (size, DIGITS), generator=generator)
    return torch.cat([digits, digits.flip(1)], dim=1)


def train_reversal_model(steps: int = 600, seed: int = 0, **config_overrides) -> LLaDAMoEForMaskedLM:
    """A tiny LLaDA-MoE (hidden 64, 2 layers, 8 experts, top-2) trained on digit reversal; returned in eval mode.

    Each step masks every answer token with probability t ~ U(0.05, 1) and minimises the cross-entropy of the
    masked tokens (the model's own `labels` loss). 600 steps take about 20 s on 2 CPU cores and reach ~93%
    token accuracy under greedy decoding.
    """
    torch.manual_seed(seed)
    config = LLaDAMoEConfig(
        **{
            "vocab_size": 128,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "expert_intermediate_size": 32,
            "max_position_embeddings": 256,
            "pad_token_id": PAD_ID,
            "eos_token_id": PAD_ID,
            "mask_token_id": MASK_ID,
            **config_overrides,
        }
    )
    model = LLaDAMoEForMaskedLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = reversal_batch(64, generator)
        noise_level = torch.rand(64, 1, generator=generator).clamp(min=0.05)
        masked = torch.rand(tokens.shape, generator=generator) < noise_level
        masked[:, :DIGITS] = False
        loss = model(tokens.masked_fill(masked, MASK_ID), labels=tokens.masked_fill(~masked, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
