"""A batched, left-padded KV cache that sequences can join and leave at step boundaries.

All running sequences that use the same adapter form one *cohort*: their keys/values live in one
``DynamicCache`` of shape (B, heads, L, head_dim) per layer, right-aligned, with a (B, L)
attention mask that is 0 on the left padding. A decode step appends one column for every row.

- ``join``: a freshly prefilled batch is merged in by left-padding the shorter of the two caches
  (padding is masked, so it changes no output).
- ``keep``: finished rows are dropped with an index-select, then columns that are padding in
  every remaining row are trimmed, so a long-finished request does not cost attention forever.

Positions are not derived from the cache length but from each row's own count of real tokens,
which is why left padding keeps batched outputs equal to one-at-a-time outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [n, 0]
    return F.pad(t, pad)


class KVBatch:
    """The cache, mask and per-row real lengths of one cohort."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask  # (B, L) long; 1 = real token

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def positions(self) -> torch.Tensor:
        """(B, 1) position id of the next token of every row."""
        return self.mask.sum(dim=1, keepdim=True)

    def step_mask(self) -> torch.Tensor:
        """The attention mask for a one-token decode step (cache columns + the new token)."""
        return torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)

    def advance(self, step_mask: torch.Tensor) -> None:
        """Record that the decode step appended one column to the cache."""
        self.mask = step_mask

    def truncate(self, length: int) -> None:
        """Drop cache columns past ``length``: a forward that raised half way has appended the new
        token to the layers it reached, and the step is repeated from the old state."""
        for layer in self._layers():
            if layer.keys.shape[2] > length:
                layer.keys = layer.keys[:, :, :length, :]
                layer.values = layer.values[:, :, :length, :]

    def _layers(self):
        return [layer for layer in self.cache.layers if layer.is_initialized]

    def _pad(self, n: int) -> None:
        if n <= 0:
            return
        for layer in self._layers():
            layer.keys = _pad_left(layer.keys, n, dim=2)
            layer.values = _pad_left(layer.values, n, dim=2)
        self.mask = _pad_left(self.mask, n, dim=1)

    def join(self, other: "KVBatch") -> None:
        """Append the rows of ``other`` (same model, same adapter) to this batch."""
        length = max(self.length, other.length)
        self._pad(length - self.length)
        other._pad(length - other.length)
        mine, theirs = self._layers(), other._layers()
        if len(mine) != len(theirs):
            raise ValueError(f"cannot join KV caches with {len(mine)} and {len(theirs)} layers")
        for a, b in zip(mine, theirs):
            a.keys = torch.cat([a.keys, b.keys], dim=0)
            a.values = torch.cat([a.values, b.values], dim=0)
        self.mask = torch.cat([self.mask, other.mask], dim=0)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then trim all-padding columns on the left."""
        if len(rows) == self.size:
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for layer in self._layers():
            layer.batch_select_indices(idx)
        self.mask = self.mask.index_select(0, idx)
        if self.size == 0:
            return
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self.length
        if first > 0:
            for layer in self._layers():
                layer.keys = layer.keys[:, :, first:, :].contiguous()
                layer.values = layer.values[:, :, first:, :].contiguous()
            self.mask = self.mask[:, first:]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) for a left-padded prefill batch."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, length - len(p):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions
