"""An independent LLaDA reference sampler, written from shared/reference/decoding.md §2.1 (not from the package).

Semi-autoregressive blocks; per block an even step split with the remainder on the first steps; each step a full
forward of the whole canvas (a batched 2B forward for CFG, u + (s+1)(c-u) with the prompt masked in u); greedy
argmax proposals; confidence = softmax in the logits dtype gathered at the proposal (or U(0,1) for "random"); -inf
past the current block and on committed positions; per-row `topk` over the full row.
"""

import torch


def llada_reference_generate(
    model,
    prompt: torch.Tensor,
    gen_length: int,
    block_length: int,
    steps: int,
    mask_id: int,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    batch, prompt_len = prompt.shape
    x = torch.full((batch, prompt_len + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt_len] = prompt
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones(batch, gen_length, dtype=torch.long)], dim=1)
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks

    for block in range(num_blocks):
        block_start = prompt_len + block * block_length
        block_end = block_start + block_length
        block_masks = (x[:, block_start:block_end] == mask_id).sum(dim=1)
        quotas = torch.zeros(batch, steps_per_block, dtype=torch.long)
        for row in range(batch):
            quotas[row] = block_masks[row] // steps_per_block
            quotas[row, : int(block_masks[row] % steps_per_block)] += 1
        for step in range(steps_per_block):
            is_mask = x == mask_id
            with torch.no_grad():
                if cfg_scale > 0:
                    unconditional = x.clone()
                    unconditional[prompt_index] = mask_id
                    both = torch.cat([x, unconditional])
                    mask2 = None if attention_mask is None else torch.cat([attention_mask, attention_mask])
                    logits = model(both, attention_mask=mask2).logits
                    cond, uncond = torch.chunk(logits, 2, dim=0)
                    logits = uncond + (cfg_scale + 1) * (cond - uncond)
                else:
                    logits = model(x, attention_mask=attention_mask).logits
            proposal = torch.argmax(logits, dim=-1)
            if remasking == "low_confidence":
                probs = torch.softmax(logits, dim=-1)
                score = torch.squeeze(torch.gather(probs, -1, torch.unsqueeze(proposal, -1)), -1)
            else:
                score = torch.rand((batch, x.shape[1]), generator=generator)
            score[:, block_end:] = -float("inf")
            proposal = torch.where(is_mask, proposal, x)
            score = torch.where(is_mask, score, torch.tensor(-float("inf"), dtype=score.dtype))
            transfer = torch.zeros_like(proposal, dtype=torch.bool)
            for row in range(batch):
                _, chosen = torch.topk(score[row], k=int(quotas[row, step]))
                transfer[row, chosen] = True
            x[transfer] = proposal[transfer]
    return x
