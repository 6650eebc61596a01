"""What every reducer returns, and the reducer names the engine accepts.

A reducer takes one image's visual features and returns fewer tokens plus, for every output token, the
input positions it stands for: one position for a kept token, a group for a merged one (VisionZip's
contextual tokens). ``zip_vlm_ros.models`` feeds the reducers and projects or lays out their tokens.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch

__all__ = ["REDUCERS", "ReducedTokens", "check_keep", "check_reducer_name", "sources_of_kept"]

# The reducers the engine serves, in the order error messages list them.
REDUCERS = ("visionzip", "divprune", "vispruner")


class ReducedTokens(NamedTuple):
    """A reducer's output for a batch of token sequences.

    tokens: ``[batch, K, dim]`` the tokens the LLM reads (after projection if the input was projected).
    sources: ``[batch, K, S]`` bool; ``sources[b, k, s]`` is True when output token ``k`` stands for input
        position ``s`` of row ``b`` (``S`` is the input sequence length, e.g. ``1 + N`` for VisionZip's
        CLS-first tower output, ``N`` for patch features, the merged NeXT sequence for DivPrune).
    """

    tokens: torch.Tensor
    sources: torch.Tensor


def check_reducer_name(name: str) -> str:
    """`name` if it is one of ``REDUCERS``, else a ValueError that lists them."""
    if not isinstance(name, str) or name not in REDUCERS:
        raise ValueError(f"unknown reducer {name!r}; choose one of {', '.join(REDUCERS)}")
    return name


def sources_of_kept(kept_indices: torch.Tensor, seq_length: int) -> torch.Tensor:
    """``kept_indices [batch, K]`` positions -> ``[batch, K, seq_length]`` bool, one True per row."""
    sources = torch.zeros(*kept_indices.shape, seq_length, dtype=torch.bool, device=kept_indices.device)
    return sources.scatter_(2, kept_indices.unsqueeze(-1), True)


def check_keep(keep: int) -> int:
    """`keep` as an int >= 0 (a count of tokens to keep), else a ValueError saying so."""
    try:
        keep = operator.index(keep)
    except TypeError:
        raise ValueError(f"keep={keep!r} must be a whole number of tokens >= 0") from None
    if keep < 0:
        raise ValueError(f"keep={keep} must be >= 0")
    return keep
