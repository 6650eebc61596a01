"""Key/value caches of transformers models: fork one without writing the original, and count its bytes.

Used by the engine's prefix cache and by adapters whose prompt embedding keeps a cache of its own
(LLaVA-Mini's pre-fusion layers).
"""

from __future__ import annotations

import copy

import torch

__all__ = ["cache_nbytes", "fork_cache"]


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
