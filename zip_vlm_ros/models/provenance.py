"""Provenance: for each visual token the LLM reads, the frame patches it stands for.

A reducer reports, per output token, the input positions it stands for (``ReducedTokens.sources``); the
adapter knows where those positions sit in the frame (which crop, which patch of the crop's grid, where
the crop lies in the frame's pixels). ``TokenProvenance`` joins the two so that an overlay
(``zip_vlm_ros.engine.overlay``) can draw what the model saw without knowing the family. It is a few
small integer arrays per image, computed from tensors the reduction already holds: cheap enough to be
always on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CropBox", "TokenProvenance", "center_crop_box", "provenance_from_sources", "provenance_of_all_patches"]


@dataclass(frozen=True)
class CropBox:
    """Where one crop the vision tower encoded lies in the frame: pixels (may reach past the edge for
    padded crops), and the crop's grid of ``side x side`` patches (``side x columns`` when `columns` is
    given: Qwen2.5-VL's whole resized frame, in merged tokens)."""

    top: float
    left: float
    height: float
    width: float
    side: int
    columns: int = 0

    @property
    def grid(self) -> tuple[int, int]:
        """``(rows, columns)`` of the crop's patch grid."""
        return self.side, self.columns or self.side


@dataclass
class TokenProvenance:
    """One image's visual tokens traced back to its frame.

    crops: the crops the tower encoded, in the order their patches are numbered.
    token_of_patch: ``[len(crops), rows, columns]`` int32: the visual token (index in the order the LLM reads
        them) that patch ``(row, col)`` of a crop feeds, -1 for a patch no token stands for (dropped).
    group_sizes: ``[visual tokens]`` int32: how many patches each token stands for (1: a kept patch,
        > 1: a merged group, 0: a token of no patch, e.g. the CLS token VisionZip keeps).
    """

    crops: list[CropBox]
    token_of_patch: np.ndarray
    group_sizes: np.ndarray

    @property
    def visual_tokens(self) -> int:
        return int(self.group_sizes.shape[0])


def center_crop_box(image_size: tuple[int, int], shortest_edge: int, crop_size: tuple[int, int], side: int) -> CropBox:
    """The frame region CLIP preprocessing keeps: resize so the shortest edge is `shortest_edge`, then a
    centred ``crop_size (height, width)`` crop; returned in the frame's pixels."""
    height, width = image_size
    scale = shortest_edge / min(height, width)
    crop_height, crop_width = crop_size
    # The resize rounds each edge to whole pixels; the crop's offset is in resized pixels.
    top = (round(height * scale) - crop_height) // 2
    left = (round(width * scale) - crop_width) // 2
    return CropBox(top / scale, left / scale, crop_height / scale, crop_width / scale, side)


def provenance_from_sources(sources: torch.Tensor, crops: list[CropBox], first_patch: int) -> TokenProvenance:
    """``sources [tokens, S]`` bool (a reducer's ``ReducedTokens.sources`` for one image; its positions
    ``first_patch .. first_patch + crops * rows * columns - 1`` are the crops' patches in raster order, earlier
    positions such as CLS belong to no patch) -> the image's ``TokenProvenance``.

    A patch belongs to the first token that stands for it (reducers give each patch to at most one).
    """
    rows, columns = crops[0].grid
    patch_count = len(crops) * rows * columns
    patch_sources = sources[:, first_patch:first_patch + patch_count].cpu()  # [tokens, patches]
    covered = patch_sources.any(dim=0)
    owner = patch_sources.to(torch.uint8).argmax(dim=0)  # the first True per patch
    token_of_patch = torch.where(covered, owner, torch.full_like(owner, -1))
    return TokenProvenance(list(crops), token_of_patch.numpy().astype(np.int32).reshape(len(crops), rows, columns),
                           patch_sources.sum(dim=1).numpy().astype(np.int32))


def provenance_of_all_patches(crops: list[CropBox], leading_tokens: int = 0) -> TokenProvenance:
    """No reduction: token ``leading_tokens + p`` is patch ``p`` (``leading_tokens`` CLS-like tokens first)."""
    rows, columns = crops[0].grid
    patch_count = len(crops) * rows * columns
    token_of_patch = (np.arange(patch_count, dtype=np.int32) + leading_tokens).reshape(len(crops), rows, columns)
    group_sizes = np.concatenate([np.zeros(leading_tokens, np.int32), np.ones(patch_count, np.int32)])
    return TokenProvenance(list(crops), token_of_patch, group_sizes)
