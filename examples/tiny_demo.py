"""Offline demo: build a tiny LLaDA-MoE, save it as a Hub folder, reload it with trust_remote_code, compare backends.

    python examples/tiny_demo.py [--out DIR]

Runs on CPU in seconds with no network. It prints the saved folder's files, the largest logit difference between
the model and its reload, and the forward time of each experts implementation next to the eager loop.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel

from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM


def tiny_config() -> LLaDAMoEConfig:
    return LLaDAMoEConfig(
        vocab_size=128,
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        num_experts=8,
        num_experts_per_tok=2,
        expert_intermediate_size=32,
        max_position_embeddings=256,
        pad_token_id=120,
        eos_token_id=120,
        mask_token_id=126,
    )


def median_ms(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="where to save the Hub folder (default: a temp dir)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = LLaDAMoEForMaskedLM(tiny_config()).eval()
    out = args.out or Path(tempfile.mkdtemp(prefix="llada_moe_demo_"))
    model.save_pretrained(out)
    print(f"saved Hub folder {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")

    reloaded = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    prompt = torch.randint(0, 120, (2, 24))
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0  # a left-padded row
    prompt[1, :5] = 120
    with torch.no_grad():
        reference = model(prompt, attention_mask=mask).logits
        diff = (reloaded(prompt, attention_mask=mask).logits - reference).abs().max().item()
    print(f"reloaded via AutoModel(trust_remote_code=True) as {type(reloaded).__module__}; max |logit diff| = {diff}")

    print(f"\n{'experts impl':<12} | {'forward ms':>10} | {'vs eager':>8} | {'max |diff|':>10}")
    eager_ms = None
    for impl in ("eager", "grouped_mm", "batched_mm"):
        model.set_experts_implementation(impl)
        with torch.no_grad():
            ms = median_ms(lambda: model(prompt, attention_mask=mask))
            impl_diff = (model(prompt, attention_mask=mask).logits - reference).abs().max().item()
        eager_ms = eager_ms or ms
        print(f"{impl:<12} | {ms:>10.2f} | {eager_ms / ms:>7.2f}x | {impl_diff:>10.2e}")


if __name__ == "__main__":
    main()
