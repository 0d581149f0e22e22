"""`DiffusionBlockCache`: the approximate block KV cache of Fast-dLLM (prefix and dual), as a transformers `Cache`."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class DiffusionCacheLayer(CacheLayerMixin):
    """One layer's keys/values (after RoPE) of the whole canvas, from the block-start forward."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.window: tuple[int, int] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.window is None:  # block-start forward over the whole canvas: remember it
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        start, end = self.window
        if self.mode == "prefix":  # the new tokens are [start, L): attend to the frozen prefix and to each other
            return (
                torch.cat([self.keys[:, :, :start], key_states], dim=-2),
                torch.cat([self.values[:, :, :start], value_states], dim=-2),
            )
        if key_states.shape[-2] != end - start:
            raise ValueError(f"dual cache: got {key_states.shape[-2]} new tokens for the block [{start}, {end})")
        self.keys[:, :, start:end] = key_states  # replace the block, keep the frozen prefix and suffix
        self.values[:, :, start:end] = value_states
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if self.window is None else self.window[0]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.window is None:
            return query_length, 0
        if self.mode == "prefix":
            return self.window[0] + query_length, 0
        return self.keys.shape[-2], 0

    def get_max_length(self) -> int:
        return -1


class DiffusionBlockCache(Cache):
    """Approximate KV cache for a bidirectional model decoding one block at a time (Fast-dLLM semantics).

    `refresh()` before a forward over the whole canvas stores every layer's keys/values. `select_block(start, end)`
    then makes later forwards see the cache as "everything except the new tokens": in `"prefix"` mode the inputs are
    the canvas from `start` on and attend to the frozen prefix; in `"dual"` mode the inputs are the block
    [start, end), whose keys/values replace the cached ones, and attend to the frozen prefix and suffix.
    `get_seq_length()` is the first new position, so the model numbers the new tokens' positions from there.
    """

    def __init__(self, mode: str, num_layers: int):
        if mode not in ("prefix", "dual"):
            raise ValueError(f"DiffusionBlockCache: mode={mode!r}; expected 'prefix' or 'dual'")
        super().__init__(layers=[DiffusionCacheLayer(mode) for _ in range(num_layers)])
        self.mode = mode

    def refresh(self) -> None:
        for layer in self.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False
            layer.window = None

    def select_block(self, start: int, end: int) -> None:
        for layer in self.layers:
            layer.window = (start, end)

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows `index` (rows that finished their block leave the forwards)."""
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
