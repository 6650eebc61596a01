"""The engine's per-frame prefix cache: a frame's prompt prefix as key/value views of its first prompt's
cache, and an LRU bounded by entries and bytes. A question continues from shared views through
``zip_vlm_ros.models.kv_cache.fork_cache`` without writing them (see the engine's module docstring for
the exactness contract)."""

from __future__ import annotations

import collections
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["Prefix", "PrefixCache"]


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
    # What each visual token of the prefix's image stands for in the frame (``TokenProvenance``), so an
    # answer from a reused prefix still says what the model saw; None when the family does not trace it.
    provenance: object = None


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
