"""Provenance beyond LLaVA-1.5: LLaVA-NeXT's crops mapped back to frame pixels (hand-made geometry), its
stock sequence and every reducer's tokens traced to the patches whose features they carry, LLaVA-Mini's
compressed tokens, one provenance per image of a multi-image answer, and the overlay of a NeXT case."""
import dataclasses

import numpy as np
import pytest
import skimage.data
import torch

from zip_vlm_ros.engine import EngineConfig, ImageInput, VlmEngine
from zip_vlm_ros.engine.overlay import CROP_COLOUR, DIM, draw_overlay
from zip_vlm_ros.models import CropBox, TokenProvenance
from zip_vlm_ros.models.anyres import anyres_crop_boxes, anyres_full_token_count, anyres_stock_positions
from zip_vlm_ros.models.provenance import provenance_from_sequence, provenance_of_crops, token_of_kept_positions
from zip_vlm_ros.reducers import REDUCERS

COFFEE = skimage.data.coffee()        # 400x600: a base image plus a 2x2 grid on the tiny-next preset
ASTRONAUT = skimage.data.astronaut()  # 512x512
SIDE = 4                              # the tiny presets: 56 px crops, 14 px patches


def _boxes(boxes):
    """(top, left, height, width) per crop, rounded off float noise."""
    return [tuple(round(value, 6) for value in (box.top, box.left, box.height, box.width)) for box in boxes]


def test_next_crops_map_back_to_frame_pixels():
    # 64x128 onto one 112x112 pinpoint: resized to 112x56 (x0.875), pasted 28 px down, cut into 2x2 crops of
    # 56 px = 64 frame px each; the top row starts 28 / 0.875 = 32 frame px above the frame
    boxes = anyres_crop_boxes((64, 128), [[112, 112]], 56, SIDE)
    assert _boxes(boxes) == [(0, 0, 64, 128), (-32, 0, 64, 64), (-32, 64, 64, 64),
                             (32, 0, 64, 64), (32, 64, 64, 64)]
    assert all(box.side == SIDE for box in boxes)
    # an exact fit: 100x200 onto 56x112 (x0.56), no padding, two crops of 100 frame px
    assert _boxes(anyres_crop_boxes((100, 200), [[56, 112]], 56, SIDE)) == [
        (0, 0, 100, 200), (0, 0, 100, 100), (0, 100, 100, 100)]


def test_next_stock_positions_skip_unpadded_rows_and_newlines():
    # the 64x128 frame on a 2x2 grid: an 8x8 stitched patch grid of which rows 2..5 stay after unpadding;
    # the stock sequence is 16 base patches, then 4 rows of 8 patches and a newline each
    positions, length = anyres_stock_positions((64, 128), (2, 2), SIDE)
    assert length == 16 + 4 * 9 == anyres_full_token_count((64, 128), [[112, 112]], 56, SIDE)
    crop = positions.reshape(5, SIDE, SIDE)
    assert np.array_equal(crop[0].ravel(), np.arange(16))
    assert (crop[1:3, :2] == -1).all() and (crop[3:5, 2:] == -1).all()  # padding rows: no token
    assert crop[1, 2, 0] == 16 and crop[2, 2, 0] == 16 + 4 and crop[1, 3, 3] == 16 + 9 + 3
    assert crop[3, 0, 0] == 16 + 2 * 9 and crop[4, 1, 3] == 16 + 3 * 9 + 7
    # a kept newline (position 16 + 8) stands for no patch; token 1 keeps grid patch (row 2, col 0)
    token_of_position = np.full(length, -1)
    token_of_position[[16 + 8, 16]] = [0, 1]
    provenance = provenance_from_sequence(token_of_position, anyres_crop_boxes((64, 128), [[112, 112]], 56, SIDE),
                                          positions, 2)
    assert provenance.group_sizes.tolist() == [0, 1]
    assert np.argwhere(provenance.token_of_patch == 1).tolist() == [[1, 2, 0]]


def test_per_crop_sources_follow_the_layout_order():
    # two crops of 2x2 patches, two tokens each, CLS at position 0: crop 0 keeps CLS and merges patches 0, 1;
    # crop 1 keeps patch 3 then patch 0; the LLM reads crop 1's first token, crop 0's, crop 1's second, crop 0's
    sources = torch.zeros(2, 2, 5, dtype=torch.bool)
    sources[0, 0, 0] = sources[0, 1, 1] = sources[0, 1, 2] = True
    sources[1, 0, 4] = sources[1, 1, 1] = True
    crops = [CropBox(0.0, 0.0, 8.0, 8.0, 2), CropBox(0.0, 8.0, 8.0, 8.0, 2)]
    provenance = provenance_of_crops(sources, crops, 1, torch.tensor([2, 0, 3, 1]))
    assert provenance.token_of_patch.tolist() == [[[3, 3], [-1, -1]], [[2, -1], [-1, 0]]]
    assert provenance.group_sizes.tolist() == [1, 0, 1, 2]
    kept = torch.zeros(2, 6, dtype=torch.bool)
    kept[0, 4] = kept[1, 1] = True
    assert token_of_kept_positions(kept).tolist() == [-1, 1, -1, -1, 0, -1]


def test_overlay_of_a_next_case_draws_every_crop_boundary():
    frame = np.random.default_rng(3).integers(0, 256, size=(64, 128, 3), dtype=np.uint8)
    crops = anyres_crop_boxes((64, 128), [[112, 112]], 56, SIDE)
    nothing_kept = TokenProvenance(crops, np.full((5, SIDE, SIDE), -1, np.int32), np.zeros(0, np.int32))
    overlay = draw_overlay(frame, nothing_kept)
    expected = (frame.astype(np.uint32) * DIM // 256).astype(np.uint8)
    border = np.zeros((64, 128), bool)
    # the base image: the whole frame; the grid crops clipped to it: rows 0..31 and 32..63, cols 0..63 and 64..127
    for top, bottom, left, right in ((0, 64, 0, 128), (0, 32, 0, 64), (0, 32, 64, 128), (32, 64, 0, 64),
                                     (32, 64, 64, 128)):
        border[top, left:right] = border[bottom - 1, left:right] = True
        border[top:bottom, left] = border[top:bottom, right - 1] = True
    expected[border] = CROP_COLOUR
    assert np.array_equal(overlay, expected)


@pytest.fixture(scope="module")
def next_engine(tiny_next_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_next_model_dir), device="cpu", max_new_tokens=2))
    yield engine
    engine.close()


def _check_counts(provenance: TokenProvenance, visual_tokens: int, crops: int):
    assert provenance.visual_tokens == visual_tokens
    assert provenance.token_of_patch.shape == (crops, SIDE, SIDE)
    owners = provenance.token_of_patch[provenance.token_of_patch >= 0]
    assert np.array_equal(np.bincount(owners, minlength=visual_tokens), provenance.group_sizes)


def _check_single_patch_tokens_carry_their_patch(provenance, features, reference):
    """Every token that stands for one patch is that patch's projected feature (`reference [crops, P*P, hidden]`)."""
    singles = np.flatnonzero(provenance.group_sizes == 1)
    assert singles.size
    for token in singles:
        crop, row, col = np.argwhere(provenance.token_of_patch == token)[0]
        torch.testing.assert_close(features[token], reference[crop, row * SIDE + col], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("budget", [None, 20])
@pytest.mark.parametrize("reducer", REDUCERS)
def test_next_reducers_trace_tokens_to_the_patches_they_carry(next_engine, reducer, budget):
    family = next_engine.family
    image_size = COFFEE.shape[:2]
    budget = budget or family.full_token_count(image_size)
    visual = family.encode([COFFEE], budget, reducer)
    provenance = visual.provenance[0]
    _check_counts(provenance, visual.counts[0], family.num_crops(image_size))
    assert _boxes(provenance.crops) == _boxes(family.crop_boxes(image_size))
    assert _boxes(provenance.crops[:1]) == [(0, 0, 400, 600)]  # the base image is the whole frame
    crops = family.preprocess([COFFEE])["pixel_values"][0, :family.num_crops(image_size)]
    with torch.inference_mode():
        reference = family.projected_features(crops)  # [crops, P*P, hidden]: every patch's stock feature
    _check_single_patch_tokens_carry_their_patch(provenance, visual.features, reference)
    sizes = provenance.group_sizes
    if visual.reductions == ["none"]:  # base patches, unpadded grid patches, a newline closing each row
        positions, _ = anyres_stock_positions(image_size, family.grid_shape(image_size), SIDE)
        assert np.array_equal(provenance.token_of_patch.ravel(), positions)
    elif reducer == "visionzip":  # each crop: CLS, dominant patches, contextual groups covering the rest
        assert (provenance.token_of_patch >= 0).all() and (sizes == 0).sum() == family.num_crops(image_size)
    else:
        assert set(sizes.tolist()) <= {0, 1} and (provenance.token_of_patch >= 0).sum() == (sizes == 1).sum()


@pytest.mark.parametrize("reducer", REDUCERS)
def test_next_multi_image_answers_trace_each_base_image(next_engine, reducer):
    images = [ImageInput(COFFEE, "front", key=("front", 1)), ImageInput(ASTRONAUT, "rear", key=("rear", 1))]
    first = next_engine.generate_images(images, ["What is there?"], token_budget=12, reducer=reducer)[0]
    again = next_engine.generate_images(images, ["Anything else?"], token_budget=12, reducer=reducer)[0]
    assert again.prefix_reused and first.provenance is None
    for output in (first, again):
        for image, frame in zip(output.images, (COFFEE, ASTRONAUT)):
            _check_counts(image.provenance, image.visual_tokens, 1)
            assert _boxes(image.provenance.crops) == [(0, 0, *frame.shape[:2])]
    for before, after in zip(first.images, again.images):
        assert np.array_equal(before.provenance.token_of_patch, after.provenance.token_of_patch)


def test_llava_1_5_multi_image_answers_trace_each_image(tiny_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", max_new_tokens=2))
    try:
        output = engine.generate_images([ImageInput(COFFEE, "front"), ImageInput(ASTRONAUT, "rear")], ["What?"],
                                        token_budget=10, reducer="divprune")[0]
    finally:
        engine.close()
    assert [image.provenance.visual_tokens for image in output.images] == [5, 5]
    assert (output.images[0].provenance.crops[0].left, output.images[1].provenance.crops[0].left) == \
        pytest.approx((100.0, 0.0))  # each image's own centred square


@pytest.fixture(scope="module")
def mini_engine(tiny_mini_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_mini_model_dir), device="cpu", max_new_tokens=2))
    yield engine
    engine.close()


def test_mini_token_stands_for_the_whole_padded_frame(mini_engine):
    output = mini_engine.generate(COFFEE, "What is this?")
    provenance = output.provenance
    # one compressed token: every patch of the tiny preset's centred square (no padding to a square)
    assert provenance.group_sizes.tolist() == [SIDE * SIDE] and (provenance.token_of_patch == 0).all()
    assert _boxes(provenance.crops) == [(0, 100, 400, 400)]
    family, preset_config = mini_engine.family, mini_engine.family.mini_config
    family.mini_config = dataclasses.replace(preset_config, pad_to_square=True)  # the released model's setting
    try:
        padded = family.encode([COFFEE], 1).provenance[0]
    finally:
        family.mini_config = preset_config
    assert _boxes(padded.crops) == [(-100, 0, 600, 600)]  # the 600x600 square the frame was padded to
    surround = mini_engine.generate_images([ImageInput(COFFEE, "front"), ImageInput(ASTRONAUT, "rear")], ["What?"])[0]
    # video mode stretches each frame to the square: the token stands for the whole frame
    assert [_boxes(image.provenance.crops) for image in surround.images] == [[(0, 0, 400, 600)], [(0, 0, 512, 512)]]


def test_mini_with_four_queries_draws_each_over_its_cell(mini_c2_dir):
    engine = VlmEngine(EngineConfig(model=str(mini_c2_dir), device="cpu", max_new_tokens=2))
    try:
        provenance = engine.generate(ASTRONAUT, "What is this?").provenance
    finally:
        engine.close()
    assert provenance.group_sizes.tolist() == [4, 4, 4, 4]
    assert provenance.token_of_patch[0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


@pytest.mark.parametrize("reducer", ["divprune", "visionzip"])
def test_qwen_multi_image_answers_trace_each_whole_frame(tiny_qwen_model_dir, reducer):
    # Qwen2.5-VL resizes each frame whole (no crop): each image's provenance is its own frame on the grid of
    # merged tokens, and its tokens are the ones the LLM read of that image.
    engine = VlmEngine(EngineConfig(model=str(tiny_qwen_model_dir), device="cpu", max_new_tokens=2))
    try:
        output = engine.generate_images([ImageInput(COFFEE, "front"), ImageInput(ASTRONAUT, "rear")], ["What?"],
                                        token_budget=12, reducer=reducer)[0]
    finally:
        engine.close()
    assert [_boxes(image.provenance.crops) for image in output.images] == [[(0, 0, 400, 600)], [(0, 0, 512, 512)]]
    for image in output.images:
        assert image.provenance.visual_tokens == image.visual_tokens < image.visual_tokens_full
        drawn = np.unique(image.provenance.token_of_patch)
        assert set(drawn[drawn >= 0]) <= set(range(image.visual_tokens))
