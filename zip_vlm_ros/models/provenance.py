"""Provenance: for each visual token the LLM reads, the frame patches it stands for.

A reducer reports, per output token, the input positions it stands for (``ReducedTokens.sources``); the
adapter knows where those positions sit in the frame (which crop, which patch of the crop's grid, where
the crop lies in the frame's pixels). ``TokenProvenance`` joins the two so that an overlay
(``zip_vlm_ros.engine.overlay``) can draw what the model saw without knowing the family. It is a few
small integer arrays per image, computed from tensors the reduction already holds: cheap enough to be
always on. LLaVA-1.5 and LLaVA-NeXT (the base image covering the whole frame, the grid crops mapped back
through the processor's resize and padding, unpadding and ``image_newline`` tokens as the stock sequence
has them) trace every reducer's tokens; LLaVA-Mini's compressed tokens stand for the whole crop
(``provenance_of_query_grid``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CropBox", "TokenProvenance", "center_crop_box", "provenance_from_sequence", "provenance_of_all_patches",
           "provenance_of_crops", "provenance_of_query_grid", "token_of_kept_positions"]


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


def provenance_of_crops(sources: torch.Tensor, crops: list[CropBox], first_patch: int,
                        order: torch.Tensor | None = None) -> TokenProvenance:
    """A per-crop reducer's output traced to the frame.

    sources: ``[len(crops), K, S]`` bool, per crop the reducer's ``ReducedTokens.sources`` (its K output
        tokens' positions in the crop's sequence; patch ``p`` of the crop, raster order over its ``grid``,
        is position ``first_patch + p``; earlier positions such as CLS belong to no patch).
    order: ``[len(crops) * K]``: the LLM's token ``t`` is the per-crop token ``order[t]`` (``crop * K + k``),
        how a layout such as ``anyres_visionzip_layout`` arranges them; None: crop by crop, each in its order.

    A patch belongs to the first token that stands for it (reducers give each patch to at most one).
    """
    num_crops, kept, _ = sources.shape
    rows, columns = crops[0].grid
    # numpy from here: a few small single-threaded array ops (torch's would each wait for its thread pool)
    patch_sources = sources[:, :, first_patch:first_patch + rows * columns].cpu().numpy()  # [crops, K, R * C] bool
    covered = patch_sources.any(axis=1)  # [crops, R * C]
    owner = patch_sources.argmax(axis=1) + np.arange(num_crops)[:, None] * kept  # the first True per patch
    order = np.arange(num_crops * kept) if order is None else order.cpu().numpy()
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])  # per-crop token -> its index in the LLM's order
    token_of_patch = np.where(covered, rank[owner], -1)
    group_sizes = patch_sources.sum(axis=2).reshape(-1)[order]
    return TokenProvenance(list(crops), token_of_patch.astype(np.int32).reshape(num_crops, rows, columns),
                           group_sizes.astype(np.int32))


def provenance_from_sequence(token_of_position: np.ndarray, crops: list[CropBox], position_of_patch: np.ndarray,
                             visual_tokens: int) -> TokenProvenance:
    """Tokens of a sequence whose positions are the crops' patches in some order (LLaVA-NeXT's stock
    sequence) traced to the frame.

    token_of_position: ``[L]`` the visual token that stands for sequence position ``s``, -1 for none.
    position_of_patch: ``[len(crops) * rows * columns]`` each patch's position in the sequence (crop by crop,
        raster order), -1 for a patch the sequence leaves out. A token of a position that is no patch
        (NeXT's row-closing ``image_newline``) stands for none.
    """
    rows, columns = crops[0].grid
    patch_tokens = np.where(position_of_patch >= 0, token_of_position[position_of_patch.clip(0)], -1)
    group_sizes = np.bincount(patch_tokens[patch_tokens >= 0], minlength=visual_tokens)
    return TokenProvenance(list(crops), patch_tokens.astype(np.int32).reshape(len(crops), rows, columns),
                           group_sizes.astype(np.int32))


def token_of_kept_positions(sources: torch.Tensor) -> np.ndarray:
    """``sources [K, L]`` bool of a reducer that keeps one position per token (DivPrune) -> ``[L]`` int64:
    the kept token of each position, -1 for a dropped one."""
    kept = sources.cpu().numpy()
    return np.where(kept.any(axis=0), kept.argmax(axis=0), -1)


def provenance_of_query_grid(crop: CropBox, grid_size: int) -> TokenProvenance:
    """LLaVA-Mini's ``C x C`` compressed tokens traced to the crop: every learned query cross-attends to
    all of the crop's patches, so each stands for the whole crop; a query carries the position of its
    cell of a ``C x C`` grid over the crop (and the patches' keys the same table resized), so a patch is
    drawn as its cell's token. ``C = 1`` (the released model): one token, the whole crop."""
    cell = np.arange(crop.side) * grid_size // crop.side  # [side] the query row (column) of a patch row (column)
    token_of_patch = (cell[:, None] * grid_size + cell[None, :]).astype(np.int32)
    group_sizes = np.bincount(token_of_patch.ravel(), minlength=grid_size ** 2).astype(np.int32)
    return TokenProvenance([crop], token_of_patch[None], group_sizes)


def provenance_of_all_patches(crops: list[CropBox], leading_tokens: int = 0) -> TokenProvenance:
    """No reduction: token ``leading_tokens + p`` is patch ``p`` (``leading_tokens`` CLS-like tokens first)."""
    rows, columns = crops[0].grid
    patch_count = len(crops) * rows * columns
    token_of_patch = (np.arange(patch_count, dtype=np.int32) + leading_tokens).reshape(len(crops), rows, columns)
    group_sizes = np.concatenate([np.zeros(leading_tokens, np.int32), np.ones(patch_count, np.int32)])
    return TokenProvenance(list(crops), token_of_patch, group_sizes)
