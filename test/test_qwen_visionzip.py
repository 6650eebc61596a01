"""VisionZip and provenance on the offline tiny Qwen2.5-VL checkpoint: received-attention scores and the
kept set against a naive full attention map, stock positions (kept and contextual tokens), exact prefix
reuse, the frame cells each token stands for, and a node run with reducer visionzip."""
import numpy as np
import pytest
import skimage.data
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from node_helpers import publish_frame, running_node
from zip_vlm_ros.client import wait_until
from zip_vlm_ros.engine import EngineConfig, VlmEngine
from zip_vlm_ros.engine.overlay import DIM, draw_overlay
from zip_vlm_ros.engine.requests import ImageInput
from zip_vlm_ros.models.qwen_tower_scores import encode_with_received_attention, scoring_layer
from zip_vlm_ros.node.conversions import rgb_to_image
from zip_vlm_ros.reducers import split_budget

# 100x130 resizes to 112x140 (a 4x5 grid of merged tokens); coffee 400x600 to a 4x7 grid (max_pixels 36 * 784).
ODD = np.ascontiguousarray(skimage.data.astronaut()[100:200, 200:330])
COFFEE = skimage.data.coffee()
PROMPTS = ["What is in the image?", "Describe the scene in detail, please.", "Is the path clear?"]


@pytest.fixture(scope="module")
def engine(tiny_qwen_model_dir):
    # CPU float32: these tests compare exact token sequences and positions.
    engine = VlmEngine(EngineConfig(model=str(tiny_qwen_model_dir), device="cpu", dtype="float32",
                                    max_new_tokens=8, reducer="visionzip"))
    yield engine
    engine.close()


def _window_order(rows: int, columns: int, window: int) -> list[int]:
    """Qwen2.5-VL's window attention order of a rows x columns grid of merged tokens, from its definition:
    windows of `window` x `window` tokens (smaller at the right and bottom edges) in raster order, tokens
    in raster order inside each window. Entry i is the raster index of the token at window position i."""
    return [row * columns + column
            for top in range(0, rows, window) for left in range(0, columns, window)
            for row in range(top, min(top + window, rows)) for column in range(left, min(left + window, columns))]


def _naive_scores(engine, images) -> list[torch.Tensor]:
    """Per image ``[merged]`` received attention at the scoring layer from the full softmax map of every
    head (float64), un-permuted with ``_window_order`` and averaged over each token's four patches."""
    model = engine.model.model
    visual = model.visual
    attention = visual.blocks[scoring_layer(visual)].attn
    calls = []
    handle = attention.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)),
                                                 with_kwargs=True)
    pixels = engine.family.preprocess(images)
    try:
        with torch.inference_mode():
            model.get_image_features(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
    finally:
        handle.remove()
    (hidden,), kwargs = calls[0]
    with torch.inference_mode():
        qkv = attention.qkv(hidden).reshape(hidden.shape[0], 3, attention.num_heads, -1)
        queries, keys = apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], *kwargs["position_embeddings"])
    window = visual.window_size // visual.patch_size // visual.spatial_merge_size
    scores, start = [], 0
    for _, height, width in pixels["image_grid_thw"].tolist():
        patches = height * width
        q = queries[start:start + patches].double().transpose(0, 1)  # [heads, patches, head_dim]
        k = keys[start:start + patches].double().transpose(0, 1)
        full_map = torch.softmax(q @ k.transpose(1, 2) * attention.scaling, dim=-1)  # [heads, patches, patches]
        per_patch = full_map.mean(dim=(0, 1))  # received: mean over heads and queries
        per_window_token = per_patch.view(-1, 4).mean(dim=1)
        order = _window_order(height // 2, width // 2, window)
        stock = torch.empty_like(per_window_token)
        stock[torch.tensor(order)] = per_window_token
        scores.append(stock)
        start += patches
    return scores


def test_chunked_scores_equal_the_naive_full_map(engine):
    images = [ODD, COFFEE]  # one call, two images: the tower's per-image attention and window offsets
    naive = _naive_scores(engine, images)
    pixels = engine.family.preprocess(images)
    with torch.inference_mode():
        stock = engine.model.model.get_image_features(pixel_values=pixels["pixel_values"],
                                                      image_grid_thw=pixels["image_grid_thw"]).pooler_output
        for chunk in (1, 7, 10_000):  # one query at a time, a partial last chunk, the whole image at once
            tower = encode_with_received_attention(engine.model.model, pixels["pixel_values"],
                                                   pixels["image_grid_thw"], chunk=chunk)
            for features, expected_features, scores, expected in zip(tower.features, stock, tower.scores, naive):
                torch.testing.assert_close(features, expected_features, rtol=0, atol=0)
                torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-7)
    assert [len(scores) for scores in naive] == [20, 28]


@pytest.mark.parametrize("image, budget", [(ODD, 5), (ODD, 13), (COFFEE, 9)])
def test_kept_set_is_the_naive_top_scored_tokens(engine, image, budget):
    naive = _naive_scores(engine, [image])[0]
    dominant, contextual = split_budget(budget, engine.family.contextual_ratio)
    expected = sorted(torch.sort(naive, descending=True, stable=True).indices[:dominant].tolist())
    pixels = engine.family.preprocess([image])
    with torch.inference_mode():
        stock = engine.model.model.get_image_features(pixel_values=pixels["pixel_values"],
                                                      image_grid_thw=pixels["image_grid_thw"]).pooler_output[0]
        visual = engine.family.encode([image], budget, "visionzip")
    assert visual.counts == [budget] and visual.reductions == ["visionzip"]
    assert visual.kept[0][:dominant].tolist() == expected
    torch.testing.assert_close(visual.features[:dominant], stock[expected], rtol=0, atol=0)
    # contextual tokens: targets evenly spaced over the remainder (raster order), each its target + the
    # mean of its members
    remainder = [index for index in range(len(stock)) if index not in expected]
    step = max(1, len(remainder) // contextual)
    targets = remainder[::step][:contextual]
    assert visual.kept[0][dominant:].tolist() == targets
    provenance = visual.provenance[0]
    cells = provenance.token_of_patch[0].ravel()
    for token, target in enumerate(targets, start=dominant):
        members = [index for index in np.nonzero(cells == token)[0] if index != target]
        expected_token = stock[target] + (stock[members].mean(dim=0) if members else 0)
        torch.testing.assert_close(visual.features[token], expected_token, rtol=1e-5, atol=1e-6)


def _stock_inputs(engine, image, prompt: str):
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    text = engine.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                tokenize=False)
    return engine.processor(images=[image], text=text, return_tensors="pt")


def test_tokens_sit_at_stock_positions_and_text_continues_as_after_the_full_image(engine):
    image, prompt, budget = ODD, PROMPTS[2], 9
    inputs = _stock_inputs(engine, image, prompt)
    stock_positions = engine.model.model.get_rope_index(inputs.input_ids, inputs.mm_token_type_ids,
                                                        image_grid_thw=inputs.image_grid_thw)[0][:, 0]
    with torch.inference_mode():
        visual = engine.family.encode([image], budget, "visionzip")
    prefix_ids, suffix_ids = engine.prompts.tokenize(prompt, budget)
    ids = list(prefix_ids + suffix_ids)
    positions = engine.family.embed_prompt(ids, len(prefix_ids), visual).position_ids[:, 0]
    stock_ids = inputs.input_ids[0].tolist()
    start, full = stock_ids.index(engine.image_token_id), 20
    dominant, _ = split_budget(budget, engine.family.contextual_ratio)
    anchors = visual.kept[0]
    assert anchors[:dominant].tolist() == sorted(anchors[:dominant].tolist())  # dominant tokens in raster order
    assert torch.equal(positions[:, :start], stock_positions[:, :start])
    # dominant tokens at their own stock (t, h, w), contextual tokens at their target's
    assert torch.equal(positions[:, start:start + budget], stock_positions[:, start + anchors])
    assert torch.equal(positions[:, start + budget:], stock_positions[:, start + full:])


@pytest.mark.parametrize("budget", [7, 10_000])
def test_reused_prefix_answers_as_from_scratch(engine, budget):
    singles = [engine.generate(COFFEE, prompt, token_budget=budget) for prompt in PROMPTS]
    many = engine.generate_many(COFFEE, PROMPTS, token_budget=budget, frame_key=("qwen-visionzip", budget))
    assert [o.text for o in many] == [o.text for o in singles]
    assert [o.prefix_reused for o in many] == [False, True, True]
    assert many[0].reduction == ("visionzip" if budget == 7 else "none")
    again = engine.generate(COFFEE, PROMPTS[1], token_budget=budget, frame_key=("qwen-visionzip", budget))
    assert again.prefix_reused and again.text == singles[1].text


def test_labelled_images_with_cached_tokens_answer_as_uncached(engine):
    images = [ImageInput(ODD, "rear", key="rear"), ImageInput(COFFEE, "front", key="front")]
    fresh = engine.generate_images([ImageInput(item.image, item.label) for item in images], PROMPTS[:2],
                                   token_budget=10)
    first = engine.generate_images(images, PROMPTS[:2], token_budget=10)
    second = engine.generate_images(images, PROMPTS[:2], token_budget=10)
    assert [o.text for o in first] == [o.text for o in second] == [o.text for o in fresh]
    assert [(image.visual_tokens, image.reduction) for image in first[0].images] == [(5, "visionzip")] * 2
    assert second[0].prefix_reused


@pytest.mark.parametrize("reducer, budget", [("visionzip", 7), ("divprune", 7), ("visionzip", 10_000)])
def test_provenance_traces_each_token_to_its_frame_cells(engine, reducer, budget):
    output = engine.generate(ODD, PROMPTS[0], token_budget=budget, reducer=reducer, max_new_tokens=2)
    provenance = output.provenance
    crop = provenance.crops[0]
    # the whole 100x130 frame, in the 4x5 grid of merged tokens (each cell: the 2x2 patches one token joins)
    assert len(provenance.crops) == 1 and (crop.top, crop.left, crop.height, crop.width) == (0.0, 0.0, 100.0, 130.0)
    assert crop.grid == (4, 5) and provenance.token_of_patch.shape == (1, 4, 5)
    assert provenance.visual_tokens == output.visual_tokens
    cells = provenance.token_of_patch[0]
    owners = cells[cells >= 0]
    assert np.array_equal(np.bincount(owners, minlength=output.visual_tokens), provenance.group_sizes)
    if budget > 20:
        assert np.array_equal(cells.ravel(), np.arange(20))
        return
    visual = engine.family.encode([ODD], budget, reducer)
    dominant = split_budget(budget, engine.family.contextual_ratio)[0] if reducer == "visionzip" else budget
    for token, cell in enumerate(visual.kept[0][:dominant].tolist()):
        assert provenance.group_sizes[token] == 1 and cells.ravel()[cell] == token  # a kept token: its own cell
    if reducer == "visionzip":  # contextual groups cover every other cell, each holding its target
        assert (cells >= 0).all() and provenance.group_sizes.sum() == 20
        for token, target in enumerate(visual.kept[0][dominant:].tolist(), start=dominant):
            assert cells.ravel()[target] == token
    else:
        assert (cells >= 0).sum() == budget
    overlay = draw_overlay(ODD, provenance)
    # a kept cell's centre is the frame's own pixel; a dropped cell's (DivPrune) is dimmed
    for cell in range(20):
        row, column = divmod(cell, 5)
        y, x = int((row + 0.5) * 25), int((column + 0.5) * 26)
        token = cells.ravel()[cell]
        if token >= 0 and provenance.group_sizes[token] == 1:
            assert np.array_equal(overlay[y, x], ODD[y, x])
        elif token < 0:
            assert np.array_equal(overlay[y, x], (ODD[y, x].astype(np.uint32) * DIM // 256).astype(np.uint8))


def test_node_serves_visionzip_on_qwen(tiny_qwen_model_dir, tmp_path):
    namespace = "/qwen_visionzip"
    parameters = {"model": str(tiny_qwen_model_dir), "cameras": ["front"], "token_budget": 7, "max_new_tokens": 3,
                  "max_image_age_s": 0.0, "request_timeout_s": 120.0, "reducer": "visionzip",
                  "publish_visual_tokens": True}
    from sensor_msgs.msg import Image

    with running_node(parameters, tmp_path / "node.log", namespace=namespace) as (_, client):
        overlays = client.collect(Image, f"{namespace}/zip_vlm/visual_tokens/image")
        publish_frame(client, f"{namespace}/image_raw", rgb_to_image(COFFEE))
        assert wait_until(lambda: client.describe().success, 30)
        many = client.ask_many(PROMPTS[:2])
        assert many.success, many.message
        assert [(r.reduction, r.visual_tokens, r.prefix_reused) for r in many.results] == [
            ("visionzip", 7, True), ("visionzip", 7, True)]
        refused = client.ask("What is it?", reducer="vispruner")
        assert not refused.success and "divprune, visionzip" in refused.message, refused.message
        full = client.ask("What is it?", token_budget=36)  # the most the node accepts: at or above the full count
        assert full.success and full.result.reduction == "none", full.message
        assert wait_until(lambda: len(overlays) >= 4, 30), f"{len(overlays)} overlays arrived"
        assert (overlays[0].height, overlays[0].width) == COFFEE.shape[:2]
