"""LLaVA-NeXT AnyRes geometry and VisionZip on every crop, as pure functions.

LLaVA-NeXT resizes a frame to the best of its ``image_grid_pinpoints`` resolutions, cuts that into a
``grid_height x grid_width`` grid of square crops (``crop_size`` px, ``P x P`` patches each) and adds the
whole frame resized to one crop (the *base* image): ``1 + grid_height * grid_width`` crops, base first,
grid crops row by row. The stock model feeds the base image's ``P * P`` patches, then the stitched grid
with its padding rows/columns removed ("unpadding") and one ``image_newline`` token after each row.

With VisionZip every crop is compressed with the same dominant/contextual split, as in the authors'
code (dvlab-research/VisionZip, ``visionzip/llava_arch.py``, ``restore_image_features_sorted``). The LLM
then reads, per image (``anyres_visionzip_layout``):

1. the base image's tokens as VisionZip returns them: CLS, dominant patches, contextual tokens;
2. the grid crops' dominant patches in raster order over the stitched ``(grid_height * P) x
   (grid_width * P)`` patch grid (no newline tokens, no unpadding);
3. the grid crops' CLS tokens, crop by crop;
4. the grid crops' contextual tokens, crop by crop.

The reference slices the contextual tokens with ``[:, -contextual:]``, which for ``contextual = 0``
would take every token again; here 0 contextual tokens means none.

With VisPruner every crop keeps the same number of patches, as in the authors' code (Theia-4869/VisPruner,
``llava/model/llava_arch.py``: its ``spatial_unpad`` setting runs the ``spatial`` branch, so there is no
unpadding and no newline token): the base image's kept patches in raster order, then the grid crops' kept
patches in raster order over the whole stitched grid (``anyres_vispruner_layout``). DivPrune needs no layout:
it keeps tokens of the stock sequence (base, unpadded grid, newlines) in their order.

``token_budget`` means the visual tokens the LLM reads per image; ``split_budget_over_crops`` spreads it
over the crops for VisionZip and VisPruner. Nothing here touches a model.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch

from zip_vlm_ros.models.provenance import CropBox

__all__ = [
    "MIN_TOKENS_PER_CROP",
    "anyres_crop_boxes",
    "anyres_full_token_count",
    "anyres_grid_shape",
    "anyres_vispruner_layout",
    "anyres_visionzip_layout",
    "anyres_stock_positions",
    "split_budget_over_crops",
    "unpadded_grid_size",
]

# Every crop keeps at least its CLS token (VisionZip's first dominant token), so a budget below the crop
# count still reads one token per crop.
MIN_TOKENS_PER_CROP = 1


def anyres_grid_shape(image_size: tuple[int, int], grid_pinpoints: Sequence[Sequence[int]],
                      crop_size: int) -> tuple[int, int]:
    """``(grid_height, grid_width)`` in crops for an image of ``image_size = (height, width)`` pixels.

    The best pinpoint is transformers' ``select_best_resolution`` (most of the image kept, then least
    padding), the choice LLaVA-NeXT's image processor makes.
    """
    from transformers.image_processing_utils import select_best_resolution

    best_height, best_width = select_best_resolution(tuple(image_size), [list(p) for p in grid_pinpoints])
    return best_height // crop_size, best_width // crop_size


def unpadded_grid_size(image_size: tuple[int, int], grid_shape: tuple[int, int],
                       patches_per_side: int) -> tuple[int, int]:
    """``(rows, cols)`` of the stitched patch grid after LLaVA-NeXT's unpadding.

    The grid is ``(grid_height * P) x (grid_width * P)`` patches; the image was letterboxed into it, and
    the bands of padding (equal on both sides, rounded down) are dropped along the padded axis.
    """
    height, width = image_size
    rows, cols = grid_shape[0] * patches_per_side, grid_shape[1] * patches_per_side
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    return rows, cols


def anyres_crop_boxes(image_size: tuple[int, int], grid_pinpoints: Sequence[Sequence[int]], crop_size: int,
                      patches_per_side: int) -> list[CropBox]:
    """Where each crop LLaVA-NeXT's processor cuts lies in the frame's pixels: the base image (the whole
    frame squashed to one square crop) first, then the grid crops row by row.

    The processor resizes the frame to fit the best pinpoint keeping its aspect ratio (transformers'
    ``get_patch_output_size``: the constrained side exactly, the other rounded up), pads it centred to the
    pinpoint and cuts ``crop_size`` squares; a grid crop's box therefore reaches past the frame's edge on
    the padded axis (the overlay clips it).
    """
    from transformers.image_processing_utils import select_best_resolution

    height, width = image_size
    best_height, best_width = select_best_resolution(tuple(image_size), [list(p) for p in grid_pinpoints])
    scale_height, scale_width = best_height / height, best_width / width
    if scale_width < scale_height:
        new_height, new_width = min(math.ceil(height * scale_width), best_height), best_width
    else:
        new_height, new_width = best_height, min(math.ceil(width * scale_height), best_width)
    paste_top, paste_left = (best_height - new_height) // 2, (best_width - new_width) // 2
    rows_per_pixel, cols_per_pixel = new_height / height, new_width / width  # resized px per frame px
    boxes = [CropBox(0.0, 0.0, float(height), float(width), patches_per_side)]
    for grid_row in range(best_height // crop_size):
        for grid_col in range(best_width // crop_size):
            boxes.append(CropBox((grid_row * crop_size - paste_top) / rows_per_pixel,
                                 (grid_col * crop_size - paste_left) / cols_per_pixel,
                                 crop_size / rows_per_pixel, crop_size / cols_per_pixel, patches_per_side))
    return boxes


def anyres_stock_positions(image_size: tuple[int, int], grid_shape: tuple[int, int],
                           patches_per_side: int) -> tuple[np.ndarray, int]:
    """Where stock LLaVA-NeXT puts each crop's patches in its visual-token sequence.

    Returns ``(position_of_patch, length)``: ``position_of_patch [(1 + G) * P * P]`` int64, crop by crop
    (base first) in each crop's raster order, the index of that patch's token in the stock sequence (base
    patches, then the unpadded stitched grid row by row with an ``image_newline`` token closing each row),
    -1 for a grid patch unpadding drops; ``length`` is the sequence's length (``anyres_full_token_count``).
    """
    side = patches_per_side
    grid_height, grid_width = grid_shape
    rows, cols = grid_height * side, grid_width * side
    kept_rows, kept_cols = unpadded_grid_size(image_size, grid_shape, side)
    top, left = (rows - kept_rows) // 2, (cols - kept_cols) // 2  # unpad_image drops equal bands
    crop = np.arange(grid_height * grid_width)[:, None]  # [G, 1]
    patch = np.arange(side * side)[None, :]  # [1, P * P]
    row = (crop // grid_width) * side + patch // side - top  # in the unpadded grid
    col = (crop % grid_width) * side + patch % side - left
    inside = (row >= 0) & (row < kept_rows) & (col >= 0) & (col < kept_cols)
    grid_positions = np.where(inside, side * side + row * (kept_cols + 1) + col, -1)  # + 1: each row's newline
    return np.concatenate([np.arange(side * side), grid_positions.ravel()]), side * side + kept_rows * (kept_cols + 1)


def anyres_full_token_count(image_size: tuple[int, int], grid_pinpoints: Sequence[Sequence[int]],
                            crop_size: int, patches_per_side: int) -> int:
    """Visual tokens stock LLaVA-NeXT feeds for one image ("default" strategy: no CLS tokens).

    Base image ``P * P`` patches + the unpadded grid's ``rows * cols`` patches + one newline per row.
    A 1280x720 frame on LLaVA-NeXT's pinpoints: 576 + 28 * 48 + 28 = 1948.
    """
    grid_shape = anyres_grid_shape(image_size, grid_pinpoints, crop_size)
    rows, cols = unpadded_grid_size(image_size, grid_shape, patches_per_side)
    return patches_per_side ** 2 + rows * (cols + 1)


def split_budget_over_crops(token_budget: int, num_crops: int, max_per_crop: int) -> int:
    """Tokens each crop keeps so that the image's crops together read about ``token_budget`` tokens.

    ``per_crop = token_budget // num_crops`` (the remainder is not used, so ``num_crops * per_crop <=
    token_budget``), at least ``MIN_TOKENS_PER_CROP`` and at most ``max_per_crop`` (a crop's ``1 + N``
    tokens). At 5 crops the paper's 640/320/160 give 128/64/32 per crop.

    Raises ValueError for a budget or crop count below 1.
    """
    budget, crops = operator.index(token_budget), operator.index(num_crops)
    if budget < 1 or crops < 1:
        raise ValueError(f"token_budget={budget} and num_crops={crops} must both be >= 1")
    return max(MIN_TOKENS_PER_CROP, min(budget // crops, max_per_crop))


def anyres_visionzip_layout(crop_tokens: torch.Tensor, dominant_indices: torch.Tensor, contextual: int,
                            grid_shape: tuple[int, int], patches_per_side: int) -> torch.Tensor:
    """Arrange one image's per-crop VisionZip tokens in the order the LLM reads them (module docstring).

    Args:
        crop_tokens: ``[1 + G, dominant + contextual, hidden]`` ``visionzip_compress`` tokens of each
            crop (base first, then the ``G = grid_height * grid_width`` grid crops row by row): CLS,
            the other dominant patches in sequence order, then the contextual tokens.
        dominant_indices: ``[1 + G, dominant]`` ascending positions of the dominant tokens in each
            crop's ``1 + P * P`` sequence (position 0 is CLS), as ``visionzip_compress`` returns them.
        contextual: contextual tokens per crop.
        grid_shape: ``(grid_height, grid_width)`` in crops.
        patches_per_side: ``P``.

    Returns:
        ``[(1 + G) * (dominant + contextual), hidden]``.
    """
    num_crops, kept, hidden_size = crop_tokens.shape
    grid_height, grid_width = grid_shape
    if num_crops != 1 + grid_height * grid_width or dominant_indices.shape != (num_crops, kept - contextual):
        raise ValueError(
            f"crop_tokens {tuple(crop_tokens.shape)} and dominant_indices {tuple(dominant_indices.shape)} do not fit "
            f"a base image plus a {grid_height}x{grid_width} grid with {contextual} contextual tokens per crop")
    dominant = kept - contextual
    grid_tokens = crop_tokens[1:]  # [G, kept, hidden]
    with torch.no_grad():
        patch = dominant_indices[1:, 1:] - 1  # [G, dominant - 1] patch index inside its crop
        crop = torch.arange(grid_height * grid_width, device=patch.device)[:, None]  # [G, 1]
        row = (crop // grid_width) * patches_per_side + patch // patches_per_side
        col = (crop % grid_width) * patches_per_side + patch % patches_per_side
        raster_order = torch.argsort((row * (grid_width * patches_per_side) + col).flatten())
    grid_patches = grid_tokens[:, 1:dominant].reshape(-1, hidden_size)[raster_order]  # [G * (dominant-1), hidden]
    return torch.cat([
        crop_tokens[0],
        grid_patches,
        grid_tokens[:, 0],
        grid_tokens[:, dominant:].reshape(-1, hidden_size),
    ])


def anyres_vispruner_layout(crop_tokens: torch.Tensor, kept_indices: torch.Tensor, grid_shape: tuple[int, int],
                            patches_per_side: int) -> torch.Tensor:
    """Arrange one image's per-crop VisPruner tokens as the authors' LLaVA-NeXT code does.

    Args:
        crop_tokens: ``[1 + G, T, hidden]`` each crop's kept patches (base first, then the ``G`` grid crops
            row by row), each crop's in raster order.
        kept_indices: ``[1 + G, T]`` their ascending patch positions in ``0..P*P-1``.
        grid_shape: ``(grid_height, grid_width)`` in crops.
        patches_per_side: ``P``.

    Returns:
        ``[(1 + G) * T, hidden]``: the base's tokens, then every grid crop's tokens ordered by their
        position in the stitched ``(grid_height * P) x (grid_width * P)`` patch grid (not unpadded).
    """
    num_crops, kept, hidden_size = crop_tokens.shape
    grid_height, grid_width = grid_shape
    if num_crops != 1 + grid_height * grid_width or kept_indices.shape != (num_crops, kept):
        raise ValueError(
            f"crop_tokens {tuple(crop_tokens.shape)} and kept_indices {tuple(kept_indices.shape)} do not fit "
            f"a base image plus a {grid_height}x{grid_width} grid")
    with torch.no_grad():
        patch = kept_indices[1:]  # [G, T]
        crop = torch.arange(grid_height * grid_width, device=patch.device)[:, None]  # [G, 1]
        row = (crop // grid_width) * patches_per_side + patch // patches_per_side
        col = (crop % grid_width) * patches_per_side + patch % patches_per_side
        raster_order = torch.argsort((row * (grid_width * patches_per_side) + col).flatten())
    return torch.cat([crop_tokens[0], crop_tokens[1:].reshape(-1, hidden_size)[raster_order]])
