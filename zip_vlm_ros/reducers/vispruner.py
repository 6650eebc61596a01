"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs", ICCV 2025) as pure tensor functions, matching the authors' code (Theia-4869/VisPruner
@ d7da3a3, ``llava/model/llava_arch.py``: ``encode_images``).

VisPruner keeps ``T`` of a crop's ``N`` patch tokens, read from the vision tower's feature layer before
the projector (CLS dropped):

1. important tokens: the ``T_imp = int(T * important_ratio)`` patches the CLS query attends to most in
   that layer (attention averaged over heads, patch columns of the softmax over ``1 + N`` keys);
2. diverse tokens: the other ``T_div = T - T_imp`` come from the remaining patches, listed in
   descending attention, by rounds of de-duplication. Each round splits the current list into the
   items at even and at odd positions, scores each even item by its largest cosine similarity to an
   odd item, and drops the ``r = min(8, R - T_div)`` highest-scoring evens (``R``: the list's length).
   The next list is the surviving evens in descending score, then the odds. Rounds stop when ``R``
   reaches ``T_div``.

The kept positions come out in their original (raster) order: the official code builds a mask.
``T >= N`` keeps every patch. Sorts are stable (equal scores: the lower position first); the official
sorts are not, which matters only for exact ties.

Deviation from the official code (our rule: index as intended where the official misindexes): the
official code gathers the surviving evens with a batch index of width ``R // 2 - r`` where the even list
has ``ceil(R / 2)`` items. For odd ``R`` that raises IndexError (e.g. ``T = 64, important_ratio = 0.3``),
with ``ceil(R/2) < r`` a RuntimeError (e.g. ``T = 16, important_ratio = 0.75``), and in one case drops all
evens (``R = 2r + 1``; as the last round it keeps ``T - 1`` tokens: ``T = 14`` or ``38`` at 0.75 / 0.9).
Here the evens are gathered with their own width, so every ``T`` keeps exactly ``min(T, N)`` tokens. On
every input where the official code runs without that defect the kept set is the same (every multiple
of 16 at ``important_ratio = 0.5`` with ``N = 576``).
"""

from __future__ import annotations

import torch

from zip_vlm_ros.reducers.reduced_tokens import ReducedTokens, check_keep, sources_of_kept

__all__ = ["DEFAULT_IMPORTANT_RATIO", "DROPPED_PER_ROUND", "vispruner_reduce", "vispruner_select"]

DEFAULT_IMPORTANT_RATIO = 0.5   # the official default (``--important_ratio``)
DROPPED_PER_ROUND = 8           # hard-coded in the official de-duplication loop


@torch.no_grad()
def vispruner_select(features: torch.Tensor, cls_attention: torch.Tensor, keep: int,
                     important_ratio: float = DEFAULT_IMPORTANT_RATIO) -> torch.Tensor:
    """Positions VisPruner keeps from one crop's patches.

    Args:
        features: ``[N, C]`` the feature layer's patch tokens (no CLS), before the projector.
        cls_attention: ``[heads, N]`` the CLS query's softmax weights over the patch keys in that layer.
        keep: ``T >= 0`` tokens to keep; ``T >= N`` keeps all.
        important_ratio: ``r`` in ``[0, 1]``; ``T_imp = int(T * r)`` tokens by attention.

    Returns:
        ``[min(T, N)]`` int64 positions in ``0..N-1``, ascending.
    """
    num_patches = features.shape[0]
    if features.dim() != 2 or cls_attention.dim() != 2 or cls_attention.shape[1] != num_patches:
        raise ValueError(f"features must be [N, C] and cls_attention [heads, N]; got {tuple(features.shape)} "
                         f"and {tuple(cls_attention.shape)}")
    keep = check_keep(keep)
    if not 0.0 <= important_ratio <= 1.0:
        raise ValueError(f"important_ratio={important_ratio} must be in [0, 1] (the official default is 0.5)")
    device = features.device
    if keep >= num_patches:
        return torch.arange(num_patches, device=device)
    important_count = int(keep * important_ratio)
    diverse_count = keep - important_count
    scores = cls_attention.float().mean(dim=0)  # [N]
    order = torch.sort(scores, descending=True, stable=True).indices
    residual = order[important_count:]  # descending attention: the order the parity split reads
    vectors = features.float()
    normalized = vectors / vectors.norm(dim=-1, keepdim=True)  # no eps, as the official code
    # All cosines once ([N, N]) instead of a [R/2, R/2] matmul per round as the official code does: about
    # (N - T) / 8 rounds of those cost ~16x more at N = 576, T = 64. Same values up to float rounding.
    similarity = normalized @ normalized.T if diverse_count > 0 else None
    while diverse_count > 0:
        dropped = min(DROPPED_PER_ROUND, residual.shape[0] - diverse_count)
        if dropped <= 0:
            break
        evens, odds = residual[0::2], residual[1::2]
        redundancy = similarity[evens][:, odds].max(dim=-1).values  # [ceil(R/2)] best cosine to an odd
        survivors = torch.sort(redundancy, descending=True, stable=True).indices[dropped:]
        residual = torch.cat([evens[survivors], odds])
    selected = order[:important_count] if diverse_count == 0 else torch.cat([order[:important_count], residual])
    return torch.sort(selected).values


def vispruner_reduce(features: torch.Tensor, cls_attention: torch.Tensor, keep: int,
                     important_ratio: float = DEFAULT_IMPORTANT_RATIO,
                     tokens: torch.Tensor | None = None) -> ReducedTokens:
    """VisPruner on each crop of a batch.

    Args:
        features: ``[crops, N, C]`` patch tokens before the projector (the selection metric).
        cls_attention: ``[crops, heads, N]`` CLS->patch attention of the same layer.
        keep, important_ratio: as ``vispruner_select``.
        tokens: ``[crops, N, D]`` what to gather at the kept positions (the projected patches);
            None gathers ``features``.

    Returns ``ReducedTokens``: ``tokens [crops, min(T, N), D]`` in raster order, ``sources [crops,
    min(T, N), N]`` (one position each).
    """
    if features.dim() != 3 or cls_attention.dim() != 3 or cls_attention.shape[0] != features.shape[0]:
        raise ValueError(f"features must be [crops, N, C] and cls_attention [crops, heads, N]; got "
                         f"{tuple(features.shape)} and {tuple(cls_attention.shape)}")
    source = features if tokens is None else tokens
    kept = torch.stack([vispruner_select(row, attention, keep, important_ratio)
                        for row, attention in zip(features, cls_attention)])  # [crops, min(T, N)]
    gathered = source.gather(1, kept.unsqueeze(-1).expand(-1, -1, source.shape[-1]))
    return ReducedTokens(gathered, sources_of_kept(kept, features.shape[1]))

