"""One question over several images (zip_vlm_ros.engine.multi_image) on the offline tiny LLaVA-1.5 and LLaVA-NeXT
checkpoints: the budget split, token accounting, labels, stock equivalence, the per-image visual-token
cache, prefix reuse and its exactness, the context limit."""
import re

import numpy as np
import pytest
import skimage.data
import torch

from zip_vlm_ros.engine import EngineConfig, ImageInput, RequestError, VlmEngine
from zip_vlm_ros.engine.multi_image import split_total_budget
from zip_vlm_ros.engine.requests import check_context
from zip_vlm_ros.models.base import image_block

FRAMES = [getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat")]
FRAMES = [np.repeat(frame[..., None], 3, axis=2) if frame.ndim == 2 else frame for frame in FRAMES]
SURROUND = ["front", "front_left", "front_right", "back", "back_left", "back_right"]
FULL = 16  # the tiny presets: 56 px / patch 14 -> 16 patches per image ("default" strategy drops CLS)
QUESTION = "What changed between the images?"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    # CPU even where CUDA exists: these tests compare exact token sequences in float32.
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", max_new_tokens=8))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def next_engine(tiny_next_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_next_model_dir), device="cpu", max_new_tokens=8))
    yield engine
    engine.close()


def surround_inputs(keyed: bool = False) -> list[ImageInput]:
    return [ImageInput(frame, camera, key=(camera, 1) if keyed else None) for camera, frame in zip(SURROUND, FRAMES)]


class FedFeatures:
    """Records how many visual-token rows each prefill of the engine really feeds to the LLM."""

    def __init__(self, engine, monkeypatch):
        self.rows: list[int] = []
        original = engine.generator.prefill_prompt

        def recording(prefix_ids, suffix_ids, visual):
            rows = visual.features.shape[0]
            self.rows.append(rows)
            assert sum(token == engine.image_token_id for token in prefix_ids + suffix_ids) == rows == sum(visual.counts)
            return original(prefix_ids, suffix_ids, visual)
        monkeypatch.setattr(engine.generator, "prefill_prompt", recording)


# ---------------------------------------------------------------------- pure helpers

def test_split_total_budget_gives_the_remainder_to_the_first_images():
    assert split_total_budget(64, 6) == [11, 11, 11, 11, 10, 10]
    assert split_total_budget(384, 6) == [64] * 6
    assert split_total_budget(7, 7) == [1] * 7
    assert split_total_budget(5, 1) == [5]
    for total, count in ((100, 3), (17, 4), (1000, 7)):
        shares = split_total_budget(total, count)
        assert sum(shares) == total and max(shares) - min(shares) <= 1
    with pytest.raises(ValueError, match="6 images"):
        split_total_budget(5, 6)


def test_image_block_labels_each_image():
    assert image_block(["rear", "front"], [2, 1], "<image>") == "rear: <image><image>\nfront: <image>\n"
    assert image_block([""], [3], "<i>") == "<i><i><i>\n"


# ---------------------------------------------------------------------- token accounting

@pytest.mark.parametrize("total, expected_counts", [
    (48, [8] * 6),                       # 48 = 6 x 8
    (50, [9, 9, 8, 8, 8, 8]),            # the first 50 % 6 = 2 images get one more
    (6, [1] * 6),
    (90, [15] * 6),
    (200, [FULL] * 6),                   # larger than every image's full count: each image's full count
])
def test_visual_tokens_fed_are_the_budget_or_every_full_count(engine, monkeypatch, total, expected_counts):
    fed = FedFeatures(engine, monkeypatch)
    output = engine.generate_images(surround_inputs(), [QUESTION], token_budget=total, max_new_tokens=2)[0]
    assert fed.rows == [sum(expected_counts)]
    assert output.visual_tokens == sum(expected_counts) == min(total, FULL * 6)
    assert [image.visual_tokens for image in output.images] == expected_counts
    assert [image.token_budget for image in output.images] == split_total_budget(total, 6)
    assert [image.label for image in output.images] == SURROUND
    assert output.visual_tokens_full == FULL * 6
    assert output.reduction == ("none" if total >= FULL * 6 else "visionzip")
    assert {image.reduction for image in output.images} == {"none" if total >= FULL * 6 else "visionzip"}


def test_default_total_is_the_per_image_default_times_the_images(tiny_model_dir, monkeypatch):
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", token_budget=5, max_new_tokens=2))
    try:
        fed = FedFeatures(engine, monkeypatch)
        output = engine.generate_images(surround_inputs()[:3], [QUESTION])[0]
        assert fed.rows == [15] and output.token_budget == output.visual_tokens == 15
    finally:
        engine.close()


def test_labels_introduce_the_images_in_the_prompt(engine):
    prefix, suffix = engine.prompts.tokenize(QUESTION, 2, image_text=image_block(["rear", "front"], [1, 1],
                                                                                  engine.image_token))
    text = engine.tokenizer.decode(prefix)
    assert text.index("rear") < text.index("front")
    assert QUESTION in engine.tokenizer.decode(suffix)
    first = engine.generate_images([ImageInput(FRAMES[0], "rear"), ImageInput(FRAMES[1], "front")], [QUESTION],
                                   token_budget=8)[0]
    assert [image.label for image in first.images] == ["rear", "front"]


# ---------------------------------------------------------------------- exactness

def _stock_multi_image(engine, images, labels, prompt, max_new_tokens) -> list[int]:
    """New token ids from the stock processor (one <image> per image, expanded by it) + stock generate."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = engine.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    text = text.replace(engine.image_token, image_block(labels, [1] * len(images), engine.image_token))
    inputs = engine.processor(images=list(images), text=text, return_tensors="pt").to(engine.device)
    with torch.inference_mode():
        output = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs.input_ids.shape[1]:].tolist()


def test_full_budget_over_several_images_is_stock_generate(engine):
    inputs = surround_inputs()[:3]
    output = engine.generate_images(inputs, [QUESTION], token_budget=3 * FULL, max_new_tokens=8)[0]
    stock = _stock_multi_image(engine, [item.image for item in inputs], [item.label for item in inputs],
                               QUESTION, 8)
    assert output.text == engine.tokenizer.decode(stock, skip_special_tokens=True).strip()
    assert output.generated_tokens == len(stock)


def test_history_reencodes_only_new_frames_and_matches_from_scratch(engine):
    engine.clear_prefix_cache()
    history = [ImageInput(frame, f"front {age:.1f} s ago", key=("front", seq))
               for seq, (frame, age) in enumerate(zip(FRAMES[:5], (4.0, 3.0, 2.0, 1.0, 0.0)))]
    seen = engine.generate_images(history[:4], [QUESTION], token_budget=24)[0]
    assert [image.cached for image in seen.images] == [False] * 4
    assert engine.visual_cache_bytes > 0
    # The next question: three frames seen before plus a new one.
    later = engine.generate_images(history[1:], [QUESTION, "Is anyone there?"], token_budget=24)
    assert [image.cached for image in later[0].images] == [True, True, True, False]
    assert not later[0].prefix_reused and later[1].prefix_reused
    assert later[1].vision_ms == 0
    scratch = engine.generate_images([ImageInput(item.image, item.label) for item in history[1:]],
                                     [QUESTION, "Is anyone there?"], token_budget=24)
    assert [output.text for output in later] == [output.text for output in scratch]
    assert [output.generated_tokens for output in later] == [output.generated_tokens for output in scratch]
    assert not any(image.cached for image in scratch[0].images)


def test_same_images_again_reuse_the_prefix_exactly(engine):
    engine.clear_prefix_cache()
    inputs = surround_inputs(keyed=True)
    first = engine.generate_images(inputs, [QUESTION], token_budget=30)[0]
    again = engine.generate_images(inputs, ["Where is the cat?", QUESTION], token_budget=30)
    assert not first.prefix_reused and all(output.prefix_reused for output in again)
    assert again[1].text == first.text
    scratch = engine.generate_images(surround_inputs(), ["Where is the cat?"], token_budget=30)[0]
    assert again[0].text == scratch.text and not scratch.prefix_reused
    # A different budget is a different prefix.
    assert not engine.generate_images(inputs, [QUESTION], token_budget=31)[0].prefix_reused


def test_the_images_matter(engine):
    texts = {engine.generate_images([ImageInput(FRAMES[a], "front"), ImageInput(FRAMES[b], "rear")], [QUESTION],
                                    token_budget=16, max_new_tokens=8)[0].text for a, b in ((0, 1), (2, 3), (4, 5))}
    assert len(texts) > 1


# ---------------------------------------------------------------------- refusals

def test_context_overflow_is_refused_with_the_numbers(engine):
    # Tiny preset: a context of 1024 tokens; 6 full images are 96 visual tokens.
    with pytest.raises(RequestError) as error:
        engine.generate_images(surround_inputs(), [QUESTION], token_budget=6 * FULL, max_new_tokens=1000)
    message = str(error.value)
    assert "6 images need 96 visual tokens" in message and "context of 1024" in message
    assert "max_new_tokens 1000" in message


OVERFLOW = re.compile(r"^(\d+) images? needs? (\d+) visual tokens; with the prompt's (\d+) text tokens and "
                      r"max_new_tokens (\d+) that is (\d+) tokens, more than the model's context of 1024: "
                      r"use max_new_tokens <= (\d+), or lower token_budget")


def test_one_image_and_several_refuse_a_context_overflow_with_the_same_check(engine):
    """max_new_tokens = context - one full image (what the node's parameter allows) leaves no room for
    the question's text: one image and several are refused alike, with numbers that add up."""
    max_new = 1024 - FULL
    single = OVERFLOW.match(_request_error(lambda: engine.generate(FRAMES[0], QUESTION, token_budget=FULL,
                                                                   max_new_tokens=max_new)))
    several = OVERFLOW.match(_request_error(lambda: engine.generate_images(
        surround_inputs()[:2], [QUESTION], token_budget=2 * FULL, max_new_tokens=max_new)))
    batch = OVERFLOW.match(_request_error(lambda: engine.generate_batch(
        [FRAMES[0], FRAMES[1]], [QUESTION, QUESTION], token_budget=FULL, max_new_tokens=max_new)))
    for match, images in ((single, 1), (several, 2), (batch, 1)):
        count, visual, text, asked, total, room = map(int, match.groups())
        assert (count, visual, asked) == (images, images * FULL, max_new)
        assert total == visual + text + asked and room == 1024 - visual - text
        # the largest answer the message names fits: the boundary is exact
        check_context(visual + text, visual, room, 1024)
        with pytest.raises(RequestError):
            check_context(visual + text, visual, room + 1, 1024)
    # the multi-image prompt adds its labels to the text tokens
    assert int(several.group(3)) > int(single.group(3))


def _request_error(call) -> str:
    with pytest.raises(RequestError) as error:
        call()
    return str(error.value)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(token_budget=5), "at least one visual token|>= 6"),
    (dict(token_budget=0), ">= 6"),
    (dict(token_budget=2.5), "whole number"),
])
def test_bad_budgets_are_refused(engine, kwargs, expected):
    with pytest.raises(RequestError, match=expected):
        engine.generate_images(surround_inputs(), [QUESTION], **kwargs)


def test_bad_images_are_refused(engine):
    with pytest.raises(RequestError, match="non-empty list"):
        engine.generate_images([], [QUESTION])
    with pytest.raises(RequestError, match=r"images\[1\]"):
        engine.generate_images([ImageInput(FRAMES[0], "a"), FRAMES[1]], [QUESTION])
    with pytest.raises(RequestError, match="label"):
        engine.generate_images([ImageInput(FRAMES[0], f"a {engine.image_token}")], [QUESTION])
    with pytest.raises(RequestError, match="hashable"):
        engine.generate_images([ImageInput(FRAMES[0], "a", key=["list"])], [QUESTION])
    with pytest.raises(RequestError, match="HxWx3"):
        engine.generate_images([ImageInput(FRAMES[0][..., 0], "a")], [QUESTION])
    # The engine stays usable.
    assert engine.generate_images([ImageInput(FRAMES[0], "a")], [QUESTION], token_budget=4)[0].text is not None


# ---------------------------------------------------------------------- LLaVA-NeXT: the base image only

def test_llava_next_reads_each_images_base_image_only(next_engine, monkeypatch):
    assert next_engine.family.base_tokens_full == FULL
    fed = FedFeatures(next_engine, monkeypatch)
    reduced = next_engine.generate_images(surround_inputs()[:3], [QUESTION], token_budget=20)[0]
    full = next_engine.generate_images(surround_inputs()[:3], [QUESTION], token_budget=1000)[0]
    assert fed.rows == [20, 3 * FULL]
    assert [image.visual_tokens for image in reduced.images] == [7, 7, 6]
    assert full.visual_tokens_full == 3 * FULL and full.reduction == "none"


def test_llava_next_full_base_tokens_are_the_stock_base_features(next_engine):
    image = FRAMES[0]
    visual = next_engine.family.encode_base(image, FULL)
    pixels = next_engine.family.preprocess([image])
    with torch.inference_mode():
        stock = next_engine.model.model.get_image_features(
            pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"],
            vision_feature_layer=next_engine.family.feature_layer,
            vision_feature_select_strategy=next_engine.family.select_strategy).pooler_output[0]
    # Stock AnyRes packing puts the base image's patches first, then the unpadded grid.
    # (one crop alone here, all crops in one batch there: float rounding apart)
    torch.testing.assert_close(visual.features, stock[:FULL], rtol=1e-4, atol=1e-4)
    assert visual.counts == [FULL] and visual.reductions == ["none"]
