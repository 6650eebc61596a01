"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025) as pure tensor functions, matching the authors' code (vbdi/divprune @ 689ab4d,
``LLaVA/llava/model/llava_arch.py``: ``pairwise_cosine_similarity``, ``DivPrune``, the ``#divprune`` block).

DivPrune reads no attention: it keeps the ``K`` *projected* visual tokens (the LLM's input embeddings of
the image) that are most diverse, by greedy max-min selection on the cosine distance ``1 - cos``:

* first pick: the token whose nearest token is farthest away. "Nearest" is the second-smallest entry of
  the token's column of the distance matrix, diagonal included, exactly as the official
  ``topk(k=2, largest=False).values[1]`` (the diagonal is about +-1e-7, not exactly 0);
* then, ``K - 1`` times, the token whose distance to the chosen set (its minimum over chosen tokens) is
  largest. Equal scores go to the lowest position (``argmax``).

The kept tokens come out in their original order (the official code sorts the picks).

Deviations from the official code, each only where it misbehaves:

* the official code never excludes chosen tokens; when the distinct vectors run out (identical tokens,
  such as LLaVA-NeXT's row-newline copies, or ``K`` above the token count) it picks a chosen index again
  and feeds that token twice. Here a chosen token is never picked again and ``K`` is clamped to ``N``, so
  the output is ``min(K, N)`` distinct positions. Where the official picks are distinct, they are equal;
* a zero vector (norm 0) would make a NaN row that the official ``argmax`` takes as the maximum; here its
  norm counts as 1 (cosine 0 to everything). Real projector outputs are never exactly zero;
* ``N = 1`` crashes the official ``topk(k=2)``; here the single token is kept;
* the budget is a token count ``K`` (the official ``int(round(ratio * N))`` gives ``K`` back for
  ``ratio = K / N``), and the official fixed prompt offset (35) is replaced by the image's own tokens.

Cost: one ``N x N`` distance matrix and ``K`` passes over ``N`` scores.
"""

from __future__ import annotations

import torch

from zip_vlm_ros.reducers.reduced_tokens import ReducedTokens, check_keep, sources_of_kept

__all__ = ["divprune_reduce", "divprune_select"]


@torch.no_grad()
def divprune_select(tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """Positions DivPrune keeps from one token sequence.

    Args:
        tokens: ``[N, dim]`` projected visual tokens in sequence order (computed in float32).
        keep: ``K >= 0`` tokens to keep; ``K >= N`` keeps every token.

    Returns:
        ``[min(K, N)]`` int64 positions, ascending.
    """
    if tokens.dim() != 2 or tokens.shape[0] < 1:
        raise ValueError(f"tokens must be [N, dim] with N >= 1, got shape {tuple(tokens.shape)}")
    num_tokens = tokens.shape[0]
    keep = check_keep(keep)
    device = tokens.device
    if keep >= num_tokens:
        return torch.arange(num_tokens, device=device)
    if keep == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    vectors = tokens.float()
    norms = vectors.norm(dim=1, keepdim=True)
    normalized = vectors / torch.where(norms == 0, torch.ones_like(norms), norms)
    distance = 1.0 - normalized @ normalized.T  # [N, N]
    nearest_other = torch.topk(distance, 2, dim=0, largest=False).values[1]  # [N] 2nd smallest per column
    picks = [int(torch.argmax(nearest_other))]
    # Distance from each token to the chosen set: a running minimum over the chosen rows (min is exact,
    # so this equals the official recomputation over all chosen rows). Chosen tokens hold -inf, which
    # the minimum keeps, so they are never picked again.
    to_chosen = distance[picks[0]].clone()
    to_chosen[picks[0]] = float("-inf")
    for _ in range(keep - 1):
        pick = int(torch.argmax(to_chosen))
        picks.append(pick)
        torch.minimum(to_chosen, distance[pick], out=to_chosen)
        to_chosen[pick] = float("-inf")
    return torch.sort(torch.tensor(picks, device=device)).values


def divprune_reduce(tokens: torch.Tensor, keep: int) -> ReducedTokens:
    """DivPrune on each row of ``tokens [batch, N, dim]``: ``min(K, N)`` tokens per row, original order.

    Returns ``ReducedTokens`` with ``tokens [batch, min(K, N), dim]`` (rows of the input, its dtype) and
    ``sources [batch, min(K, N), N]`` (one position each).
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [batch, N, dim], got shape {tuple(tokens.shape)}")
    kept = torch.stack([divprune_select(row, keep) for row in tokens])  # [batch, min(K, N)]
    gathered = tokens.gather(1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return ReducedTokens(gathered, sources_of_kept(kept, tokens.shape[1]))

