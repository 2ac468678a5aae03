"""The running batch: KV cache, attention mask and positions of the sequences being decoded.

Continuous batching on a plain Hugging Face model: newcomers are prefilled together (left
padded), then their cache is left-padded to the running batch's length and concatenated along
the batch dimension. Finished rows are dropped with `batch_select_indices`, and columns that
are padding for every row are trimmed so the cache does not grow without bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin


class RunningBatch:
    """Cache + mask for B rows; row i of every tensor belongs to sequence i."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask  # [B, T] 1 = real token, 0 = left padding

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    def positions(self) -> torch.Tensor:
        """Position id of the next token of each row: the number of real tokens so far."""
        return self.mask.sum(dim=1, keepdim=True)

    def extend(self) -> torch.Tensor:
        """Append one real column (the token about to be decoded); returns the new mask."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask

    def merge(self, other: RunningBatch) -> None:
        """Append `other`'s rows, left-padding whichever is shorter."""
        t_self, t_other = self.mask.shape[1], other.mask.shape[1]
        length = max(t_self, t_other)
        self._left_pad(length - t_self)
        other._left_pad(length - t_other)
        for (mine, keys, values), (_, their_keys, their_values) in zip(
            map(_kv, self.cache.layers), map(_kv, other.cache.layers)
        ):
            mine.keys = torch.cat([keys, their_keys], dim=0)
            mine.values = torch.cat([values, their_values], dim=0)
        self.mask = torch.cat([self.mask, other.mask], dim=0)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order), then trim all-padding columns."""
        index = torch.tensor(rows, device=self.mask.device, dtype=torch.long)
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        real = self.mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else self.mask.shape[1]
        if start:
            self.mask = self.mask[:, start:]
            for layer, keys, values in map(_kv, self.cache.layers):
                layer.keys = keys[:, :, start:, :]
                layer.values = values[:, :, start:, :]

    def _left_pad(self, n: int) -> None:
        if n <= 0:
            return
        self.mask = F.pad(self.mask, (n, 0), value=0)
        for layer, keys, values in map(_kv, self.cache.layers):
            layer.keys = F.pad(keys, (0, 0, n, 0))
            layer.values = F.pad(values, (0, 0, n, 0))


def _kv(layer: object) -> tuple[CacheLayerMixin, torch.Tensor, torch.Tensor]:
    """A cache layer with its keys and values, which every layer of a decoder's cache holds after the prefill."""
    if not isinstance(layer, CacheLayerMixin) or layer.keys is None or layer.values is None:
        raise TypeError(f"continuous batching needs filled key/value cache layers, not {type(layer).__name__}")
    return layer, layer.keys, layer.values


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and their mask for a prefill."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, length - len(p) :] = 1
    return ids.to(device), mask.to(device)
