"""VisionZip without CLS as pure functions: hand-computed cases for the received-attention score, the
top-scored selection and the reduced tokens' sources and anchors."""
import math

import pytest
import torch

from zip_vlm_ros.reducers import received_attention, select_top_scored, visionzip_scored_reduce


def test_received_attention_of_a_hand_made_case():
    # one head, three tokens: query 0 attends to key 0 only (logits 100, 0, 0), queries 1 and 2 to all alike
    queries = torch.tensor([[[1.0], [0.0], [0.0]]])
    keys = torch.tensor([[[100.0], [0.0], [0.0]]])
    # softmax rows (1, 0, 0), (1/3, 1/3, 1/3), (1/3, 1/3, 1/3); received = column means
    expected = torch.tensor([5 / 9, 2 / 9, 2 / 9])
    for chunk in (1, 2, 3, 50):
        scores = received_attention(queries, keys, scaling=1.0, chunk=chunk)
        torch.testing.assert_close(scores, expected)
        assert math.isclose(float(scores.sum()), 1.0, rel_tol=1e-6)


def test_received_attention_averages_heads_and_refuses_bad_input():
    queries = torch.zeros(2, 4, 3)  # every logit 0: uniform attention in both heads
    assert torch.equal(received_attention(queries, queries, 0.5, chunk=3), torch.full((4,), 0.25))
    with pytest.raises(ValueError, match="head_dim"):
        received_attention(queries, queries[:, :3], 0.5)
    with pytest.raises(ValueError, match="chunk=0"):
        received_attention(queries, queries, 0.5, chunk=0)


def test_top_scored_selection_is_ascending_and_ties_go_to_the_lower_position():
    scores = torch.tensor([[0.1, 0.4, 0.4, 0.05, 0.05]])
    dominant, remainder = select_top_scored(scores, 2)
    assert dominant.tolist() == [[1, 2]] and remainder.tolist() == [[0, 3, 4]]
    dominant, remainder = select_top_scored(scores, 4)  # 0.05 tie: position 3 wins
    assert dominant.tolist() == [[0, 1, 2, 3]] and remainder.tolist() == [[4]]


def test_scored_reduce_keeps_merges_and_anchors():
    tokens = torch.arange(6, dtype=torch.float32).view(1, 6, 1) * 10  # token i is [10 i]
    scores = torch.tensor([[0.0, 0.9, 0.0, 0.8, 0.0, 0.0]])
    # keys: 0, 2 point one way, 4, 5 the other
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0], [-1.0, 0.2]]])
    reduced = visionzip_scored_reduce(tokens, scores, keys, dominant=2, contextual=2)
    # dominant 1, 3; remainder 0, 2, 4, 5 -> targets at remainder positions 0, 2 (tokens 0 and 4);
    # token 2 joins 0, token 5 joins 4
    assert reduced.anchors.tolist() == [[1, 3, 0, 4]]
    assert reduced.tokens.view(-1).tolist() == [10.0, 30.0, 0.0 + 20.0, 40.0 + 50.0]
    assert reduced.sources[0].int().tolist() == [[0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0],
                                                 [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
    only_kept = visionzip_scored_reduce(tokens, scores, keys, dominant=3, contextual=0)
    assert only_kept.anchors.tolist() == [[0, 1, 3]] and only_kept.sources.sum() == 3
    with pytest.raises(ValueError, match="cannot split"):
        visionzip_scored_reduce(tokens, scores, keys, dominant=5, contextual=2)
