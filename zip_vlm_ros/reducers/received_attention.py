"""VisionZip for towers without a CLS token (Qwen2.5-VL), as pure tensor functions.

A CLIP tower's CLS query says which patches matter (``visionzip``). A tower without CLS still has a
full-attention layer in which every token attends to every other: VisionZip's Qwen2.5-VL variant scores
each token by the attention it *receives* there, averaged over all queries and heads. Dominant tokens are
the top-scored ones; the rest merge into contextual tokens by key similarity exactly as ``visionzip``'s
``merge_contextual`` does.

``received_attention`` computes the score in query chunks: memory ``heads x chunk x N``, never the full
``heads x N x N`` map. Nothing here knows about window orders, patch mergers or M-RoPE (the adapter in
``zip_vlm_ros.models`` feeds these functions tokens in the model's stock order).
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

from zip_vlm_ros.reducers.reduced_tokens import sources_of_kept
from zip_vlm_ros.reducers.visionzip import assign_contextual, gather_tokens, merge_contextual

__all__ = ["AnchoredTokens", "DEFAULT_QUERY_CHUNK", "received_attention", "select_top_scored",
           "visionzip_scored_reduce"]

# Queries per chunk: at Qwen2.5-VL-3B's 16 heads and a 1280x720 frame (4784 patches) a chunk's
# [heads, chunk, N] float32 block is 39 MiB.
DEFAULT_QUERY_CHUNK = 128


class AnchoredTokens(NamedTuple):
    """``visionzip_scored_reduce``'s output: ``ReducedTokens`` plus, per output token, one input position
    that stands in for it where a single position is needed (M-RoPE): a dominant token's own position, a
    contextual token's target.

    tokens ``[batch, K, hidden]``, sources ``[batch, K, N]`` bool, anchors ``[batch, K]`` int64.
    """

    tokens: torch.Tensor
    sources: torch.Tensor
    anchors: torch.Tensor


@torch.no_grad()
def received_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                       chunk: int = DEFAULT_QUERY_CHUNK) -> torch.Tensor:
    """Attention each token receives, averaged over queries and heads.

    Args:
        queries, keys: ``[heads, N, head_dim]`` one sequence's queries and keys (after any rotary embedding)
            of a layer in which all N tokens attend to each other.
        scaling: the layer's softmax scale (``head_dim ** -0.5``).
        chunk: queries per step (>= 1); memory is ``heads x chunk x N`` float32.

    Returns ``[N]`` float32: ``mean over heads h and queries q of softmax_k(q . k * scaling)[h, q, k]``.
    The scores sum to 1 (each softmax row does).
    """
    if queries.dim() != 3 or queries.shape != keys.shape:
        raise ValueError(f"queries and keys must both be [heads, N, head_dim], got {tuple(queries.shape)} "
                         f"and {tuple(keys.shape)}")
    chunk = operator.index(chunk)
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1 queries")
    heads, length, _ = queries.shape
    keys_t = keys.float().transpose(1, 2)  # [heads, head_dim, N]
    received = torch.zeros(length, dtype=torch.float32, device=queries.device)
    for start in range(0, length, chunk):
        logits = torch.matmul(queries[:, start:start + chunk].float(), keys_t) * scaling  # [heads, chunk, N]
        received += logits.softmax(dim=-1).sum(dim=(0, 1))
    return received / (heads * length)


@torch.no_grad()
def select_top_scored(scores: torch.Tensor, dominant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores [batch, N]`` -> ``(dominant_indices [batch, dominant], remainder_indices [batch, N -
    dominant])``, each ascending: the `dominant` highest scores (equal scores: the lower position wins)."""
    batch_size, length = scores.shape
    if not 0 <= dominant <= length:
        raise ValueError(f"dominant={dominant} must be between 0 and the {length} scored tokens")
    top = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices[:, :dominant]
    is_dominant = torch.zeros(batch_size, length, dtype=torch.uint8, device=scores.device)
    is_dominant.scatter_(1, top, 1)
    order = torch.sort(is_dominant, dim=1, stable=True).indices  # remainder first, then dominant, in order
    return order[:, length - dominant:], order[:, :length - dominant]


def visionzip_scored_reduce(tokens: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, dominant: int,
                            contextual: int) -> AnchoredTokens:
    """VisionZip without CLS: ``dominant`` top-scored tokens plus ``contextual`` merged ones.

    Args:
        tokens: ``[batch, N, hidden]`` the tokens to reduce, in sequence order.
        scores: ``[batch, N]`` each token's importance (``received_attention``).
        keys: ``[batch, N, head_dim]`` the merge metric (the scoring layer's keys averaged over heads).
        dominant: tokens kept as they are (>= 1); contextual: merged tokens (0 .. N - dominant).

    The remainder (the ``N - dominant`` other tokens, in sequence order) is merged by ``merge_contextual``:
    targets at remainder positions ``0, s, 2s, ...`` (``s = max(1, R // contextual)``), every other token
    joins the target with the most cosine-similar key, a contextual token is its target plus the mean of
    the tokens that joined it.

    Returns ``AnchoredTokens``: tokens ``[batch, dominant + contextual, hidden]`` (dominant in sequence
    order, then contextual in target order), their sources ``[batch, K, N]`` and anchors ``[batch, K]``
    (the dominant positions, then the targets' positions).
    """
    batch_size, length, _ = tokens.shape
    if scores.shape != (batch_size, length) or keys.shape[:2] != (batch_size, length):
        raise ValueError(f"scores must be [batch={batch_size}, N={length}] and keys [batch, N, head_dim] to match "
                         f"tokens {tuple(tokens.shape)}, got {tuple(scores.shape)} and {tuple(keys.shape)}")
    if not 1 <= dominant <= length or not 0 <= contextual <= length - dominant:
        raise ValueError(f"dominant={dominant}, contextual={contextual} cannot split {length} tokens: need "
                         f"1 <= dominant <= {length} and 0 <= contextual <= {length} - dominant")
    dominant_indices, remainder = select_top_scored(scores, dominant)
    kept = gather_tokens(tokens, dominant_indices)  # [batch, dominant, hidden]
    sources = sources_of_kept(dominant_indices, length)
    if contextual == 0:
        return AnchoredTokens(kept, sources, dominant_indices)
    remainder_keys = gather_tokens(keys, remainder)  # [batch, R, head_dim]
    merged = merge_contextual(gather_tokens(tokens, remainder), remainder_keys, contextual)
    target_positions, source_positions, assignment = assign_contextual(remainder_keys, contextual)
    members = torch.zeros(batch_size, contextual, remainder.shape[1], device=tokens.device)
    members[:, :, source_positions] = assignment.transpose(1, 2)  # [batch, contextual, R]
    members[:, torch.arange(contextual, device=tokens.device), target_positions] = 1.0
    contextual_sources = torch.zeros(batch_size, contextual, length, dtype=torch.bool, device=tokens.device)
    contextual_sources.scatter_(2, remainder.unsqueeze(1).expand_as(members), members.bool())
    anchors = torch.cat([dominant_indices, remainder[:, target_positions]], dim=1)
    return AnchoredTokens(torch.cat([kept, merged], dim=1), torch.cat([sources, contextual_sources], dim=1), anchors)
