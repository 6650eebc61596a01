"""The engine with each reducer (visionzip, divprune, vispruner) on the offline tiny LLaVA-1.5 and LLaVA-NeXT
checkpoints: the tokens the LLM reads equal the reducer applied by hand to independently computed features,
the prefix and per-image caches key on the reducer, unknown names are refused with the choices."""
import numpy as np
import pytest
import skimage.data
import torch

from zip_vlm_ros.engine import EngineConfig, ImageInput, ModelLoadError, RequestError, VlmEngine
from zip_vlm_ros.models.clip_features import encode_reference_style
from zip_vlm_ros.reducers import REDUCERS, divprune_select, vispruner_select

ASTRONAUT, COFFEE = skimage.data.astronaut(), skimage.data.coffee()
FULL = 16  # the tiny preset: 16 patches, "default" strategy drops CLS
PATCHES_PER_SIDE = 4


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", max_new_tokens=4))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def next_engine(tiny_next_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_next_model_dir), device="cpu", max_new_tokens=4,
                                    reducer="divprune"))
    yield engine
    engine.close()


def _pixels(engine, image):
    return engine.family.preprocess([image])["pixel_values"]


def test_divprune_reads_the_stock_projected_tokens_it_keeps(engine):
    budget = 6
    stock = engine.model.model.get_image_features(
        pixel_values=_pixels(engine, ASTRONAUT), vision_feature_layer=-2,
        vision_feature_select_strategy="default").pooler_output[0]  # [16, text_hidden]
    kept = divprune_select(stock, budget)
    visual = engine.family.encode([ASTRONAUT], budget, "divprune")
    assert visual.counts == [budget] and visual.reductions == ["divprune"]
    assert torch.equal(visual.features, stock[kept])


def test_vispruner_reads_the_projected_patches_it_keeps(engine):
    budget = 6
    # eager attention maps of every layer: an independent path to the CLS attention VisPruner reads
    features = encode_reference_style(engine.model.model.vision_tower, _pixels(engine, COFFEE), -2)
    patches = features.hidden_states[0, 1:]
    kept = vispruner_select(patches, features.cls_attention[0], budget)
    visual = engine.family.encode([COFFEE], budget, "vispruner")
    assert visual.counts == [budget] and visual.reductions == ["vispruner"]
    expected = engine.model.model.multi_modal_projector(patches[kept])
    # the eager and SDPA towers differ by float rounding (~1e-6); a different kept set would differ by O(1)
    torch.testing.assert_close(visual.features, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("reducer", REDUCERS)
def test_each_reducer_answers_and_reports_itself(engine, reducer):
    out = engine.generate(ASTRONAUT, "What is in the image?", token_budget=5, reducer=reducer)
    assert (out.reduction, out.visual_tokens, out.token_budget, out.visual_tokens_full) == (reducer, 5, 5, FULL)
    full = engine.generate(ASTRONAUT, "What is in the image?", token_budget=FULL, reducer=reducer)
    assert (full.reduction, full.visual_tokens) == ("none", FULL)


def test_default_reducer_comes_from_the_config(engine, next_engine):
    assert engine.generate(ASTRONAUT, "Hi?", token_budget=5).reduction == "visionzip"
    assert next_engine.generate(ASTRONAUT, "Hi?", token_budget=20).reduction == "divprune"
    assert engine.generate(ASTRONAUT, "Hi?", token_budget=5, reducer="").reduction == "visionzip"


def test_prefix_cache_keys_on_the_reducer(engine):
    engine.clear_prefix_cache()
    ask = dict(token_budget=6, frame_key=("front", 1))
    first = engine.generate_many(ASTRONAUT, ["What is it?", "Where?"], reducer="vispruner", **ask)
    assert [out.prefix_reused for out in first] == [False, True]
    other = engine.generate(ASTRONAUT, "What is it?", reducer="divprune", **ask)
    assert not other.prefix_reused and other.reduction == "divprune"
    again = engine.generate(ASTRONAUT, "What is it?", reducer="vispruner", **ask)
    assert again.prefix_reused and again.text == first[0].text


def test_unknown_reducer_is_refused_with_the_choices(engine, tiny_model_dir):
    for call in (lambda: engine.generate(ASTRONAUT, "Hi?", reducer="holov"),
                 lambda: engine.generate_many(ASTRONAUT, ["Hi?"], reducer="holov"),
                 lambda: engine.generate_images([ImageInput(ASTRONAUT, "front")], ["Hi?"], reducer="holov")):
        with pytest.raises(RequestError, match="unknown reducer 'holov'; choose one of visionzip, divprune, vispruner"):
            call()
    with pytest.raises(ModelLoadError, match="reducer 'holov' is unknown; choose one of visionzip, divprune, vispruner"):
        VlmEngine(EngineConfig(model=str(tiny_model_dir), reducer="holov"))


def test_multi_image_cache_keys_on_the_reducer(engine):
    engine.clear_prefix_cache()
    images = [ImageInput(ASTRONAUT, "front", key=("front", 1)), ImageInput(COFFEE, "rear", key=("rear", 1))]
    first = engine.generate_images(images, ["What is around?"], token_budget=10, reducer="divprune")[0]
    assert first.reduction == "divprune" and [image.reduction for image in first.images] == ["divprune"] * 2
    other = engine.generate_images(images, ["What is around?"], token_budget=10, reducer="vispruner")[0]
    assert not other.prefix_reused and [image.cached for image in other.images] == [False, False]
    assert other.reduction == "vispruner"
    # the per-image tokens of a multi-image request equal that image's own reduction at its share
    alone = engine.family.encode([COFFEE], 5, "vispruner").features
    torch.testing.assert_close(engine.family.encode_base(COFFEE, 5, "vispruner").features, alone, rtol=0, atol=0)


def test_llava_next_divprune_is_one_selection_over_the_whole_stock_sequence(next_engine):
    stock = next_engine.model.model.get_image_features(
        pixel_values=next_engine.family.preprocess([ASTRONAUT])["pixel_values"],
        image_sizes=torch.tensor([ASTRONAUT.shape[:2]]), vision_feature_layer=-2,
        vision_feature_select_strategy="default").pooler_output[0]  # base + unpadded grid + newlines
    full = next_engine.family.full_token_count(ASTRONAUT.shape[:2])
    assert stock.shape[0] == full
    visual = next_engine.family.encode([ASTRONAUT], 20, "divprune")
    assert visual.counts == [20]
    assert torch.equal(visual.features, stock[divprune_select(stock, 20)])


def test_llava_next_vispruner_keeps_the_same_count_per_crop_in_stitched_raster_order(next_engine):
    family = next_engine.family
    size = ASTRONAUT.shape[:2]
    crops_count = family.num_crops(size)
    grid_height, grid_width = family.grid_shape(size)
    per_crop = 3
    visual = family.encode([ASTRONAUT], per_crop * crops_count, "vispruner")
    assert visual.counts == [per_crop * crops_count]
    crops = family.preprocess([ASTRONAUT])["pixel_values"][0, :crops_count]
    features = encode_reference_style(next_engine.model.model.vision_tower, crops, -2)
    projector = next_engine.model.model.multi_modal_projector
    kept = [vispruner_select(features.hidden_states[crop, 1:], features.cls_attention[crop], per_crop)
            for crop in range(crops_count)]
    # built position by position: base first, then grid patches by (stitched row, stitched column)
    grid = []
    for crop in range(1, crops_count):
        crop_row, crop_col = divmod(crop - 1, grid_width)
        for patch in kept[crop].tolist():
            row = crop_row * PATCHES_PER_SIDE + patch // PATCHES_PER_SIDE
            col = crop_col * PATCHES_PER_SIDE + patch % PATCHES_PER_SIDE
            grid.append((row, col, projector(features.hidden_states[crop, 1 + patch])))
    expected = torch.cat([projector(features.hidden_states[0, 1:][kept[0]])]
                         + [token[None] for _, _, token in sorted(grid, key=lambda item: item[:2])])
    assert grid_height * grid_width == crops_count - 1
    torch.testing.assert_close(visual.features, expected, rtol=0, atol=1e-5)
    out = next_engine.generate(ASTRONAUT, "What is it?", token_budget=per_crop * crops_count, reducer="vispruner")
    assert (out.reduction, out.visual_tokens) == ("vispruner", per_crop * crops_count)


def test_llava_next_multi_image_reads_each_base_with_the_reducer(next_engine):
    images = [ImageInput(ASTRONAUT, "front"), ImageInput(np.ascontiguousarray(COFFEE[:200]), "rear")]
    out = next_engine.generate_images(images, ["What is around?"], token_budget=12)[0]
    assert [(image.reduction, image.visual_tokens) for image in out.images] == [("divprune", 6), ("divprune", 6)]
