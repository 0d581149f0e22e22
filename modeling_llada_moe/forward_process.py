"""The masked-diffusion forward process: how many target tokens to mask, which ones, and the ELBO they give.

One module for every user: `diffusion_loglikelihood` (lm-eval), and the SFT / VRPO trainers in `trl_ext`, which
import it from here (saved Hub folders carry only this package, so it cannot live in `trl_ext`).
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F


TIME_EPSILON = 1e-3  # LLaDA: p_mask = (1 - eps) * t + eps keeps the 1/t weight finite


def sample_noise_levels(
    batch: int,
    generator: torch.Generator | None = None,
    eps: float = TIME_EPSILON,
    stratified: bool = False,
    device=None,
) -> torch.Tensor:
    """One masking probability per row: (1 - eps) * u + eps with u ~ U(0, 1), i.i.d. as in LLaDA, or stratified
    (u_i = (u_0 + i / batch) mod 1: each u_i is still uniform, the batch covers [0, 1) evenly). Returns [batch]."""
    if stratified:
        u = (torch.rand((), generator=generator) + torch.arange(batch) / batch) % 1.0
    else:
        u = torch.rand(batch, generator=generator)
    return ((1 - eps) * u + eps).to(device)


def bernoulli_mask(
    input_ids: torch.Tensor,
    supervised: torch.Tensor,
    noise_levels: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each supervised position of row i independently with probability `noise_levels[i]` (the paper's forward
    process; the prompt is never masked). Returns (noisy_ids, masked)."""
    draws = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    masked = (draws < noise_levels[:, None].to(draws.device)) & supervised
    return input_ids.masked_fill(masked, mask_token_id), masked


def uniform_mask_counts(lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per row, a number of positions to mask drawn uniformly from {1..lengths[i]} (LLaDA's count form)."""
    u = torch.rand(lengths.shape, generator=generator).to(lengths.device)
    return (u * lengths).floor().long().clamp(max=lengths - 1) + 1


def example_generator(seed: int, *sequences) -> torch.Generator:
    """A CPU generator seeded from `seed` and the token ids of an example, so its masks can be drawn again."""
    digest = hashlib.sha256(str(seed).encode())
    for sequence in sequences:
        values = sequence.tolist() if isinstance(sequence, torch.Tensor) else list(sequence)
        digest.update(b"|" + ",".join(map(str, values)).encode())
    return torch.Generator().manual_seed(int.from_bytes(digest.digest()[:8], "little") & (2**63 - 1))


def stratified_mask_counts(
    target_length: int, num_samples: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """LLaDA's stratified masked-token counts for `num_samples` copies of one target of `target_length` tokens.

    k ~ U{1..L}; counts = round(linspace(k, k + (n-1) L / n, n)) wrapped into [1, L], so the copies cover the noise
    levels evenly. Returns a LongTensor [num_samples].
    """
    if target_length < 1:
        raise ValueError(f"target_length={target_length}: the target must have at least one token")
    start = torch.randint(1, target_length + 1, (1,), generator=generator).item()
    counts = torch.linspace(start, start + (num_samples - 1) * target_length / num_samples, num_samples)
    counts = counts.round().long()
    return ((counts - 1) % target_length + 1).to(device)


def mask_target_positions(
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    counts: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace `counts[i]` uniformly chosen target positions of row i with the mask token.

    `input_ids` [N, T]; `target_mask` [N, T] bool marks the positions that may be masked (never the prompt);
    `counts` [N]. Returns (noisy_ids, masked) where `masked` [N, T] is the bool mask of replaced positions.
    """
    scores = torch.rand(input_ids.shape, generator=generator, dtype=torch.float32).to(input_ids.device)
    scores = scores.masked_fill(~target_mask, float("inf"))
    ranks = scores.argsort(dim=-1).argsort(dim=-1)
    masked = (ranks < counts[:, None]) & target_mask
    return input_ids.masked_fill(masked, mask_token_id), masked


def masked_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Per-row sum of the cross-entropy of the masked positions: [N] float32.

    `logits` is [N, T, V], or [M, V] for the masked positions only (row-major order, as the model returns with
    `logits_to_keep=masked`), which avoids materialising logits for every position of a 157k vocabulary.
    """
    if logits.dim() == 2:
        nll = F.cross_entropy(logits.float(), input_ids[masked], reduction="none")
        return torch.zeros(masked.shape, dtype=nll.dtype, device=nll.device).masked_scatter(masked, nll).sum(dim=-1)
    nll = F.cross_entropy(logits.float().transpose(1, 2), input_ids, reduction="none")
    return (nll * masked).sum(dim=-1)


def time_weighted_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor, noise_levels: torch.Tensor
) -> torch.Tensor:
    """The paper's per-row ELBO term: masked cross-entropy divided by the row's masking probability. [N] float32."""
    return masked_token_nll(logits, input_ids, masked) / noise_levels.float()


def elbo_weighted_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor, target_lengths: torch.Tensor
) -> torch.Tensor:
    """LLaDA's per-row ELBO term: masked cross-entropy weighted by 1/t, with t = masked count / target length.

    An unbiased estimate of -log p(target | prompt) (an upper bound in expectation). Returns [N] float32.
    """
    counts = masked.sum(dim=-1).clamp(min=1).float()
    return masked_token_nll(logits, input_ids, masked) * target_lengths.float() / counts
