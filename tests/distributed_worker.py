"""The rank side of the 2-process tests (`tests/test_scale_out.py`), run as
`torchrun --nproc-per-node 2 tests/distributed_worker.py <job> <folder> <out>` on CPU (gloo).

Jobs:
- `ep`: load `<folder>` with `DistributedConfig(tp_size=2, ep_size=2)` (attention tensor-parallel, experts
  expert-parallel), through AutoEP and through the all-to-all token exchange; save each rank's logits,
  `diffusion_generate` tokens, expert and attention bytes and its first layer's expert weights to
  `<out>/ep-rank<r>.pt`.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers.distributed import DistributedConfig

from modeling_llada_moe import LLaDAMoEForMaskedLM


def local_bytes(model, fragment: str) -> int:
    total = 0
    for name, param in model.named_parameters():
        if fragment in name:
            tensor = param.to_local() if hasattr(param, "to_local") else param
            total += tensor.numel() * tensor.element_size()
    return total


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0  # a left-padded row
    return ids, attention_mask


def ep_job(folder: str, out: Path) -> None:
    ids, attention_mask = inputs()
    results = {}
    for name, config in {
        # Attention heads split over the 2 ranks, the experts split by expert; at inference transformers' AutoEP
        # masks the off-rank routes and all-reduces (every rank holds the same batch).
        "tp2_ep2": DistributedConfig(tp_size=2, ep_size=2),
        # The token-exchanging path training uses: each rank sends its half of the tokens to the expert owners.
        "tp2_ep2_all_to_all": DistributedConfig(tp_size=2, ep_size=2, ep_implementation="all_to_all"),
    }.items():
        model = LLaDAMoEForMaskedLM.from_pretrained(folder, distributed_config=config, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(ids, attention_mask=attention_mask).logits
            tokens = model.diffusion_generate(ids[:, :6], max_new_tokens=8, block_length=8, steps=8)
        experts = model.model.layers[0].mlp.experts
        results[name] = {
            "logits": logits,
            "tokens": tokens,
            "expert_bytes": local_bytes(model, "mlp.experts."),
            "attention_bytes": local_bytes(model, "self_attn."),
            "local_experts": experts.num_experts,
            "layer0_gate_up": experts.gate_up.weight.detach().clone(),
            "layer0_down": experts.down.weight.detach().clone(),
        }
    torch.save(results, out / f"ep-rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    job, folder, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    {"ep": ep_job}[job](folder, out)
    dist.barrier()
    dist.destroy_process_group()
