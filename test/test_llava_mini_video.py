"""LLaVA-Mini over several images (``VlmEngine.generate_images``) in the reference's video mode, on offline
tiny-mini checkpoints: logits against the video-mode computation built independently from the tensors,
the prompt layout, token accounting (C^2 per image, budgets do not apply), the per-image cache, and prefix
reuse that equals the from-scratch answer token for token in float32."""

import numpy as np
import pytest
import skimage.data
import torch
from llava_mini_reference import IMAGE_SENTINEL, reference_video_logits

from zip_vlm_ros.engine import EngineConfig, ImageInput, RequestError, SamplingOptions, VlmEngine
from zip_vlm_ros.models.llava_mini import average_over_frames, stretch_frame, video_block

# Square and non-square frames, so that the video-mode stretch to the tower's square input is exercised.
FRAMES = [getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]
QUESTION = "What changed between the images?"


def _engine(model_dir, **config) -> VlmEngine:
    # CPU even where CUDA exists: the tests compare exact token sequences in float32.
    return VlmEngine(EngineConfig(model=str(model_dir), device="cpu", max_new_tokens=8, **config))


@pytest.fixture(scope="module")
def engine(tiny_mini_model_dir):
    engine = _engine(tiny_mini_model_dir)
    yield engine
    engine.close()


def _adapter_video_logits(engine, images):
    """The engine's own multi-image path up to the LLM: its request checks and tokenization, the per-image
    encoding, the adapter's embed_prompt."""
    answerer = engine._multi_image
    request = answerer._request(images, [QUESTION], None, None, None)
    prefix_ids, suffix_ids = request.tokenized[0]
    with torch.inference_mode():
        encoded = answerer._encode(request.images, request.shares, request.counts, lambda *args: None)
        embedded = engine.family.embed_prompt(prefix_ids + suffix_ids, len(prefix_ids), encoded.visual)
        logits = engine.model(inputs_embeds=embedded.inputs_embeds).logits[0]
    return list(prefix_ids + suffix_ids), logits


@pytest.mark.parametrize("which", ["tiny-mini", "c2"])
@pytest.mark.parametrize("labels", [("", ""), ("front 1.0 s ago", "front 0.5 s ago", "front now")],
                         ids=["2-frames-unlabelled", "3-frames-labelled"])
def test_video_mode_logits_match_the_reference_in_float32(tiny_mini_model_dir, mini_c2_dir, which, labels):
    model_dir = tiny_mini_model_dir if which == "tiny-mini" else mini_c2_dir
    engine = _engine(model_dir)
    try:
        frames = FRAMES[:len(labels)]
        ids, logits = _adapter_video_logits(engine, [ImageInput(f, label) for f, label in zip(frames, labels)])
        # The reference's video prompt is "<image>\n{text}": the label line, if any, opens its text.
        text = QUESTION if not any(labels) else f"Images in order: {'; '.join(labels)}.\n{QUESTION}"
        expected_ids, expected = reference_video_logits(model_dir, frames, text)
        placeholder = engine.family.image_token_id
        per_frame = 1 if which == "tiny-mini" else 4
        assert ids.count(placeholder) == len(frames) * per_frame  # one run of every frame's tokens
        first = ids.index(placeholder)
        assert ids[first:first + len(frames) * per_frame] == [placeholder] * (len(frames) * per_frame)
        collapsed = ids[:first] + [IMAGE_SENTINEL] + ids[first + len(frames) * per_frame:]
        assert collapsed == expected_ids
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    finally:
        engine.close()


def test_one_frame_without_label_is_the_single_image_computation_on_the_stretched_frame(engine):
    """The video mode with one frame reduces to LLaVA-Mini's single-image path (nothing averaged)."""
    frame = FRAMES[1]
    crop = engine.image_processor.crop_size
    stretched = stretch_frame(frame, crop["height"], crop["width"])
    ids, logits = _adapter_video_logits(engine, [ImageInput(frame, "")])
    prefix_ids, suffix_ids = engine.prompts.tokenize(QUESTION, 1)
    assert ids == list(prefix_ids + suffix_ids)
    with torch.inference_mode():
        visual = engine.family.encode([stretched], 1)
        single = engine.model(inputs_embeds=engine.family.embed_prompt(ids, len(prefix_ids), visual)
                              .inputs_embeds).logits[0]
    torch.testing.assert_close(logits, single, atol=1e-5, rtol=1e-5)


def test_video_block_and_helpers():
    assert video_block(["rear", "front"], [1, 1], "<image>") == "<image><image>\nImages in order: rear; front."
    assert video_block(["", ""], [4, 4], "<i>") == "<i>" * 8
    assert video_block(["", "front"], [1, 1], "<i>") == "<i><i>\nImages in order: (unlabelled); front."
    states = [torch.full((2, 3), value, dtype=torch.float16) for value in (1.0, 2.0, 4.5)]
    averaged = average_over_frames(states)
    assert averaged.dtype == torch.float16 and torch.equal(averaged, torch.full((2, 3), 2.5, dtype=torch.float16))
    single = torch.randn(3, 5)
    assert torch.equal(average_over_frames([single]), single)
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    stretched = stretch_frame(image, 2, 3)  # nearest: rows 0, 2 and columns 0, 2, 4
    assert stretched.shape == (2, 3, 3) and np.array_equal(stretched, image[::2, ::2])
    assert stretch_frame(image, 4, 6) is image


def test_token_accounting_one_token_per_frame_and_budgets_do_not_apply(engine, monkeypatch):
    images = [ImageInput(frame, f"cam{index}") for index, frame in enumerate(FRAMES[:3])]
    fed = []
    forward = engine.model.forward

    def recording_forward(*args, inputs_embeds=None, **kwargs):
        fed.append(inputs_embeds.shape[1])
        return forward(*args, inputs_embeds=inputs_embeds, **kwargs)

    outputs = [engine.generate_images(images, [QUESTION], token_budget=budget)[0] for budget in (None, 1, 3, 10_000)]
    for output in outputs:
        assert (output.reduction, output.visual_tokens, output.visual_tokens_full, output.token_budget) == \
            ("llava-mini", 3, 3, 3)
        assert [(image.label, image.visual_tokens, image.token_budget, image.reduction) for image in output.images] \
            == [(f"cam{index}", 1, 1, "llava-mini") for index in range(3)]
    assert len({output.text for output in outputs}) == 1 and outputs[0].generated_tokens >= 1
    with pytest.raises(RequestError, match=r">= 1 \(ignored: LLaVA-Mini reads 1 per image\)"):
        engine.generate_images(images, [QUESTION], token_budget=0)
    # The LLM reads the prompt's text tokens and one token per frame.
    prefix_ids, suffix_ids = engine._multi_image._request(images, [QUESTION], None, None, None).tokenized[0]
    monkeypatch.setattr(engine.model, "forward", recording_forward)
    engine.generate_images(images, [QUESTION], max_new_tokens=1)
    assert fed == [len(prefix_ids) + len(suffix_ids)]
    assert (prefix_ids + suffix_ids).count(engine.family.image_token_id) == 3


@pytest.mark.parametrize("sampling", [None, SamplingOptions(do_sample=True, temperature=0.9, top_k=50, seed=5)],
                         ids=["greedy", "seeded-sampling"])
def test_reused_prefix_over_the_same_frames_equals_from_scratch(tiny_mini_model_dir, sampling):
    cached, uncached = _engine(tiny_mini_model_dir), _engine(tiny_mini_model_dir, prefix_cache_entries=0)
    try:
        history = [ImageInput(frame, f"front {3 - index}.0 s ago", key=("front", index))
                   for index, frame in enumerate(FRAMES[:3])]
        questions = ["Describe the scene.", "Is the café open?", QUESTION]
        first = cached.generate_images(history, questions[:1], sampling=sampling, max_new_tokens=12)[0]
        assert not first.prefix_reused and not any(image.cached for image in first.images)
        for question in questions:
            reused = cached.generate_images(history, [question], sampling=sampling, max_new_tokens=12)[0]
            scratch = uncached.generate_images(history, [question], sampling=sampling, max_new_tokens=12)[0]
            assert reused.prefix_reused and not scratch.prefix_reused
            assert reused.text == scratch.text and reused.generated_tokens == scratch.generated_tokens
        # Several questions in one call: the first pays for the prefix, the others reuse it.
        many = uncached.generate_images(history, questions, sampling=sampling, max_new_tokens=12)
        assert [output.prefix_reused for output in many] == [False, True, True]
        assert [output.text for output in many] == [cached.generate_images(history, [q], sampling=sampling,
                                                                           max_new_tokens=12)[0].text
                                                    for q in questions]
        # A history moved on by one frame: the seen frames come from the per-image cache, bit for bit.
        moved = history[1:] + [ImageInput(FRAMES[3], "front now", key=("front", 3))]
        relabelled = [ImageInput(item.image, label, item.key)
                      for item, label in zip(moved, ["front 2.0 s ago", "front 1.0 s ago", "front now"])]
        later = cached.generate_images(relabelled, [QUESTION], sampling=sampling, max_new_tokens=12)[0]
        assert [image.cached for image in later.images] == [True, True, False]
        fresh = _engine(tiny_mini_model_dir)
        try:
            assert fresh.generate_images(relabelled, [QUESTION], sampling=sampling,
                                         max_new_tokens=12)[0].text == later.text
        finally:
            fresh.close()
    finally:
        cached.close()
        uncached.close()
