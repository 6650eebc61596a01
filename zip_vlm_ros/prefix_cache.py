"""The engine's per-frame prefix cache: a frame's prompt prefix as key/value views of its first prompt's
cache, an LRU bounded by entries and bytes, and the fork that lets a question continue from shared
views without writing them (see the engine's module docstring for the exactness contract)."""

from __future__ import annotations

import collections
import copy
from collections.abc import Hashable
from dataclasses import dataclass

import torch

__all__ = ["Prefix", "PrefixCache", "cache_nbytes", "fork_cache"]


@dataclass
class Prefix:
    """A frame's prompt prefix after prefill: the LLM key/value cache up to the last visual token.

    ``kv_cache`` holds views of the first question's prompt cache (``fork_cache(cache, length)``). It
    is shared by every question on the frame and never written: each question continues from a fork.
    """

    kv_cache: object                    # transformers Cache, [1, kv_heads, length, head_dim] per layer
    length: int
    nbytes: int                         # bytes of the prefix positions' keys and values
    held_bytes: int                     # bytes the views keep alive: the first question's whole prompt cache
                                        # (plus family_state's)
    # The model family's own state for the prefix (``PromptEmbeddings.prefix_state``; LLaVA-Mini: its
    # pre-fusion key/value views, one per image), None for families that need none. Never written either.
    family_state: object = None


class PrefixCache:
    """LRU map of prefix key -> Prefix, bounded by entry count and total bytes (``held_bytes``).

    An entry larger than the byte bound is not stored (it would evict everything for nothing).
    """

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[Hashable, Prefix] = collections.OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Prefix | None:
        prefix = self._entries.get(key)
        if prefix is not None:
            self._entries.move_to_end(key)
        return prefix

    def put(self, key: Hashable, prefix: Prefix) -> None:
        if self.max_entries < 1 or prefix.held_bytes > self.max_bytes:
            return
        if key in self._entries:
            self.nbytes -= self._entries.pop(key).held_bytes
        while self._entries and (len(self._entries) >= self.max_entries
                                 or self.nbytes + prefix.held_bytes > self.max_bytes):
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.held_bytes
        self._entries[key] = prefix
        self.nbytes += prefix.held_bytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


def fork_cache(kv_cache, length: int | None = None):
    """A cache that continues from the first `length` positions of `kv_cache` (all when None) and
    leaves its key/value tensors untouched.

    ``DynamicLayer.update`` grows a layer with ``torch.cat`` into new tensors, so copying the cache and
    its layer objects, not their tensors, is enough: the fork's keys and values are views
    (``[batch, kv_heads, :length, head_dim]`` slices) of the original's. A question does not pay for
    copying the frame's prefix (72 MiB for a full-token LLaVA-1.5 prefix on the bench preset). Any
    other cache or layer kind might write in place, so it is deep-copied (and cropped).
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(kv_cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in kv_cache.layers):
        fork = copy.deepcopy(kv_cache)
        if length is not None:
            fork.crop(length)
        return fork
    fork = copy.copy(kv_cache)
    fork.layers = [copy.copy(layer) for layer in kv_cache.layers]
    if length is not None:
        for layer in fork.layers:
            if layer.is_initialized:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]
    return fork


def cache_nbytes(kv_cache, positions: int | None = None) -> int:
    """Bytes of the key/value tensors of a transformers Cache, or of their first `positions` positions."""
    total = 0
    for layer in kv_cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                kept = tensor[..., :positions, :] if positions is not None and tensor.ndim >= 2 else tensor
                total += kept.numel() * kept.element_size()
    return total
