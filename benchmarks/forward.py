"""Forward latency and peak memory of one LLaDA-MoE forward for each experts implementation.

Default: one 7B-shaped decoder layer (H 2048, 16 heads, 64 experts, top-8, expert width 1024) with random weights, at
several token counts. `--full-model` builds the whole random 7B-A1B model (needs a GPU with >= 20 GB). Prints a table:
median time of `--repeats` runs after a warm-up, the ratio against the eager per-expert loop measured in the same run,
and the peak memory one forward adds (CUDA allocator peak on GPU, sampled process RSS on CPU).

    python benchmarks/forward.py                      # CPU, bf16, tokens 32 256 1024
    python benchmarks/forward.py --device cuda --tokens 32 256 2048 16384
    python benchmarks/forward.py --device cuda --full-model --tokens 256 2048
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import torch

from modeling_llada_moe import LLaDAMoEConfig, LLaDAMoEForMaskedLM
from modeling_llada_moe.modeling_llada_moe import LLaDAMoEDecoderLayer, LLaDAMoERotaryEmbedding


IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


class PeakMemory:
    """Peak extra memory of the enclosed block: the CUDA allocator's peak, or process RSS sampled every 1 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self.running = True
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.sampler.join()
            self.peak = max(self.peak, self._rss() - self.base)


def time_call(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def batched_mm_bytes(config: LLaDAMoEConfig, tokens: int, dtype: torch.dtype) -> int:
    # batched_mm gathers one [2I, H] + [H, I] weight copy per token-slot.
    slots = tokens * config.num_experts_per_tok
    return slots * 3 * config.expert_intermediate_size * config.hidden_size * torch.finfo(dtype).bits // 8


def build(args, config: LLaDAMoEConfig, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    with torch.device(device):
        if args.full_model:
            model = LLaDAMoEForMaskedLM(config).to(dtype).eval()
            return model, lambda x, pos: model(inputs_embeds=x, position_ids=pos).logits
        layer = LLaDAMoEDecoderLayer(config, 0).to(dtype).eval()
        for param in layer.parameters():
            torch.nn.init.normal_(param, std=0.02)
        layer.mlp.gate.weight.data = layer.mlp.gate.weight.data.float()
        rotary = LLaDAMoERotaryEmbedding(config)
    return layer, lambda x, pos: layer(x, position_embeddings=rotary(x, pos))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full-model", action="store_true", help="the whole 7B-A1B model instead of one layer")
    parser.add_argument("--batched-mm-limit-gb", type=float, default=4.0, help="skip batched_mm above this gather")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # Serve tensors above 64 KiB from mmap so freeing returns them to the OS and RSS shows each forward's peak.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    config = LLaDAMoEConfig()
    config._attn_implementation = "sdpa"
    module, forward = build(args, config, device, dtype)
    what = "full 7B-A1B model" if args.full_model else "one 7B-shaped layer (H 2048, E 64, top-8, I 1024)"
    print(f"# forward of {what}, {args.dtype}, {device}, median of {args.repeats} runs")
    print(f"{'tokens':>7} | {'experts impl':<12} | {'median ms':>10} | {'vs eager':>8} | {'peak extra MiB':>14}")
    print("-" * 64)
    for tokens in args.tokens:
        x = torch.randn(1, tokens, config.hidden_size, device=device, dtype=dtype)
        if args.full_model:
            x = x * 0.02
        pos = torch.arange(tokens, device=device)[None]
        eager_ms = None
        for impl in IMPLEMENTATIONS:
            if impl == "batched_mm" and batched_mm_bytes(config, tokens, dtype) > args.batched_mm_limit_gb * 2**30:
                gb = batched_mm_bytes(config, tokens, dtype) / 2**30
                print(f"{tokens:>7} | {impl:<12} | {'skipped':>10} | {'':>8} | gather {gb:.1f} GiB > limit")
                continue
            config._experts_implementation = impl
            with torch.no_grad():
                times = time_call(lambda x=x, pos=pos: forward(x, pos), device, args.repeats)
                with PeakMemory(device) as peak:
                    forward(x, pos)
            ms = statistics.median(times) * 1e3
            eager_ms = eager_ms or ms
            print(f"{tokens:>7} | {impl:<12} | {ms:>10.2f} | {eager_ms / ms:>7.2f}x | {peak.peak / 2**20:>14.1f}")


if __name__ == "__main__":
    main()
