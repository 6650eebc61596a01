"""VisionZip visual-token reduction (Yang et al., "VisionZip: Longer is Better but Not Necessary in
Vision Language Models", arXiv 2412.04467) as pure tensor functions.

A CLIP vision encoder turns an image into ``1 + N`` tokens (CLS first, then N patches; N = 576 for
LLaVA-1.5). VisionZip keeps a token budget ``T = dominant + contextual`` of them:

* dominant tokens: the CLS token plus the ``dominant - 1`` patches the CLS query attends to most
  (attention summed over heads) in the encoder layer that produced the LLaVA features;
* contextual tokens: the remaining tokens are clustered around ``contextual`` evenly spaced targets
  by cosine similarity of that layer's keys, and each cluster becomes one token.

``visionzip_compress`` reproduces the authors' reference rules exactly, quirks included (the CLS token
is kept and later projected like a patch; a contextual token is the target's hidden state *plus* the
mean of the tokens merged into it). Its inputs come from the vision tower
(``zip_vlm_ros.models.clip_features``).

Nothing here knows about vision towers, LLaVA prompts, budgets larger than the token count, or ROS.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch import nn

from zip_vlm_ros.reducers.reduced_tokens import ReducedTokens, sources_of_kept

__all__ = [
    "DEFAULT_CONTEXTUAL_RATIO",
    "gather_tokens",
    "VisionZipFeatures",
    "assign_contextual",
    "merge_contextual",
    "select_dominant",
    "split_budget",
    "visionzip_compress",
    "visionzip_reduce",
]

# The paper's split: 64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30.
DEFAULT_CONTEXTUAL_RATIO = 10 / 64


class VisionZipFeatures(NamedTuple):
    """What ``visionzip_compress`` needs from the vision encoder, for one batch of images.

    hidden_states: ``[batch, 1 + N, hidden]`` encoder output at the feature layer (index 0 is CLS).
    cls_attention: ``[batch, heads, N]`` float32 softmax weights of the CLS query over the N patch
        keys inside the layer that produced ``hidden_states`` (softmax taken over all ``1 + N`` keys).
    keys: ``[batch, 1 + N, head_dim]`` that layer's key vectors, averaged over heads.
    """

    hidden_states: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor


def split_budget(token_budget: int, contextual_ratio: float = DEFAULT_CONTEXTUAL_RATIO) -> tuple[int, int]:
    """Split a visual-token budget ``T`` into ``(dominant, contextual)`` counts.

    ``contextual = round(T * contextual_ratio)`` (Python's round, halves to even) and
    ``dominant = T - contextual``; ``dominant`` counts the CLS token. ``contextual`` is capped at
    ``T - 1`` so that at least the CLS token stays dominant. With the default ratio 10/64 this gives
    the paper's splits 64 -> (54, 10), 128 -> (108, 20), 192 -> (162, 30).

    Raises ValueError for a budget below 1 or a ratio outside [0, 1).
    """
    try:
        budget = operator.index(token_budget)
    except TypeError:
        raise ValueError(
            f"token_budget={token_budget!r} is not an integer; give a whole number of visual tokens >= 1 (e.g. 64)"
        ) from None
    if budget < 1:
        raise ValueError(f"token_budget={budget} is too small; it must be an integer >= 1 (e.g. 64, 128 or 192)")
    if not 0.0 <= contextual_ratio < 1.0:
        raise ValueError(
            f"contextual_ratio={contextual_ratio} is out of range; it must be in [0, 1) (the paper uses 10/64)"
        )
    contextual = min(round(budget * contextual_ratio), budget - 1)
    return budget - contextual, contextual


def visionzip_compress(
    hidden_states: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce ``1 + N`` vision tokens to ``dominant + contextual`` VisionZip tokens.

    Args:
        hidden_states: ``[batch, 1 + N, hidden]`` vision-encoder output at the feature layer, CLS first.
        cls_attention: ``[batch, heads, N]`` softmax attention of the CLS query over the N patch keys in
            the layer that produced ``hidden_states``.
        keys: ``[batch, 1 + N, head_dim]`` that layer's keys averaged over heads (the merge metric).
        dominant: tokens kept as they are, counting CLS: CLS plus the ``dominant - 1`` patches with the
            largest attention summed over heads. Equal scores: the lower patch index wins.
        contextual: tokens made by merging the rest; 0 keeps only the dominant tokens.

    The ``R = 1 + N - dominant`` other tokens, in sequence order, are the remainder. Its positions
    ``0, s, 2s, ...`` with ``s = max(1, R // contextual)`` (the first ``contextual`` of them) are
    targets; every other remainder token joins the target whose L2-normalised key is most
    cosine-similar (equal similarity: the earlier target wins). A contextual token is its target's
    hidden state plus the mean hidden state of the tokens that joined it (plus 0 if none did).

    Returns:
        tokens: ``[batch, dominant + contextual, hidden]``: dominant tokens in sequence order (CLS
            first), then contextual tokens in target order; dtype of ``hidden_states``.
        dominant_indices: ``[batch, dominant]`` int64 positions of the dominant tokens in
            ``hidden_states``, ascending (so ``dominant_indices[:, 0] == 0``).

    Raises ValueError for tensors whose shapes disagree and for counts that cannot work
    (``dominant < 1``, ``dominant > 1 + N``, ``contextual < 0``, ``contextual > R``).
    """
    _check_feature_shapes(hidden_states, cls_attention, keys)
    dominant, contextual = _check_split(dominant, contextual, hidden_states.shape[1])
    dominant_indices, remainder_indices = select_dominant(cls_attention, dominant)
    dominant_tokens = gather_tokens(hidden_states, dominant_indices)  # [batch, dominant, hidden]
    if contextual == 0:
        return dominant_tokens, dominant_indices
    contextual_tokens = merge_contextual(gather_tokens(hidden_states, remainder_indices),
                                         gather_tokens(keys, remainder_indices), contextual)
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), dominant_indices


@torch.no_grad()
def select_dominant(cls_attention: torch.Tensor, dominant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``1 + N`` token positions into VisionZip's dominant tokens and the remainder.

    Args:
        cls_attention: ``[batch, heads, N]`` attention of the CLS query over the N patches.
        dominant: tokens to keep, counting CLS (``1 <= dominant <= 1 + N``).

    Returns:
        ``(dominant_indices [batch, dominant], remainder_indices [batch, 1 + N - dominant])``, int64
        positions in the ``1 + N`` tokens, each ascending. CLS (position 0) is always dominant; the
        other dominant positions are the ``dominant - 1`` patches with the largest attention summed
        over heads, equal scores going to the lower position.
    """
    batch_size, _, num_patches = cls_attention.shape
    seq_length = num_patches + 1
    patch_scores = cls_attention.float().sum(dim=1)  # [batch, N]
    # A stable descending sort ranks equal scores by position, so ties go to the lower index
    # (torch.topk gives no such guarantee).
    top_patches = torch.sort(patch_scores, dim=1, descending=True, stable=True).indices[:, : dominant - 1] + 1
    is_dominant = torch.zeros(batch_size, seq_length, dtype=torch.uint8, device=cls_attention.device)
    is_dominant[:, 0] = 1
    is_dominant.scatter_(1, top_patches, 1)
    # Stable ascending sort of the 0/1 flags lists the remainder, then the dominant tokens, each in
    # sequence order: both index sets from one vectorised call.
    order = torch.sort(is_dominant, dim=1, stable=True).indices  # [batch, 1 + N]
    remainder_length = seq_length - dominant
    return order[:, remainder_length:], order[:, :remainder_length]


def assign_contextual(remainder_keys: torch.Tensor, contextual: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's contextual clusters over a remainder of ``R`` tokens (see ``merge_contextual``).

    Args:
        remainder_keys: ``[batch, R, head_dim]`` the remainder's head-averaged keys.
        contextual: ``1 <= contextual <= R``.

    Returns:
        ``(target_positions [contextual], source_positions [R - contextual], assignment [batch, R -
        contextual, contextual])``: remainder positions of the targets and of the other tokens (int64,
        ascending) and the float one-hot target each other token joins.
    """
    remainder_length = remainder_keys.shape[1]
    device = remainder_keys.device
    step = max(1, remainder_length // contextual)
    target_positions = torch.arange(0, remainder_length, step)[:contextual]  # [contextual]
    is_target = torch.zeros(remainder_length, dtype=torch.bool)
    is_target[target_positions] = True
    source_positions = torch.arange(remainder_length)[~is_target].to(device)  # [R - contextual]
    target_positions = target_positions.to(device)
    with torch.no_grad():
        keys = remainder_keys.float()
        keys = keys / keys.norm(dim=-1, keepdim=True)
        similarity = torch.bmm(keys[:, source_positions], keys[:, target_positions].transpose(1, 2))
        # similarity: [batch, R - contextual, contextual]; argmax returns the first maximum, so equal
        # similarity goes to the earlier target.
        assignment = nn.functional.one_hot(similarity.argmax(dim=2), contextual).float()
    return target_positions, source_positions, assignment


def merge_contextual(remainder_hidden: torch.Tensor, remainder_keys: torch.Tensor, contextual: int) -> torch.Tensor:
    """Merge VisionZip's remainder tokens into ``contextual`` tokens.

    Args:
        remainder_hidden: ``[batch, R, hidden]`` the remainder's hidden states, in sequence order.
        remainder_keys: ``[batch, R, head_dim]`` their head-averaged keys (the merge metric).
        contextual: ``1 <= contextual <= R``.

    Remainder positions ``0, s, 2s, ...`` with ``s = max(1, R // contextual)`` (the first ``contextual``)
    are targets; every other token joins the target whose L2-normalised key is most cosine-similar
    (equal similarity: the earlier target). A contextual token is its target's hidden state plus the
    mean hidden state of the tokens that joined it (plus 0 if none did).

    Returns ``[batch, contextual, hidden]`` in target order, dtype of ``remainder_hidden``.
    """
    target_positions, source_positions, assignment = assign_contextual(remainder_keys, contextual)
    hidden = remainder_hidden.float()
    # A one-hot matmul (not scatter_add) keeps the sums deterministic on CUDA.
    merged_sum = torch.bmm(assignment.transpose(1, 2), hidden[:, source_positions])  # [batch, contextual, hidden]
    merged_count = assignment.sum(dim=1).clamp(min=1).unsqueeze(-1)  # [batch, contextual, 1]
    contextual_tokens = hidden[:, target_positions] + merged_sum / merged_count
    return contextual_tokens.to(remainder_hidden.dtype)


def visionzip_reduce(features: VisionZipFeatures, dominant: int, contextual: int) -> ReducedTokens:
    """``visionzip_compress`` with, for every output token, the tower positions it stands for.

    Returns ``ReducedTokens``: ``tokens [batch, dominant + contextual, hidden]`` as ``visionzip_compress``
    orders them, and ``sources [batch, dominant + contextual, 1 + N]``: one position for a dominant
    token (CLS is position 0), the target plus every token that joined it for a contextual token.
    """
    hidden_states, cls_attention, keys = features
    tokens, dominant_indices = visionzip_compress(hidden_states, cls_attention, keys, dominant, contextual)
    seq_length = hidden_states.shape[1]
    sources = sources_of_kept(dominant_indices, seq_length)
    if contextual == 0:
        return ReducedTokens(tokens, sources)
    remainder = select_dominant(cls_attention, dominant)[1]  # [batch, R] tower positions
    target_positions, source_positions, assignment = assign_contextual(gather_tokens(keys, remainder), contextual)
    members = torch.zeros(*remainder.shape[:1], contextual, remainder.shape[1], device=remainder.device)
    members[:, :, source_positions] = assignment.transpose(1, 2)  # [batch, contextual, R]
    members[:, torch.arange(contextual, device=remainder.device), target_positions] = 1.0
    contextual_sources = torch.zeros(*members.shape[:2], seq_length, dtype=torch.bool, device=remainder.device)
    contextual_sources.scatter_(2, remainder.unsqueeze(1).expand_as(members), members.bool())
    return ReducedTokens(tokens, torch.cat([sources, contextual_sources], dim=1))


def _check_feature_shapes(
    hidden_states: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor
) -> tuple[int, int, int]:
    """Validate the three encoder tensors against each other; returns ``(batch, 1 + N, hidden)``."""
    if hidden_states.dim() != 3 or hidden_states.shape[1] < 2:
        raise ValueError(
            f"hidden_states must be [batch, 1 + patches, hidden] with at least one patch, "
            f"got shape {tuple(hidden_states.shape)}"
        )
    batch_size, seq_length, hidden_size = hidden_states.shape
    if cls_attention.dim() != 3 or cls_attention.shape[0] != batch_size or cls_attention.shape[2] != seq_length - 1:
        raise ValueError(
            f"cls_attention must be [batch={batch_size}, heads, patches={seq_length - 1}] to match hidden_states "
            f"{tuple(hidden_states.shape)}, got shape {tuple(cls_attention.shape)}"
        )
    if keys.dim() != 3 or keys.shape[:2] != (batch_size, seq_length):
        raise ValueError(
            f"keys must be [batch={batch_size}, tokens={seq_length}, head_dim] to match hidden_states "
            f"{tuple(hidden_states.shape)}, got shape {tuple(keys.shape)}"
        )
    return batch_size, seq_length, hidden_size


def _check_split(dominant: int, contextual: int, seq_length: int) -> tuple[int, int]:
    """Validate an explicit ``(dominant, contextual)`` split for ``seq_length = 1 + N`` tokens."""
    try:
        dominant, contextual = operator.index(dominant), operator.index(contextual)
    except TypeError:
        raise ValueError(f"dominant={dominant!r} and contextual={contextual!r} must be integers") from None
    if not 1 <= dominant <= seq_length:
        raise ValueError(
            f"dominant={dominant} is out of range; it counts the CLS token and must be between 1 and {seq_length} "
            f"(CLS + {seq_length - 1} patches)"
        )
    remainder_length = seq_length - dominant
    if not 0 <= contextual <= remainder_length:
        raise ValueError(
            f"contextual={contextual} is out of range; with dominant={dominant} of {seq_length} tokens it must be "
            f"between 0 and {remainder_length} (the tokens left to merge)"
        )
    return dominant, contextual


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tokens [batch, seq, dim]``, ``indices [batch, k]`` -> ``[batch, k, dim]``."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
