"""Tests for VisionZip (zip_vlm_ros.reducers.visionzip): hand-computed cases, and the CLIP encoder paths that
feed it (zip_vlm_ros.models.clip_features) on a tiny CLIP."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from zip_vlm_ros.models.clip_features import encode_for_visionzip, encode_reference_style
from zip_vlm_ros.reducers.visionzip import split_budget, visionzip_compress

# ---------------------------------------------------------------------------------------------
# One image, CLS + 6 patches (positions 0..6), hidden size 2, head_dim 2, two heads.
# Hidden state of token i is [i, 10 i], so every output row tells which tokens went into it.
HIDDEN = torch.tensor([[[float(i), 10.0 * i] for i in range(7)]])  # [1, 7, 2]
# CLS attention over patches 1..6, split over two heads; summed over heads it is
#   patch:  1     2     3     4     5     6
#   sum:   0.05  0.30  0.10  0.30  0.05  0.20      (2 and 4 tie for first place)
CLS_ATTENTION = torch.tensor([[[0.05, 0.10, 0.10, 0.20, 0.00, 0.15], [0.00, 0.20, 0.00, 0.10, 0.05, 0.05]]])
# Keys (unnormalised). Token 1 points along x with a large norm, token 5 along y with a small one.
# Token 3 has the larger dot product with token 1 (3.0 > 2.0) but the larger cosine with token 5,
# so only a cosine merge sends it to 5. Token 6 is closest to token 1.
KEYS = torch.tensor(
    [[[9.0, 9.0], [30.0, 0.0], [5.0, 5.0], [0.1, 2.0], [5.0, 5.0], [0.0, 1.0], [3.0, 0.5]]]
)


def hidden(*token_ids):
    """Hidden state of one token ``[2]``, or of several ``[len, 2]``."""
    rows = HIDDEN[0, list(token_ids)]
    return rows[0] if len(token_ids) == 1 else rows


def test_dominant_keeps_cls_and_top_patches_in_sequence_order():
    # dominant=3: CLS + patches 2 and 4 (sum 0.30 each); remainder [1, 3, 5, 6], R=4,
    # contextual=2: step 4 // 2 = 2, targets at remainder positions 0 and 2 = tokens 1 and 5;
    # token 3 joins 5 (cosine), token 6 joins 1.
    tokens, dominant_indices = visionzip_compress(HIDDEN, CLS_ATTENTION, KEYS, dominant=3, contextual=2)
    assert dominant_indices.tolist() == [[0, 2, 4]]
    expected = torch.stack(
        [hidden(0), hidden(2), hidden(4), hidden(1) + hidden(6), hidden(5) + hidden(3)]
    )
    torch.testing.assert_close(tokens[0], expected)


def test_top_k_tie_goes_to_lower_patch_index():
    # Patches 2 and 4 tie at 0.30; with room for one patch, 2 wins.
    _, dominant_indices = visionzip_compress(HIDDEN, CLS_ATTENTION, KEYS, dominant=2, contextual=0)
    assert dominant_indices.tolist() == [[0, 2]]
    # All-equal attention: the lowest patches win.
    flat = torch.full_like(CLS_ATTENTION, 0.1)
    _, dominant_indices = visionzip_compress(HIDDEN, flat, KEYS, dominant=4, contextual=0)
    assert dominant_indices.tolist() == [[0, 1, 2, 3]]


def test_top_k_ties_at_llava_size_go_to_lower_indices():
    # 576 patches, every third one (patches 1, 4, 7, ...) tied at the top: a plain sort or topk
    # returns them in no particular order here; the first 53 must be chosen.
    attention = torch.zeros(2, 1, 576)
    attention[:, :, ::3] = 1.0
    hidden_states = torch.randn(2, 577, 4)
    _, dominant_indices = visionzip_compress(hidden_states, attention, torch.randn(2, 577, 4), 54, 10)
    assert dominant_indices[0].tolist() == [0] + list(range(1, 160, 3))
    assert torch.equal(dominant_indices[0], dominant_indices[1])


def test_contextual_is_target_plus_mean_of_joined_tokens():
    # contextual=1: the one target is remainder position 0 = token 1; tokens 3, 5, 6 all join it.
    tokens, _ = visionzip_compress(HIDDEN, CLS_ATTENTION, KEYS, dominant=3, contextual=1)
    torch.testing.assert_close(tokens[0, 3], hidden(1) + (hidden(3) + hidden(5) + hidden(6)) / 3)
    assert tokens.shape == (1, 4, 2)


def test_step_uses_floor_of_remainder_over_contextual():
    # dominant=2 keeps CLS + patch 2; remainder [1, 3, 4, 5, 6], R=5, contextual=2: step 5 // 2 = 2,
    # targets at remainder positions 0 and 2 = tokens 1 and 4 (not 6).
    # Token 3 [0.1, 2] vs token 4 [5, 5]: cosine 0.74 > vs token 1 [30, 0]: 0.05 -> joins 4.
    # Token 5 [0, 1] -> joins 4 (0.71 > 0). Token 6 [3, 0.5] -> joins 1 (0.99 > 0.81).
    tokens, dominant_indices = visionzip_compress(HIDDEN, CLS_ATTENTION, KEYS, dominant=2, contextual=2)
    assert dominant_indices.tolist() == [[0, 2]]
    torch.testing.assert_close(tokens[0, 2], hidden(1) + hidden(6))
    torch.testing.assert_close(tokens[0, 3], hidden(4) + (hidden(3) + hidden(5)) / 2)


def test_cosine_tie_goes_to_earlier_target():
    # Targets tokens 1 [30, 0] and 5 [0, 1]; token 3 gets key [1, 1], equally close to both -> joins 1.
    keys = KEYS.clone()
    keys[0, 3] = torch.tensor([1.0, 1.0])
    tokens, _ = visionzip_compress(HIDDEN, CLS_ATTENTION, keys, dominant=3, contextual=2)
    torch.testing.assert_close(tokens[0, 3], hidden(1) + (hidden(3) + hidden(6)) / 2)
    torch.testing.assert_close(tokens[0, 4], hidden(5))  # nobody joined: + 0


def test_contextual_zero_returns_only_dominant_tokens():
    tokens, dominant_indices = visionzip_compress(HIDDEN, CLS_ATTENTION, KEYS, dominant=3, contextual=0)
    torch.testing.assert_close(tokens[0], torch.stack([hidden(0), hidden(2), hidden(4)]))
    assert dominant_indices.shape == (1, 3)


def test_contextual_equal_to_remainder_keeps_every_token_unmerged():
    tokens, _ = visionzip_compress(HIDDEN, CLS_ATTENTION, KEYS, dominant=3, contextual=4)
    torch.testing.assert_close(tokens[0], hidden(0, 2, 4, 1, 3, 5, 6))


def test_batch_rows_select_independently():
    # Row 1 prefers patches 6 and 5; its CLS-first order and merges differ from row 0.
    # Row 1 remainder [1, 2, 3, 4], targets tokens 1 and 3; token 2 [5, 5] has cosine 0.71 with 1
    # and 0.73 with 3 [0.1, 2] -> joins 3; token 4 [5, 5] likewise -> joins 3.
    attention_row1 = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 0.2, 0.4], [0.1, 0.0, 0.1, 0.0, 0.1, 0.1]]])
    hidden_states = torch.cat([HIDDEN, HIDDEN * 2])
    tokens, dominant_indices = visionzip_compress(
        hidden_states, torch.cat([CLS_ATTENTION, attention_row1]), torch.cat([KEYS, KEYS]), dominant=3, contextual=2
    )
    assert dominant_indices.tolist() == [[0, 2, 4], [0, 5, 6]]
    torch.testing.assert_close(tokens[0, 3:], torch.stack([hidden(1) + hidden(6), hidden(5) + hidden(3)]))
    expected_row1 = 2 * torch.stack(
        [hidden(0), hidden(5), hidden(6), hidden(1), hidden(3) + (hidden(2) + hidden(4)) / 2]
    )
    torch.testing.assert_close(tokens[1], expected_row1)


def test_cls_is_first_even_with_no_patch_attention():
    tokens, dominant_indices = visionzip_compress(HIDDEN, torch.zeros(1, 2, 6), KEYS, dominant=1, contextual=3)
    assert dominant_indices.tolist() == [[0]]
    torch.testing.assert_close(tokens[0, 0], hidden(0))


def test_keeps_dtype_of_hidden_states():
    tokens, _ = visionzip_compress(
        HIDDEN.to(torch.bfloat16), CLS_ATTENTION.to(torch.bfloat16), KEYS.to(torch.bfloat16), 3, 2
    )
    assert tokens.dtype == torch.bfloat16
    torch.testing.assert_close(tokens[0, 3].float(), hidden(1) + hidden(6))


@pytest.mark.parametrize(
    ("dominant", "contextual", "message"),
    [
        (0, 2, "dominant=0"),
        (8, 0, "dominant=8"),
        (5, 3, "contextual=3"),  # remainder has only 2 tokens
        (3, -1, "contextual=-1"),
    ],
)
def test_impossible_explicit_split_is_a_clear_error(dominant, contextual, message):
    with pytest.raises(ValueError, match=message):
        visionzip_compress(HIDDEN, CLS_ATTENTION, KEYS, dominant, contextual)


def test_mismatched_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match="cls_attention must be"):
        visionzip_compress(HIDDEN, CLS_ATTENTION[:, :, :5], KEYS, 3, 2)
    with pytest.raises(ValueError, match="keys must be"):
        visionzip_compress(HIDDEN, CLS_ATTENTION, KEYS[:, :6], 3, 2)
    with pytest.raises(ValueError, match="hidden_states must be"):
        visionzip_compress(HIDDEN[0], CLS_ATTENTION, KEYS, 3, 2)


@pytest.mark.parametrize(
    ("budget", "split"), [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)), (32, (27, 5)), (1, (1, 0)), (4, (3, 1))]
)
def test_split_budget_matches_paper(budget, split):
    assert split_budget(budget) == split


def test_split_budget_options_and_errors():
    assert split_budget(64, contextual_ratio=0.0) == (64, 0)
    assert split_budget(2, contextual_ratio=0.9) == (1, 1)  # CLS always stays dominant
    with pytest.raises(ValueError, match="token_budget=0 .* >= 1"):
        split_budget(0)
    with pytest.raises(ValueError, match="token_budget=-5"):
        split_budget(-5)
    with pytest.raises(ValueError, match="not an integer"):
        split_budget(6.5)
    with pytest.raises(ValueError, match="contextual_ratio=1.0"):
        split_budget(64, contextual_ratio=1.0)


# ---------------------------------------------------------------------------------------------
# Encoder paths on a tiny random CLIP vision tower: 4 layers, 4 heads, 28x28 images of 7x7 patches.


@pytest.fixture(scope="module")
def tiny_tower():
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=28, patch_size=7
    )
    tower = CLIPVisionModel(config).eval()
    assert tower.config._attn_implementation == "sdpa"
    return tower


@pytest.fixture(scope="module")
def pixel_values():
    torch.manual_seed(1)
    return torch.randn(2, 3, 28, 28)


def straightforward_features(tower, pixel_values, feature_layer):
    """Independent computation from the full eager attention maps of a copy of the tower."""
    eager = CLIPVisionModel(tower.config.__class__(**tower.config.to_dict())).eval()
    eager.load_state_dict(tower.state_dict())
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        outputs = eager(pixel_values, output_hidden_states=True, output_attentions=True)
        num_layers = len(eager.encoder.layers)
        index = feature_layer % (num_layers + 1)
        layer = eager.encoder.layers[index - 1]
        layer_input = outputs.hidden_states[index - 1]
        batch_size, seq_length, hidden_size = layer_input.shape
        keys = layer.self_attn.k_proj(layer.layer_norm1(layer_input)).view(batch_size, seq_length, 4, hidden_size // 4)
        return outputs.hidden_states[index], outputs.attentions[index - 1][:, :, 0, 1:], keys.mean(dim=2)


@pytest.mark.parametrize("feature_layer", [-2, -1, 1, 3])
def test_fast_path_matches_eager_attention_maps(tiny_tower, pixel_values, feature_layer):
    features = encode_for_visionzip(tiny_tower, pixel_values, feature_layer)
    with torch.no_grad():
        stock = tiny_tower(pixel_values, output_hidden_states=True).hidden_states[feature_layer]
    torch.testing.assert_close(features.hidden_states, stock, atol=1e-5, rtol=1e-5)

    hidden_states, cls_attention, keys = straightforward_features(tiny_tower, pixel_values, feature_layer)
    assert features.cls_attention.shape == (2, 4, 16) and features.keys.shape == (2, 17, 8)
    torch.testing.assert_close(features.hidden_states, hidden_states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.cls_attention, cls_attention, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(features.keys, keys, atol=1e-5, rtol=1e-5)

    reference = encode_reference_style(tiny_tower, pixel_values, feature_layer)
    assert tiny_tower.config._attn_implementation == "sdpa"  # restored
    for fast, slow in zip(features, reference):
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    fast_tokens, fast_indices = visionzip_compress(*features, dominant=6, contextual=3)
    reference_tokens, reference_indices = visionzip_compress(*reference, dominant=6, contextual=3)
    assert torch.equal(fast_indices, reference_indices)
    torch.testing.assert_close(fast_tokens, reference_tokens, atol=1e-5, rtol=1e-5)


def test_fast_path_skips_later_layers_and_attention_maps(tiny_tower, pixel_values):
    layer_calls = [0] * 4
    attention_weights = []
    handles = []

    def count_call(index):
        def hook(module, args, output):
            layer_calls[index] += 1

        return hook

    for index, layer in enumerate(tiny_tower.encoder.layers):
        handles.append(layer.register_forward_hook(count_call(index)))
        handles.append(layer.self_attn.register_forward_hook(lambda m, a, o: attention_weights.append(o[1])))
    try:
        encode_for_visionzip(tiny_tower, pixel_values, feature_layer=-2)
    finally:
        for handle in handles:
            handle.remove()
    assert layer_calls == [1, 1, 1, 0]
    assert attention_weights == [None, None, None]  # SDPA everywhere: no maps materialised


def test_fast_path_under_bfloat16(tiny_tower, pixel_values):
    tower = CLIPVisionModel(tiny_tower.config).eval()
    tower.load_state_dict(tiny_tower.state_dict())
    tower.to(torch.bfloat16)
    features = encode_for_visionzip(tower, pixel_values.to(torch.bfloat16))
    with torch.no_grad():
        stock = tower(pixel_values.to(torch.bfloat16), output_hidden_states=True).hidden_states[-2]
    assert features.hidden_states.dtype == torch.bfloat16 and features.cls_attention.dtype == torch.float32
    torch.testing.assert_close(features.hidden_states, stock)
    full_precision = encode_for_visionzip(tiny_tower, pixel_values)
    torch.testing.assert_close(features.cls_attention, full_precision.cls_attention, atol=2e-2, rtol=0)
    assert torch.all(features.cls_attention.sum(dim=-1) < 1)


@pytest.mark.parametrize(
    ("feature_layer", "message"),
    [
        ([-2, -5], "several layers"),
        (0, "patch embeddings"),
        (-5, "patch embeddings"),
        (5, "out of range"),
        (-6, "out of range"),
    ],
)
def test_bad_feature_layer_is_a_clear_error(tiny_tower, pixel_values, feature_layer, message):
    with pytest.raises(ValueError, match=message):
        encode_for_visionzip(tiny_tower, pixel_values, feature_layer)


def test_non_clip_tower_is_a_clear_error(pixel_values):
    with pytest.raises(ValueError, match="needs a CLIP vision tower"):
        encode_for_visionzip(torch.nn.Linear(2, 2), pixel_values)
