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

import operator
from collections.abc import Sequence

import torch

__all__ = [
    "MIN_TOKENS_PER_CROP",
    "anyres_full_token_count",
    "anyres_grid_shape",
    "anyres_vispruner_layout",
    "anyres_visionzip_layout",
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
