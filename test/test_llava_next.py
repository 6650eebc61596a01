"""VlmEngine on the offline tiny LLaVA-NeXT (AnyRes) checkpoint: stock equivalence without reduction,
VisionZip on every crop against the authors' layout built independently, the budget split and reuse."""
import numpy as np
import pytest
import skimage.data
import torch
from anyres_reference import reference_layout

from zip_vlm_ros.models.anyres import split_budget_over_crops
from zip_vlm_ros.engine import EngineConfig, VlmEngine
from zip_vlm_ros.models.clip_features import encode_reference_style
from zip_vlm_ros.reducers import split_budget, visionzip_compress

# Different aspect ratios pick different grids: 512x512 -> 2x2 (88 full tokens), 400x600 -> 2x2
# unpadded to 70, 170x512 -> a 1x3 strip.
IMAGES = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
          "strip": np.ascontiguousarray(skimage.data.astronaut()[170:340])}
PROMPTS = ["What is in the image?", "Describe the scene in detail, please.", "Is the path clear?"]
PATCHES_PER_SIDE = 4  # 56 px crops of 14 px patches
TOKENS_PER_CROP = 1 + PATCHES_PER_SIDE ** 2


@pytest.fixture(scope="module")
def engine(tiny_next_model_dir):
    # CPU even where CUDA exists: these tests compare exact token sequences in float32.
    engine = VlmEngine(EngineConfig(model=str(tiny_next_model_dir), device="cpu", max_new_tokens=10))
    yield engine
    engine.close()


def _chat_text(engine, prompt: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return engine.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def _decoded(engine, token_ids) -> str:
    return engine.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def test_engine_loads_llava_next_and_reports_its_geometry(engine):
    assert type(engine.model).__name__ == "LlavaNextForConditionalGeneration"
    assert engine.family.label == "LLaVA-NeXT"
    # The largest grid (2x2 crops = 8x8 patches) with no unpadding: 16 + 8 * (8 + 1).
    assert engine.visual_tokens_full == 88
    assert engine.family.num_crops(IMAGES["astronaut"].shape[:2]) == 5
    assert engine.family.num_crops(IMAGES["strip"].shape[:2]) == 4


@pytest.mark.parametrize("image_name, prompt", [("astronaut", PROMPTS[0]), ("coffee", PROMPTS[1]),
                                                ("strip", PROMPTS[2])])
def test_full_budget_is_token_for_token_stock_generate(engine, image_name, prompt):
    image = IMAGES[image_name]
    inputs = engine.processor(images=image, text=_chat_text(engine, prompt), return_tensors="pt")
    with torch.inference_mode():
        stock = engine.model.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs.input_ids.shape[1]:]
    stock_tokens = int((inputs.input_ids == engine.image_token_id).sum())
    for budget in (stock_tokens, 10_000):
        output = engine.generate(image, prompt, token_budget=budget, max_new_tokens=16)
        assert output.reduction == "none" and output.reduction_ms == 0.0
        # The image's own full count (its aspect ratio decides the unpadding), not the model's largest.
        assert output.token_budget == output.visual_tokens == output.visual_tokens_full == stock_tokens
        assert output.generated_tokens == len(stock)
        assert output.text == _decoded(engine, stock.tolist())


def _reference_features(engine, image, per_crop: int) -> torch.Tensor:
    """The reduced visual tokens built independently: the processor's crops through the reference-style
    encoder (eager attention maps), VisionZip per crop, projector, the authors' restore-style layout."""
    inputs = engine.processor.image_processor(images=image, return_tensors="pt")
    grid_shape = engine.family.grid_shape(image.shape[:2])
    crops = inputs.pixel_values[0, :1 + grid_shape[0] * grid_shape[1]]
    llava = engine.model.model
    dominant, contextual = split_budget(per_crop, 10 / 64)
    with torch.inference_mode():
        encoded = encode_reference_style(llava.vision_tower, crops, feature_layer=-2)
        tokens, dominant_indices = visionzip_compress(*encoded, dominant, contextual)
        projected = llava.multi_modal_projector(tokens)
    return reference_layout(projected, dominant_indices, contextual, grid_shape, PATCHES_PER_SIDE)


@pytest.mark.parametrize("image_name, budget", [("astronaut", 40), ("coffee", 25), ("strip", 30), ("astronaut", 3)])
def test_reduced_tokens_equal_the_authors_layout_and_generate_like_stock_on_them(engine, image_name, budget):
    image, prompt = IMAGES[image_name], PROMPTS[0]
    crops = engine.family.num_crops(image.shape[:2])
    per_crop = split_budget_over_crops(budget, crops, TOKENS_PER_CROP)
    reference = _reference_features(engine, image, per_crop)

    visual = engine.family.encode([image], budget)
    assert visual.counts == [crops * per_crop] == [reference.shape[0]]
    torch.testing.assert_close(visual.features, reference)

    text = _chat_text(engine, prompt).replace("<image>", "<image>" * reference.shape[0])
    input_ids = engine.tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        inputs_embeds = engine.model.get_input_embeddings()(input_ids).clone()
        inputs_embeds[input_ids == engine.image_token_id] = reference
        stock = engine.model.generate(inputs_embeds=inputs_embeds, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=12, do_sample=False)[0].tolist()
    output = engine.generate(image, prompt, token_budget=budget, max_new_tokens=12)
    assert output.reduction == "visionzip" and output.reduction_ms > 0
    assert output.visual_tokens == crops * per_crop <= max(budget, crops)
    assert output.token_budget == budget
    assert output.visual_tokens_full == engine.family.full_token_count(image.shape[:2])
    assert output.text == _decoded(engine, stock)


def test_budget_is_shared_evenly_by_the_crops(engine):
    # 5 crops: 40 -> 8 each; 44 -> 8 each (remainder unused); 4 -> at least the CLS token of each crop;
    # 87 (one below the full 88) -> capped at a crop's 17 tokens = 85.
    image = IMAGES["astronaut"]
    counts = {budget: engine.generate(image, "Hi?", token_budget=budget, max_new_tokens=1).visual_tokens
              for budget in (40, 44, 4, 87)}
    assert counts == {40: 40, 44: 40, 4: 5, 87: 85}


def test_reused_prefix_and_batches_answer_as_single_requests(engine):
    image = IMAGES["coffee"]
    singles = [engine.generate(image, prompt, token_budget=20, max_new_tokens=8) for prompt in PROMPTS]
    many = engine.generate_many(image, PROMPTS, token_budget=20, max_new_tokens=8, frame_key=("next", 1))
    assert [o.text for o in many] == [o.text for o in singles]
    assert [o.prefix_reused for o in many] == [False, True, True]
    # A batch of differently shaped frames: each row gets its own crop count and full count.
    images = [IMAGES["astronaut"], IMAGES["strip"], IMAGES["coffee"]]
    for budget in (20, 10_000):
        batch = engine.generate_batch(images, PROMPTS, token_budget=budget, max_new_tokens=8)
        alone = [engine.generate(image, prompt, token_budget=budget, max_new_tokens=8)
                 for image, prompt in zip(images, PROMPTS)]
        assert [o.text for o in batch] == [o.text for o in alone]
        assert [o.visual_tokens for o in batch] == [o.visual_tokens for o in alone]
        assert [o.visual_tokens_full for o in batch] == [88, engine.family.full_token_count((170, 512)), 70]
