"""A KV cache layer that writes each decoded token in place instead of copying the whole cache.

transformers' `DynamicLayer.update` concatenates the new token's keys and values onto the
cache, so every decode step copies every layer's whole KV: at the search's batch of up to 100
rows of ~400 tokens that is most of a gigabyte per step, 14% of a greedy eval's CPU time
(benchmarks/RESULTS.md, "A KV cache that grows in place"). `RoomyLayer` keeps its keys and
values at the front of a buffer with `ROOM` spare positions and writes new tokens into them;
`keys`/`values` are views of the filled part, so attention reads exactly what it read before.

The running batch (pipeline/lm/running_batch.py) still replaces `keys`/`values` when rows join
or leave; the layer notices that they no longer sit at the front of its buffer and moves them
into a new one at the next update, one copy where `DynamicLayer` makes one anyway.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Spare positions a buffer is allocated with: one copy per ROOM decode steps instead of one per
# step, for ROOM / (prompt + tokens so far) more memory (about 8% at the demo's ~400 tokens).
ROOM = 32


class RoomyLayer(DynamicLayer):
    """A plain full-attention cache layer whose keys and values grow in place."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        have = self.get_seq_length()
        end = have + key_states.shape[-2]
        if not self._fronts_buffer(end):
            self.key_buffer = _with_room(self.keys, key_states, have, end + ROOM)
            self.value_buffer = _with_room(self.values, value_states, have, end + ROOM)
        self.key_buffer[..., have:end, :] = key_states
        self.value_buffer[..., have:end, :] = value_states
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values

    def _fronts_buffer(self, end: int) -> bool:
        """Are `keys`/`values` still the front of the buffers (nobody replaced them), with room
        up to position `end`?"""
        buffer = self.key_buffer
        if buffer is None or buffer.shape[-2] < end or self.get_seq_length() == 0:
            return False
        return all(x.data_ptr() == b.data_ptr() and x.shape[:2] == b.shape[:2]
                   and x.stride() == b.stride()
                   for x, b in ((self.keys, buffer), (self.values, self.value_buffer)))


def _with_room(cached: torch.Tensor, new: torch.Tensor, have: int, size: int) -> torch.Tensor:
    """A (rows, heads, size, dim) buffer holding `cached`'s `have` positions at its front."""
    buffer = new.new_empty((*new.shape[:2], size, new.shape[-1]))
    if have:
        buffer[..., :have, :] = cached
    return buffer


def decoding_cache(model, past: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    """The model's `DynamicCache` with its plain full-attention layers as `RoomyLayer`s (other
    layer kinds are kept), holding `past` (one (keys, values) per layer) if given."""
    cache = DynamicCache(config=model.config)
    cache.layers = [RoomyLayer() if type(x) is DynamicLayer else x for x in cache.layers]
    for layer, (keys, values) in zip(cache.layers, past or []):
        layer.update(keys, values)
    return cache
