"""VlmEngine on the offline tiny Qwen2.5-VL checkpoint: stock equivalence at the full count (one and two
images), DivPrune's kept set and M-RoPE positions against independent constructions, exact prefix reuse,
max_pixels and the refusal of reducers that need a CLS token."""
import numpy as np
import pytest
import skimage.data
import torch
from reducer_references import official_divprune

from zip_vlm_ros.engine import EngineConfig, VlmEngine
from zip_vlm_ros.engine.requests import ImageInput
from zip_vlm_ros.errors import ModelLoadError, RequestError

# 100x130 is not a multiple of 28: the processor resizes it (to 112x140, a 4x5 token grid).
IMAGES = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
          "odd": np.ascontiguousarray(skimage.data.astronaut()[100:200, 200:330])}
PROMPTS = ["What is in the image?", "Describe the scene in detail, please.", "Is the path clear?"]


@pytest.fixture(scope="module")
def engine(tiny_qwen_model_dir):
    # CPU float32: these tests compare exact token sequences.
    engine = VlmEngine(EngineConfig(model=str(tiny_qwen_model_dir), device="cpu", dtype="float32",
                                    max_new_tokens=10, reducer="divprune"))
    yield engine
    engine.close()


def _stock_inputs(engine, images, prompt: str):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = engine.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                tokenize=False)
    return engine.processor(images=list(images), text=text, return_tensors="pt")


def _stock_answer(engine, inputs, max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        generated = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return generated[0, inputs.input_ids.shape[1]:].tolist()


def _decoded(engine, token_ids) -> str:
    return engine.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def test_engine_loads_qwen_and_counts_tokens_per_frame(engine):
    assert type(engine.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert engine.family.label == "Qwen2.5-VL"
    assert engine.visual_tokens_full == 36  # max_pixels = 36 * 28 * 28
    assert engine.family.token_grid(IMAGES["odd"].shape[:2]) == (4, 5)
    for image in IMAGES.values():
        grid = engine.family.preprocess([image])["image_grid_thw"][0].tolist()
        assert engine.family.full_token_count(image.shape[:2]) == grid[1] * grid[2] // 4


@pytest.mark.parametrize("image_name, prompt", [("astronaut", PROMPTS[0]), ("coffee", PROMPTS[1]),
                                                ("odd", PROMPTS[2])])
def test_full_budget_is_token_for_token_stock_generate(engine, image_name, prompt):
    image = IMAGES[image_name]
    inputs = _stock_inputs(engine, [image], prompt)
    stock = _stock_answer(engine, inputs, 16)
    stock_tokens = int((inputs.input_ids == engine.image_token_id).sum())
    for budget in (stock_tokens, 10_000):
        output = engine.generate(image, prompt, token_budget=budget, max_new_tokens=16)
        assert output.reduction == "none" and output.reduction_ms == 0.0
        assert output.visual_tokens == output.visual_tokens_full == stock_tokens
        assert output.generated_tokens == len(stock)
        assert output.text == _decoded(engine, stock)


def test_two_images_at_full_budget_are_token_for_token_stock_generate(engine):
    images = [IMAGES["odd"], IMAGES["coffee"]]
    inputs = _stock_inputs(engine, images, PROMPTS[0])
    stock = _stock_answer(engine, inputs, 16)
    # Empty labels: the images' slots exactly as Qwen's chat template writes two images.
    output = engine.generate_images([ImageInput(image, "") for image in images], [PROMPTS[0]], token_budget=10_000,
                                    max_new_tokens=16)[0]
    assert [image.visual_tokens for image in output.images] == [20, engine.family.full_token_count((400, 600))]
    assert output.generated_tokens == len(stock)
    assert output.text == _decoded(engine, stock)


def _stock_positions(engine, inputs) -> torch.Tensor:
    """``[3, length]`` positions stock Qwen2.5-VL gives the full prompt (``get_rope_index``)."""
    positions, _ = engine.model.model.get_rope_index(inputs.input_ids, inputs.mm_token_type_ids,
                                                     image_grid_thw=inputs.image_grid_thw)
    return positions[:, 0]


@pytest.mark.parametrize("budget", [1, 5, 11])
def test_divprune_keeps_the_official_set_at_stock_positions(engine, budget):
    image, prompt = IMAGES["odd"], PROMPTS[2]
    inputs = _stock_inputs(engine, [image], prompt)
    with torch.inference_mode():
        stock_features = torch.cat(engine.model.model.get_image_features(
            pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw).pooler_output)
        visual = engine.family.encode([image], budget, "divprune")
        expected = official_divprune(stock_features, budget)
        assert visual.kept[0].tolist() == expected
        torch.testing.assert_close(visual.features, stock_features[expected], rtol=0, atol=0)

        prefix_ids, suffix_ids = engine.prompts.tokenize(prompt, budget)
        ids = list(prefix_ids + suffix_ids)
        positions = engine.family.embed_prompt(ids, len(prefix_ids), visual).position_ids[:, 0]
    stock = _stock_positions(engine, inputs)
    stock_ids = inputs.input_ids[0].tolist()
    image_start = stock_ids.index(engine.image_token_id)
    full = len(stock_features)
    assert ids[:image_start] == stock_ids[:image_start] and ids[image_start + budget:] == stock_ids[image_start + full:]
    # text before, the kept tokens at their stock (t, h, w), and the text after as after the full image
    assert torch.equal(positions[:, :image_start], stock[:, :image_start])
    assert torch.equal(positions[:, image_start:image_start + budget], stock[:, image_start + torch.tensor(expected)])
    assert torch.equal(positions[:, image_start + budget:], stock[:, image_start + full:])


def test_reduced_answer_equals_stock_model_on_the_kept_tokens_and_positions(engine):
    """The engine's reduced answer is what the stock model generates from the same embeddings and positions."""
    image, prompt, budget = IMAGES["coffee"], PROMPTS[0], 7
    output = engine.generate(image, prompt, token_budget=budget, max_new_tokens=8)
    assert output.reduction == "divprune" and output.visual_tokens == budget
    with torch.inference_mode():
        visual = engine.family.encode([image], budget, "divprune")
        prefix_ids, suffix_ids = engine.prompts.tokenize(prompt, budget)
        ids = list(prefix_ids + suffix_ids)
        embedded = engine.family.embed_prompt(ids, len(prefix_ids), visual)
        tokens = []
        past, embeds, positions = None, embedded.inputs_embeds, embedded.position_ids
        delta = int(positions.max()) + 1 - len(ids)
        for _ in range(8):  # greedy decoding written out, positions from the prompt's rope delta
            out = engine.model(inputs_embeds=embeds, position_ids=positions, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            tokens.append(token)
            if token in engine.eos_token_ids:
                break
            embeds = engine.model.get_input_embeddings()(torch.tensor([[token]]))
            positions = torch.full((3, 1, 1), past.get_seq_length() + delta)
    assert output.text == _decoded(engine, tokens)


@pytest.mark.parametrize("budget", [6, 10_000])
def test_reused_prefix_answers_as_from_scratch(engine, budget):
    image = IMAGES["astronaut"]
    singles = [engine.generate(image, prompt, token_budget=budget, max_new_tokens=8) for prompt in PROMPTS]
    many = engine.generate_many(image, PROMPTS, token_budget=budget, max_new_tokens=8, frame_key=("qwen", budget))
    assert [o.text for o in many] == [o.text for o in singles]
    assert [o.prefix_reused for o in many] == [False, True, True]
    again = engine.generate(image, PROMPTS[1], token_budget=budget, max_new_tokens=8, frame_key=("qwen", budget))
    assert again.prefix_reused and again.text == singles[1].text


def test_labelled_images_with_cached_tokens_answer_as_uncached(engine):
    images = [ImageInput(IMAGES["odd"], "rear", key="rear"), ImageInput(IMAGES["coffee"], "front", key="front")]
    fresh = engine.generate_images([ImageInput(item.image, item.label) for item in images], PROMPTS[:2],
                                   token_budget=10, max_new_tokens=6)
    first = engine.generate_images(images, PROMPTS[:2], token_budget=10, max_new_tokens=6)
    second = engine.generate_images(images, PROMPTS[:2], token_budget=10, max_new_tokens=6)
    assert [o.text for o in first] == [o.text for o in second] == [o.text for o in fresh]
    assert [image.visual_tokens for image in first[0].images] == [5, 5]
    assert [image.reduction for image in first[0].images] == ["divprune", "divprune"]
    assert second[0].prefix_reused


def test_reducers_that_need_cls_attention_are_refused_below_the_full_count(engine):
    # VisPruner reads a CLS query; VisionZip scores by received attention instead (test_qwen_visionzip.py)
    image = IMAGES["odd"]
    with pytest.raises(RequestError, match="divprune"):
        engine.generate(image, PROMPTS[0], token_budget=4, reducer="vispruner")
    # at the full count no reducer runs, so any reducer name is accepted
    assert engine.generate(image, PROMPTS[0], token_budget=10_000, reducer="vispruner",
                           max_new_tokens=2).reduction == "none"
    with pytest.raises(RequestError, match="batch"):
        engine.generate_batch([image, image], PROMPTS[:2], token_budget=10_000)


def test_max_pixels_bounds_the_full_count(tiny_qwen_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_qwen_model_dir), device="cpu", dtype="float32",
                                    max_new_tokens=4, reducer="divprune", max_pixels=9 * 28 * 28))
    try:
        assert engine.visual_tokens_full == 9
        output = engine.generate(IMAGES["astronaut"], PROMPTS[0])
        assert output.visual_tokens_full <= 9 and output.reduction == "none"
    finally:
        engine.close()
    with pytest.raises(ModelLoadError, match="min_pixels"):
        VlmEngine(EngineConfig(model=str(tiny_qwen_model_dir), device="cpu", max_pixels=100))


def test_several_images_refuse_a_reducer_that_needs_cls_attention(engine):
    images = [ImageInput(IMAGES["odd"], "rear"), ImageInput(IMAGES["coffee"], "front")]
    with pytest.raises(RequestError, match="divprune"):
        engine.generate_images(images, [PROMPTS[0]], token_budget=10, reducer="vispruner")
    assert engine.generate_images(images, [PROMPTS[0]], token_budget=10, max_new_tokens=2)[0].generated_tokens >= 1


@pytest.mark.parametrize("budget", [6, None])
def test_decode_batch_runs_qwen_rows_together_with_their_own_positions(engine, budget):
    """The node's worker decodes through DecodeBatch: Qwen2.5-VL rows (M-RoPE) of frames of different
    sizes decode together, each with its own positions, and answer as generate does, token for token."""
    cases = [(IMAGES["astronaut"], PROMPTS[0]), (IMAGES["coffee"], PROMPTS[1])]
    alone = [engine.generate(image, prompt, token_budget=budget, max_new_tokens=8) for image, prompt in cases]
    requests = [engine.open_request(image, [prompt], token_budget=budget, max_new_tokens=8)
                for image, prompt in cases]
    batch = engine.decode_batch(4)
    assert batch.admit(requests[0]) and batch.accepts and batch.admit(requests[1])
    assert len(batch) == 2
    ended = []
    while batch:
        ended += batch.step()
    assert sorted(map(id, ended)) == sorted(map(id, requests))
    assert [request.outputs[0].text for request in requests] == [output.text for output in alone]
