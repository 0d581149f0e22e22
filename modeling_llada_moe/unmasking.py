"""The unmasking rules of `diffusion_generate`: what each masked position proposes, how sure it is, and which
positions a denoising step commits.

The loop asks two small objects, both chosen once per call from the config:

- an `UnmaskingPolicy` (`unmasking_policy`): which masked positions of the block a step commits. `QuotaPolicy` is the
  LLaDA reference (a fixed number per step, the best of the whole row); `ThresholdPolicy` (Fast-dLLM),
  `HierarchyPolicy` (dInfer) and `FactorPolicy` (Fast-dLLM) commit as many as their rule allows and run until the
  block is filled; `CreditPolicy` (CreditDecoding) wraps any of them and lifts the logits of predictions that stay
  the same over steps;
- an `InputSmoothing` (`input_smoothing`): how a forward's inputs carry what earlier forwards predicted. `NoSmoothing`
  feeds the token ids; `IterationSmoothing` (dInfer's `cont_weight`) adds the expected embedding of each masked
  position's last prediction to its mask embedding.

The rules themselves are plain functions on tensors (`select_by_quota`, `select_by_threshold`, `select_by_factor`,
`select_by_hierarchy`, `fuse_credit`, `propose_tokens`, `confidence`), usable on their own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


# Forwards per block in threshold / factor decoding: the block length (one commit per forward at least) plus this.
FORWARD_CAP_MARGIN = 2


def exclude_mask_token(
    logits: torch.Tensor, mask_id: int, lo: int, hi: int, config, processed: bool = False
) -> torch.Tensor:
    """`logits` [B, W, V] with the mask token's logit at -inf, so it is never proposed. (Confidences still come from
    the model's whole distribution, mask token included, as in the LLaDA reference: its rankings stay token-exact.)

    Checks the columns [lo, hi) (the current block) with one reduction: NaN or +inf logits (`processed`: a
    `logits_processor` acted on them) raise a `ValueError` naming the likely cause instead of decoding garbage, and so
    does a position where no token is left (every logit -inf, e.g. from a `logits_processor`)."""
    logits = logits.clone()
    logits[..., mask_id] = float("-inf")
    top = logits[:, lo:hi].amax(dim=-1)  # NaN where a position holds a NaN, +inf / -inf where its best logit is
    if not torch.isfinite(top).all():
        if torch.isneginf(top).any() and not (torch.isnan(top) | torch.isposinf(top)).any():
            raise ValueError(
                "diffusion_generate: a position has no token left to propose (every logit is -inf after the mask "
                "token, suppress_tokens and the logits_processor are applied)"
            )
        raise ValueError(non_finite_message("diffusion_generate", "logits", config, processed))
    return logits


def non_finite_message(surface: str, what: str, config, processed: bool = False) -> str:
    """Why a forward's values are not finite, naming the settings that can make them so (for `surface`'s error)."""
    causes = []
    cfg_scale = getattr(config, "cfg_scale", 0.0)
    if cfg_scale:
        causes.append(f"cfg_scale={cfg_scale!r} (the guidance (cfg_scale + 1) * (cond - uncond) overflows: lower it)")
    if processed:
        causes.append("a logits_processor (it returned NaN or +inf)")
    if getattr(config, "credit_alpha", None) is not None:
        causes.append(f"credit_alpha={config.credit_alpha!r}")
    causes.append(
        "the model's weights or config (its forward returned non-finite logits: check the dtype and fields such as "
        "rope_theta, rope_scaling, routed_scaling_factor)"
    )
    return (
        f"{surface}: the {what} hold NaN or +inf, so nothing can be decoded from them; likely cause: "
        + "; or ".join(causes)
        + " (remove_invalid_values=True replaces them, as in transformers)"
        * (surface == "diffusion_generate")
    )


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
    values = logits.exp() / gumbel**temperature
    proposal = values.argmax(dim=-1)
    chosen = logits.gather(-1, proposal[..., None]).squeeze(-1)
    picked = values.gather(-1, proposal[..., None]).squeeze(-1)
    # exp under/overflow (extreme logits or temperature): the pick was an excluded token, or a tie of infinities or
    # of zeros that argmax breaks by position
    stray = torch.isneginf(chosen) | ~torch.isfinite(picked) | (picked == 0)
    if stray.any():  # the same draw in log space: log(exp(l) / g^T) = l - T log g (divided by T when T >= 1, so
        # neither term overflows), excluded tokens kept at -inf
        keys = logits / temperature - gumbel.log() if temperature >= 1 else logits - temperature * gumbel.log()
        keys = keys.masked_fill(torch.isneginf(logits), float("-inf"))
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

class UnmaskingPolicy(ABC):
    """Which masked positions of the block a denoising step commits; one object per `diffusion_generate` call.

    `fills_block`: False = the reference schedule (the block's `steps` forwards, every row in each); True = run until
    the block is filled (a row whose block is final leaves the forwards, and the block's last allowed forward commits
    every position left)."""

    fills_block = False

    def start_block(self, masked: torch.Tensor, steps: int) -> None:  # noqa: B027 (a hook: most rules keep no state)
        """Called before the block's first step with its masked positions [rows, length] and its number of steps."""

    def keep_rows(self, keep: torch.Tensor) -> None:  # noqa: B027
        """Only the rows `keep` go on decoding the block (the others are final): keep their state only."""

    @abstractmethod
    def block_done(self, step: int, still_masked: torch.Tensor) -> bool:
        """Whether the block is decoded before its `step`-th forward (`still_masked` [rows]: the row's block holds
        masks)."""

    def adjust_logits(self, logits: torch.Tensor, columns: tuple[int, int], masked: torch.Tensor) -> torch.Tensor:
        """The step's logits [rows, window, vocab] as proposals and confidences see them: `columns` are the block's
        columns in them, `masked` [rows, length] the block's masked positions. Unchanged unless a rule says so."""
        return logits

    @abstractmethod
    def select(self, scores: torch.Tensor, candidates: torch.Tensor, step: int, forwards: int) -> torch.Tensor:
        """[rows, canvas] bool: the positions the `step`-th forward of the block (the `forwards`-th of the call)
        commits, among `candidates` (the block's masked positions), given their `scores` (-inf elsewhere)."""


class QuotaPolicy(UnmaskingPolicy):
    """The LLaDA reference: the block's masked positions split evenly over its steps (`transfer_schedule`), each step
    committing its quota of the row's best positions (`select_by_quota`)."""

    def start_block(self, masked: torch.Tensor, steps: int) -> None:
        self.steps = steps
        self.quota = transfer_schedule(masked.sum(dim=1), steps)

    def keep_rows(self, keep: torch.Tensor) -> None:
        self.quota = self.quota[keep]

    def block_done(self, step: int, still_masked: torch.Tensor) -> bool:
        return step >= self.steps

    def select(self, scores: torch.Tensor, candidates: torch.Tensor, step: int, forwards: int) -> torch.Tensor:
        return select_by_quota(scores, self.quota[:, step])


class ParallelPolicy(UnmaskingPolicy):
    """A rule that commits as many positions as it allows (at least one per row), until the block is filled. Such a
    rule fills a block in at most its length forwards; the cap of length + `FORWARD_CAP_MARGIN` is a guard: its last
    forward commits every position left, the rule ignored."""

    fills_block = True

    def start_block(self, masked: torch.Tensor, steps: int) -> None:
        self.max_forwards = masked.shape[1] + FORWARD_CAP_MARGIN

    def block_done(self, step: int, still_masked: torch.Tensor) -> bool:
        return not still_masked.any()

    def select(self, scores: torch.Tensor, candidates: torch.Tensor, step: int, forwards: int) -> torch.Tensor:
        if step + 1 >= self.max_forwards:
            return candidates
        return self.rule(scores, candidates, forwards)

    @abstractmethod
    def rule(self, scores: torch.Tensor, candidates: torch.Tensor, forwards: int) -> torch.Tensor:
        """The positions the rule commits at the call's `forwards`-th forward."""


class ThresholdPolicy(ParallelPolicy):
    """Fast-dLLM's threshold rule (`select_by_threshold`); with `decay`, the threshold of the call's `n`-th forward is
    `max(1 - decay * n, threshold)` (dInfer's threshold decay)."""

    def __init__(self, threshold: float, decay: float | None = None):
        self.threshold, self.decay = threshold, decay

    def threshold_at(self, forwards: int) -> float:
        if self.decay is None:
            return self.threshold
        return max(1.0 - self.decay * forwards, self.threshold)

    def rule(self, scores: torch.Tensor, candidates: torch.Tensor, forwards: int) -> torch.Tensor:
        return select_by_threshold(scores, candidates, self.threshold_at(forwards))


class HierarchyPolicy(ThresholdPolicy):
    """dInfer's hierarchical rule (`select_by_hierarchy`): the threshold rule plus the best of every run of adjacent
    masked positions above `low_threshold` (the high threshold decays as in `ThresholdPolicy`; the low one stays)."""

    def __init__(self, threshold: float, low_threshold: float, decay: float | None = None):
        super().__init__(threshold, decay)
        self.low_threshold = low_threshold

    def rule(self, scores: torch.Tensor, candidates: torch.Tensor, forwards: int) -> torch.Tensor:
        return select_by_hierarchy(scores, candidates, self.threshold_at(forwards), self.low_threshold)


class FactorPolicy(ParallelPolicy):
    """Fast-dLLM's factor rule (`select_by_factor`)."""

    def __init__(self, factor: float, rule: str = "prefix"):
        self.factor, self.factor_rule = factor, rule

    def rule(self, scores: torch.Tensor, candidates: torch.Tensor, forwards: int) -> torch.Tensor:
        return select_by_factor(scores, candidates, self.factor, self.factor_rule)


class CreditPolicy(UnmaskingPolicy):
    """Credit decoding (`fuse_credit`) over another policy, which picks the positions: every step lifts the logits of
    the block's masked positions by their accumulated credit. Credits start at zero in every block."""

    def __init__(self, inner: UnmaskingPolicy, mask_id: int, alpha: float, decay: float, boost: float):
        self.inner, self.mask_id = inner, mask_id
        self.alpha, self.decay, self.boost = alpha, decay, boost
        self.fills_block = inner.fills_block
        self.credit: torch.Tensor | None = None

    def start_block(self, masked: torch.Tensor, steps: int) -> None:
        self.inner.start_block(masked, steps)
        self.credit = None

    def keep_rows(self, keep: torch.Tensor) -> None:
        self.inner.keep_rows(keep)
        self.credit = self.credit[keep] if self.credit is not None else None

    def block_done(self, step: int, still_masked: torch.Tensor) -> bool:
        return self.inner.block_done(step, still_masked)

    def adjust_logits(self, logits: torch.Tensor, columns: tuple[int, int], masked: torch.Tensor) -> torch.Tensor:
        lo, hi = columns
        fused, self.credit = fuse_credit(
            logits[:, lo:hi], self.credit, masked, self.mask_id, self.alpha, self.decay, self.boost
        )
        return torch.cat([logits[:, :lo], fused, logits[:, hi:]], dim=1)

    def select(self, scores: torch.Tensor, candidates: torch.Tensor, step: int, forwards: int) -> torch.Tensor:
        return self.inner.select(scores, candidates, step, forwards)


def unmasking_policy(config, mask_id: int) -> UnmaskingPolicy:
    """The policy a `DiffusionGenerationConfig` asks for: hierarchy (`low_threshold`), threshold, factor or the
    reference quota, under credit decoding when `credit_alpha` is set."""
    if config.low_threshold is not None:
        policy = HierarchyPolicy(config.threshold, config.low_threshold, config.threshold_decay)
    elif config.threshold is not None:
        policy = ThresholdPolicy(config.threshold, config.threshold_decay)
    elif config.factor is not None:
        policy = FactorPolicy(config.factor, config.factor_rule)
    else:
        policy = QuotaPolicy()
    if config.credit_alpha is not None:
        policy = CreditPolicy(policy, mask_id, config.credit_alpha, config.credit_decay, config.credit_boost)
    return policy


class InputSmoothing(ABC):
    """How a forward's inputs carry what earlier forwards predicted: an input-embedding transform.

    `widens_window`: the forward's logits must cover every column it computes after the block start (not the block
    only), for `observe` to see them."""

    widens_window = False

    @abstractmethod
    def inputs_embeds(self, ids: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor | None:
        """The input embeddings of `ids` [copies * rows, width], the canvas columns from `start` of the canvas rows
        `rows` (with CFG, the conditional copy then the unconditional one); None = feed the ids."""

    @abstractmethod
    def observe(
        self, logits: torch.Tensor, window: tuple[int, int], block: tuple[int, int], rows: torch.Tensor, forwards: int
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Learn from the `forwards`-th forward's `logits` of the canvas columns `window` of `rows`; returns the
        logits and window the step decodes from (the block's `[start, end)` at least)."""


class NoSmoothing(InputSmoothing):
    """The plain model: its inputs are the canvas's token ids."""

    def inputs_embeds(self, ids: torch.Tensor, rows: torch.Tensor, start: int) -> None:
        return None

    def observe(
        self, logits: torch.Tensor, window: tuple[int, int], block: tuple[int, int], rows: torch.Tensor, forwards: int
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        return logits, window


class IterationSmoothing(InputSmoothing):
    """dInfer's iteration smoothing (`cont_weight`): a still-masked position's input is the mask token's embedding
    plus `w * softmax(logits) @ embedding matrix` of the last forward that computed it, `w = min(init + growth * n,
    cap)` at the call's `n`-th forward. Holds one [rows, canvas, hidden] tensor (zero: no prediction yet)."""

    widens_window = True

    def __init__(self, embeddings: nn.Embedding, canvas_shape: torch.Size, mask_id: int, schedule: tuple):
        weight = embeddings.weight
        self.embeddings, self.mask_id = embeddings, mask_id
        self.init, self.growth, self.cap = schedule
        self.expected = torch.zeros((*canvas_shape, weight.shape[1]), dtype=weight.dtype, device=weight.device)

    def inputs_embeds(self, ids: torch.Tensor, rows: torch.Tensor, start: int) -> torch.Tensor:
        extra = self.expected[rows][:, start : start + ids.shape[1]].repeat(ids.shape[0] // rows.numel(), 1, 1)
        embeds = self.embeddings(ids)
        return embeds + torch.where((ids == self.mask_id)[..., None], extra.to(embeds.dtype), 0)

    def observe(
        self, logits: torch.Tensor, window: tuple[int, int], block: tuple[int, int], rows: torch.Tensor, forwards: int
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Store the weighted expected embedding of the columns from the block start on; decode the block's own
        columns only (a CFG copy's masked prompt keeps its plain mask)."""
        start, end = block
        lo, hi = start - window[0], end - window[0]
        weight = min(self.init + self.growth * forwards, self.cap)
        matrix = self.embeddings.weight
        probabilities = torch.softmax(logits[:, lo:].float(), dim=-1).to(matrix.dtype)
        self.expected[rows, start : window[1]] = weight * (probabilities @ matrix)
        return logits[:, lo:hi], (start, end)


def input_smoothing(config, embeddings: nn.Embedding, canvas_shape: torch.Size, mask_id: int) -> InputSmoothing:
    """The smoothing a `DiffusionGenerationConfig` asks for: `IterationSmoothing` with `cont_weight`, else none."""
    if config.cont_weight is None:
        return NoSmoothing()
    schedule = (config.cont_weight_init, config.cont_weight_growth, config.cont_weight)
    return IterationSmoothing(embeddings, canvas_shape, mask_id, schedule)
