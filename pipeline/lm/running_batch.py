"""Continuous batching for the decoding loop: new rows join the running batch as others leave.

One `generate` call often holds far more rows than one batch (a search round asks for every
option of every tree at once). Decoded in fixed batches, each batch ends with a few long rows
decoding alone while the rest of the call waits. Instead the loop keeps one running batch of
at most `batch_size` rows; once enough rows have left, the next prompts (length-sorted, a
prompt's rows side by side) are prefilled, past whatever prefix the `PrefixCache` holds (often
a row that left a moment ago), and join it.

Joining pads the shorter of the two KV caches on the left with masked positions and stacks
them along the batch. Positions count real tokens only, so no row's positions or attention
change; only padding is added, and leading columns that are padding in every row are cut
whenever rows join or leave.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from pipeline.lm.prefix_cache import Prefilled

# Rows join once this share of the batch is free (or the batch is empty, or the rows left to
# start would fit). Joining costs a prefill call and a copy of the running KV cache, so rows
# are let in a few at a time rather than one by one.
JOIN_WHEN_FREE = 0.25


@dataclass
class RunningBatch:
    """The rows decoding now, in batch order: their KV cache, attention mask and next logits."""

    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None  # (rows, cache length): 1 on real tokens
    logits: torch.Tensor | None = None  # (rows, vocab), float32
    live: list[int] = field(default_factory=list)  # each batch row's index among the call's rows

    def wants_rows(self, batch_size: int, waiting: int, can_join: bool) -> bool:
        """Should the next waiting rows be prefilled and let in now?"""
        if not self.live:
            return waiting > 0
        free = batch_size - len(self.live)
        least = max(1, int(batch_size * JOIN_WHEN_FREE))
        return can_join and waiting > 0 and free >= min(least, waiting)

    def join(self, start: Prefilled, rows: list[int]) -> None:
        """Add freshly prefilled rows (one per entry of `rows`) at the end of the batch."""
        if not self.live:
            self.cache, self.mask, self.logits, self.live = start.cache, start.mask, start.logits, list(rows)
            return
        length = max(self.mask.shape[1], start.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, start.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, length, -2), _left_pad(theirs.keys, length, -2)])
            mine.values = torch.cat([_left_pad(mine.values, length, -2),
                                     _left_pad(theirs.values, length, -2)])
        self.mask = torch.cat([_left_pad(self.mask, length, -1), _left_pad(start.mask, length, -1)])
        self.logits = torch.cat([self.logits, start.logits])
        self.live += rows
        self._trim()

    def keep(self, index: list[int]) -> torch.Tensor | None:
        """Keep only these batch rows; returns the index tensor (None when every row stays)."""
        if len(index) == len(self.live):
            return None
        self.live = [self.live[j] for j in index]
        if not index:
            self.cache = self.mask = self.logits = None
            return None
        select = torch.tensor(index, device=self.mask.device)
        self.cache.batch_select_indices(select)
        self.mask, self.logits = self.mask[select], self.logits[select]
        self._trim()
        return select

    def _trim(self) -> None:
        """Cut the leading cache columns that are padding in every row."""
        first = int(self.mask.any(dim=0).int().argmax())
        if first > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
            self.mask = self.mask[:, first:]


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class HiddenSlots:
    """hidden=True: each running row's final hidden state at every token it has generated, kept
    in a slot that is the row's own while it runs and read once when it stops."""

    def __init__(self, steps: int):
        self.steps = steps
        self.buffer: torch.Tensor | None = None  # (slots, steps, hidden size)
        self.free: list[int] = []
        self.slot: dict[int, int] = {}

    def write(self, live: list[int], cols: torch.Tensor, states: torch.Tensor) -> None:
        """Row live[j]'s state at its token number cols[j] is states[j]."""
        for r in live:
            if r not in self.slot:
                self.slot[r] = self._take(states)
        slots = torch.tensor([self.slot[r] for r in live], device=states.device)
        self.buffer[slots, cols] = states

    def read(self, picks: list[tuple[int, int, int]]) -> torch.Tensor:
        """For each (row, token a, token b): the row's states at those tokens, (n, 2, hidden) on
        the CPU, in one transfer; the rows' slots are freed."""
        slots = torch.tensor([self.slot[r] for r, _, _ in picks], device=self.buffer.device)
        at = torch.tensor([[a, b] for _, a, b in picks], device=self.buffer.device)
        out = self.buffer[slots[:, None], at].float().cpu()
        for r, _, _ in picks:
            self.free.append(self.slot.pop(r))
        return out

    def _take(self, like: torch.Tensor) -> int:
        if not self.free:
            have = 0 if self.buffer is None else len(self.buffer)
            more = like.new_zeros((max(have, len(like)), self.steps, like.shape[-1]))
            self.buffer = more if self.buffer is None else torch.cat([self.buffer, more])
            self.free = list(range(len(self.buffer) - 1, have - 1, -1))
        return self.free.pop()
