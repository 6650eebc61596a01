"""Independent constructions of DivPrune and VisPruner, written from the authors' code to check
``zip_vlm_ros.reducers`` against (float32, one sequence at a time).

``official_divprune`` follows vbdi/divprune @ 689ab4d (``DivPrune`` in ``LLaVA/llava/model/llava_arch.py``):
the whole distance matrix, the chosen rows re-read every step, no masking of chosen tokens.
``official_vispruner`` follows Theia-4869/VisPruner @ d7da3a3 (``encode_images``), including the gather
width ``R // 2 - r`` that makes it crash or drop a token on some budgets.
``intended_vispruner`` is the same algorithm built from Python lists, with the evens gathered correctly.
"""

import torch


def official_divprune(tokens: torch.Tensor, keep: int) -> list[int]:
    """Positions the official DivPrune picks (duplicates included), sorted as the official code does."""
    normalized = tokens / tokens.norm(dim=1, keepdim=True)
    distance = 1.0 - normalized @ normalized.t()
    picks: list[int] = []
    for step in range(keep):
        if step == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = distance[torch.tensor(picks)].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    return sorted(picks)


def official_vispruner(features: torch.Tensor, cls_attention: torch.Tensor, keep: int,
                       ratio: float) -> tuple[list[int], bool]:
    """Positions the official VisPruner keeps for one crop (raises where the official code raises), and
    whether its misindexing dropped an even it should have kept in some round (R = 2r + 1)."""
    num_patches = features.shape[0]
    important = int(keep * ratio)
    diverse = keep - important
    order = torch.sort(cls_attention.mean(dim=0), descending=True, stable=True).indices[None]  # [1, N]
    residual = order[:, important:]
    normalized = (features / features.norm(dim=-1, keepdim=True))[None]  # [1, N, C]
    misindexed = False
    while diverse > 0:
        length = residual.shape[1]
        dropped = min(8, length - diverse)
        if dropped <= 0:
            break
        tokens = normalized[torch.zeros(1, length, dtype=torch.long), residual]
        scores = (tokens[:, ::2] @ tokens[:, 1::2].transpose(-1, -2)).max(dim=-1).values
        kept_evens = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, dropped:]
        # the official batch index: width R // 2 - r, while kept_evens has ceil(R / 2) - r columns
        batch_index = torch.arange(1).unsqueeze(-1).expand(-1, length // 2 - dropped)
        surviving_evens = residual[..., ::2][batch_index, kept_evens]
        misindexed |= surviving_evens.shape[1] != kept_evens.shape[1]
        residual = torch.cat([surviving_evens, residual[..., 1::2]], dim=-1)
    selected = torch.cat([order[:, :important], residual], dim=-1) if diverse > 0 else order[:, :important]
    mask = torch.zeros(num_patches, dtype=torch.bool)
    mask[selected[0]] = True
    return torch.nonzero(mask).flatten().tolist(), misindexed


def intended_vispruner(features: torch.Tensor, cls_attention: torch.Tensor, keep: int, ratio: float) -> list[int]:
    """VisPruner as its paper and code intend, from plain lists: exactly min(keep, N) positions."""
    num_patches = features.shape[0]
    if keep >= num_patches:
        return list(range(num_patches))
    scores = cls_attention.mean(dim=0).tolist()
    ranked = sorted(range(num_patches), key=lambda position: (-scores[position], position))
    important = int(keep * ratio)
    diverse = keep - important
    unit = features / features.norm(dim=-1, keepdim=True)
    residual = ranked[important:]
    while diverse > 0 and len(residual) - diverse > 0:
        dropped = min(8, len(residual) - diverse)
        evens, odds = residual[0::2], residual[1::2]
        similarity = (unit[evens] @ unit[odds].T).tolist()  # [len(evens), len(odds)]
        redundancy = [max(row) for row in similarity]
        by_redundancy = sorted(range(len(evens)), key=lambda item: (-redundancy[item], item))
        residual = [evens[item] for item in by_redundancy[dropped:]] + odds
    return sorted(ranked[:important] + (residual if diverse > 0 else []))
