"""AnyRes geometry, the per-crop budget rule and the per-crop VisionZip layout, against hand-computed
cases and an independent construction that follows the VisionZip authors' restore_image_features_sorted."""
import pytest
import torch
from anyres_reference import reference_layout
from zip_vlm_ros.models.anyres import (MIN_TOKENS_PER_CROP, anyres_full_token_count, anyres_grid_shape,
                                anyres_visionzip_layout, split_budget_over_crops, unpadded_grid_size)
from zip_vlm_ros.reducers import split_budget, visionzip_compress

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.mark.parametrize("image_size, grid, full", [
    ((720, 1280), (2, 2), 1948),   # 576 + 28 rows * (48 + 1)
    ((336, 672), (1, 2), 576 + 24 * 49),
    ((672, 672), (2, 2), 576 + 48 * 49),
    ((512, 512), (2, 2), 576 + 48 * 49),
    ((300, 1000), (1, 3), 576 + 22 * 73),
])
def test_grid_shape_and_full_count_of_llava_next(image_size, grid, full):
    assert anyres_grid_shape(image_size, NEXT_PINPOINTS, 336) == grid
    assert anyres_full_token_count(image_size, NEXT_PINPOINTS, 336, 24) == full


def test_unpadding_drops_equal_bands_on_the_padded_axis():
    # 1280x720 letterboxed into 48x48 patches: 27 rows of image, (48 - 27) // 2 = 10 padding rows each side.
    assert unpadded_grid_size((720, 1280), (2, 2), 24) == (28, 48)
    # A tall image pads columns instead.
    assert unpadded_grid_size((1280, 720), (2, 2), 24) == (48, 28)


@pytest.mark.parametrize("budget, crops, per_crop", [
    (640, 5, 128), (320, 5, 64), (160, 5, 32),   # the paper's LLaVA-NeXT budgets
    (64, 3, 21),                                  # remainder 1 unused: 3 * 21 = 63 <= 64
    (4, 5, MIN_TOKENS_PER_CROP),                  # below the crop count: one token (CLS) per crop
    (5000, 5, 577),                               # at most a crop's 1 + N tokens
])
def test_budget_is_split_evenly_over_crops(budget, crops, per_crop):
    assert split_budget_over_crops(budget, crops, max_per_crop=577) == per_crop


def test_budget_split_rejects_nonsense():
    with pytest.raises(ValueError):
        split_budget_over_crops(0, 5, 577)


def test_layout_on_a_hand_computed_2x1_grid():
    # P = 2 (4 patches per crop), grid 1 row x 2 crops, dominant 3 (CLS + 2 patches), contextual 1.
    # A token's value encodes (crop, position in its kept tokens) as 10 * crop + position.
    tokens = torch.tensor([[10 * crop + position for position in range(4)] for crop in range(3)],
                          dtype=torch.float32)[:, :, None]  # [3, 4, 1]
    dominant_indices = torch.tensor([[0, 1, 2], [0, 2, 3], [0, 1, 4]])
    out = anyres_visionzip_layout(tokens, dominant_indices, contextual=1, grid_shape=(1, 2), patches_per_side=2)
    # Stitched grid (2 rows x 4 cols): crop 1 covers cols 0-1, crop 2 cols 2-3.
    # crop 1 keeps patches 1 (row 0, col 1) and 2 (row 1, col 0); crop 2 keeps 0 (row 0, col 2), 3 (row 1, col 3).
    # Raster order: (0,1)=c1p1, (0,2)=c2p0, (1,0)=c1p2, (1,3)=c2p3.
    assert out.squeeze(1).tolist() == [0, 1, 2, 3,  # base: CLS, 2 dominant, 1 contextual
                                       11, 21, 12, 22,  # grid dominant patches in raster order
                                       10, 20,  # grid CLS tokens
                                       13, 23]  # grid contextual tokens


@pytest.mark.parametrize("grid_shape, per_crop", [((2, 2), 32), ((1, 3), 12), ((3, 1), 7), ((2, 2), 1)])
def test_layout_equals_the_reference_construction_on_visionzip_output(grid_shape, per_crop):
    side = 6
    crops = 1 + grid_shape[0] * grid_shape[1]
    generator = torch.Generator().manual_seed(sum(grid_shape) * 100 + per_crop)
    hidden = torch.randn(crops, 1 + side * side, 8, generator=generator)
    attention = torch.rand(crops, 2, side * side, generator=generator).softmax(-1)
    keys = torch.randn(crops, 1 + side * side, 4, generator=generator)
    dominant, contextual = split_budget(per_crop)
    tokens, dominant_indices = visionzip_compress(hidden, attention, keys, dominant, contextual)
    ours = anyres_visionzip_layout(tokens, dominant_indices, contextual, grid_shape, side)
    assert ours.shape == (crops * per_crop, 8)
    assert torch.equal(ours, reference_layout(tokens, dominant_indices, contextual, grid_shape, side))


def test_layout_rejects_a_crop_count_that_does_not_fit_the_grid():
    tokens = torch.zeros(4, 3, 2)
    with pytest.raises(ValueError, match="2x2 grid"):
        anyres_visionzip_layout(tokens, torch.zeros(4, 2, dtype=torch.long), 1, (2, 2), 2)
