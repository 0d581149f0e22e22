"""Dense copies of quantized experts, kept for the length of one `diffusion_generate` call within a byte budget.

A 4-bit or 8-bit expert is dequantized before its matmul. On CPU that costs more than the matmul itself for the few
tokens of a decoding step (each of 64 experts sees about `tokens * 8 / 64` of them), and a generation runs many steps
over the same weights. So while a generation runs, the experts module keeps the dense weights of each expert it has
dequantized, until the budget is spent (experts past it are dequantized at every use, as without a cache); the
copies are dropped when the generation returns. The budget (`LLaDAMoEForMaskedLM.expert_cache_bytes`, or the
`LLADA_MOE_EXPERT_CACHE_GB` environment variable) defaults to half the memory available on the experts' device when
the generation starts; 0 turns the cache off. Results are identical with and without it: a cached copy is exactly
what dequantizing gives.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
from torch import nn


ENV_BUDGET = "LLADA_MOE_EXPERT_CACHE_GB"


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: free CUDA memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # unknown (not Linux): no cache rather than a guess


def check_budget(value, name: str) -> int | None:
    """`value` as a byte budget: None (automatic) or an int >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r}: expected None (automatic) or a number of bytes (int >= 0)")
    if value < 0:
        raise ValueError(f"{name}={value!r}: expected None (automatic) or a number of bytes >= 0 (0 turns it off)")
    return value


def budget_from_environment() -> int | None:
    raw = os.environ.get(ENV_BUDGET)
    if raw is None or raw.strip() == "":
        return None
    try:
        gigabytes = float(raw)
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0:  # also rejects nan
        raise ValueError(f"{ENV_BUDGET}={raw!r}: expected a number of GiB >= 0 (0 turns the expert cache off)")
    return int(gigabytes * 2**30)


class ExpertWeightCache:
    """Dense (gate_up [2I, H], down [H, I]) weights per (experts module, expert, dtype), up to `budget` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(
        self, key: tuple, dequantize: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        found = self.entries.get(key)
        if found is not None:
            return found
        dense = dequantize()
        size = sum(t.numel() * t.element_size() for t in dense)
        if self.used + size <= self.budget:
            self.entries[key] = dense
            self.used += size
        return dense


@contextlib.contextmanager
def cached_expert_weights(model: nn.Module, budget: int | None) -> Iterator[ExpertWeightCache | None]:
    """Give every quantized experts module of `model` one shared `ExpertWeightCache` while the block runs."""
    experts = [m for m in model.modules() if getattr(m, "is_quantized", False) and hasattr(m, "dense_cache")]
    if not experts:
        yield None
        return
    if budget is None:
        budget = budget_from_environment()
    if budget is None:
        budget = available_memory(experts[0].gate_up.weight.device) // 2
    if budget == 0 or any(m.dense_cache is not None for m in experts):  # off, or an outer generation owns it
        yield None
        return
    cache = ExpertWeightCache(budget)
    for module in experts:
        module.dense_cache = cache
    try:
        yield cache
    finally:
        for module in experts:
            module.dense_cache = None
        cache.entries.clear()
