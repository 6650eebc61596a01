"""Provenance and the overlay: a hand-made case drawn pixel for pixel, and every reducer of the tiny LLaVA-1.5
engine tracing each visual token it feeds to the frame patches the reducer says it stands for."""
import numpy as np
import pytest
import skimage.data

from zip_vlm_ros.engine import EngineConfig, VlmEngine
from zip_vlm_ros.engine.overlay import CROP_COLOUR, DIM, KEPT_OUTLINE, TINT, draw_overlay, group_colour
from zip_vlm_ros.models import CropBox, TokenProvenance
from zip_vlm_ros.models.provenance import center_crop_box
from zip_vlm_ros.reducers import REDUCERS

ASTRONAUT = skimage.data.astronaut()  # 512x512
COFFEE = skimage.data.coffee()        # 400x600
PATCHES_PER_SIDE = 4                  # the tiny preset: 56 px input, 14 px patches


def _hand_made_frame() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)


def test_overlay_of_a_hand_made_case_pixel_for_pixel():
    frame = _hand_made_frame()
    # one crop at rows/cols 2..9 of a 12x12 frame, 2x2 patches of 4x4 px; token 0 keeps patch (0, 0),
    # token 1 merges patches (1, 0) and (1, 1), patch (0, 1) is dropped, token 2 (CLS-like) has no patch
    provenance = TokenProvenance([CropBox(2.0, 2.0, 8.0, 8.0, 2)], np.array([[[0, -1], [1, 1]]], np.int32),
                                 np.array([1, 2, 0], np.int32))
    overlay = draw_overlay(frame, provenance)
    assert overlay.shape == frame.shape and overlay.dtype == np.uint8
    source = frame.astype(np.uint32)
    # DIM and TINT are in 256ths: dimmed = frame * DIM / 256, tinted = (frame * (256 - TINT) + colour * TINT) / 256
    dimmed = (source * DIM // 256).astype(np.uint8)
    tinted = ((source * (256 - TINT) + np.asarray(group_colour(1), np.uint32) * TINT) // 256).astype(np.uint8)
    # outside the crop: dimmed; the crop's 1 px border in the crop colour
    assert np.array_equal(overlay[:2], dimmed[:2]) and np.array_equal(overlay[:, 10:], dimmed[:, 10:])
    border = np.zeros((12, 12), bool)
    border[2, 2:10] = border[9, 2:10] = border[2:10, 2] = border[2:10, 9] = True
    assert (overlay[border] == CROP_COLOUR).all()
    # kept patch rows/cols 2..5: interior at full brightness, its inner edges (row 5, col 5) outlined
    assert np.array_equal(overlay[3:5, 3:5], frame[3:5, 3:5])
    assert (overlay[5, 3:6] == KEPT_OUTLINE).all() and (overlay[3:6, 5] == KEPT_OUTLINE).all()
    # dropped patch rows 2..5, cols 6..9: dimmed inside the crop border
    assert np.array_equal(overlay[3:6, 6:9], dimmed[3:6, 6:9])
    # merged group rows 6..9: tinted with token 1's colour inside the crop border
    assert np.array_equal(overlay[6:9, 3:9], tinted[6:9, 3:9])
    assert group_colour(1) != group_colour(2)


def test_overlay_refuses_a_frame_that_is_not_rgb8():
    provenance = TokenProvenance([CropBox(0.0, 0.0, 4.0, 4.0, 1)], np.zeros((1, 1, 1), np.int32), np.ones(1, np.int32))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        draw_overlay(np.zeros((4, 4), np.uint8), provenance)


def test_center_crop_box_is_the_square_clip_preprocessing_keeps():
    # 400x600 resized to 56x84, centre 56x56 crop from column 14: frame columns 100..500
    box = center_crop_box((400, 600), 56, (56, 56), 4)
    assert (box.top, box.left, box.height, box.width) == pytest.approx((0.0, 100.0, 400.0, 400.0))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", max_new_tokens=2))
    yield engine
    engine.close()


def _check_tokens_trace_to_patches(provenance: TokenProvenance, visual_tokens: int):
    assert provenance.visual_tokens == visual_tokens
    assert provenance.token_of_patch.shape == (1, PATCHES_PER_SIDE, PATCHES_PER_SIDE)
    owners = provenance.token_of_patch[provenance.token_of_patch >= 0]
    # every patch a token stands for counts in that token's group, and only there
    assert np.array_equal(np.bincount(owners, minlength=visual_tokens), provenance.group_sizes)


@pytest.mark.parametrize("reducer", REDUCERS)
def test_every_reducer_traces_its_tokens_to_frame_patches(engine, reducer):
    budget = 6
    visual = engine.family.encode([COFFEE], budget, reducer)
    provenance = visual.provenance[0]
    _check_tokens_trace_to_patches(provenance, visual.counts[0])
    crop = provenance.crops[0]
    assert (crop.left, crop.width) == pytest.approx((100.0, 400.0))
    sizes = provenance.group_sizes
    if reducer == "visionzip":
        # CLS first (no patch), then dominant patches, then contextual groups covering every other patch
        assert sizes[0] == 0 and (provenance.token_of_patch >= 0).all()
        assert sizes.sum() == PATCHES_PER_SIDE ** 2 and (sizes[1:] >= 1).all()
    else:  # selections: one patch per token, the rest dropped
        assert (sizes == 1).all() and (provenance.token_of_patch >= 0).sum() == budget


def test_full_budget_traces_token_p_to_patch_p(engine):
    visual = engine.family.encode([ASTRONAUT], PATCHES_PER_SIDE ** 2)
    provenance = visual.provenance[0]
    assert visual.reductions == ["none"]
    assert np.array_equal(provenance.token_of_patch.ravel(), np.arange(PATCHES_PER_SIDE ** 2))


def test_answers_carry_provenance_also_from_a_reused_prefix(engine):
    first, second = engine.generate_many(COFFEE, ["What is this?", "Describe it."], token_budget=5,
                                         frame_key="coffee", reducer="vispruner")
    again = engine.generate(COFFEE, "Any cup?", token_budget=5, frame_key="coffee", reducer="vispruner")
    assert second.prefix_reused and again.prefix_reused
    for output in (first, second, again):
        _check_tokens_trace_to_patches(output.provenance, output.visual_tokens)
        assert np.array_equal(output.provenance.token_of_patch, first.provenance.token_of_patch)
    overlay = draw_overlay(COFFEE, first.provenance)
    assert overlay.shape == COFFEE.shape and not np.array_equal(overlay, COFFEE)
    # the kept patches' centres are the frame's own pixels; the columns left of the crop are dimmed
    assert np.array_equal(overlay[:, :90], (COFFEE[:, :90].astype(np.uint32) * DIM // 256).astype(np.uint8))
    kept_rows, kept_cols = np.nonzero(first.provenance.token_of_patch[0] >= 0)
    for row, col in zip(kept_rows, kept_cols):
        y, x = int((row + 0.5) * 100), int(100 + (col + 0.5) * 100)
        assert np.array_equal(overlay[y, x], COFFEE[y, x])
