"""DivPrune, VisPruner and VisionZip's sources (zip_vlm_ros.reducers): hand-made sets where the kept set is
obvious, and random float32 features checked against constructions written from the authors' code
(test/reducer_references.py)."""

import pytest
import torch

from reducer_references import intended_vispruner, official_divprune, official_vispruner
from zip_vlm_ros.reducers import (REDUCERS, VisionZipFeatures, check_reducer_name, divprune_reduce, divprune_select,
                                  vispruner_reduce, vispruner_select, visionzip_compress, visionzip_reduce)


def random_tokens(count, dim, seed):
    return torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))


def random_attention(heads, count, seed):
    logits = torch.randn(heads, count + 1, generator=torch.Generator().manual_seed(seed)) * 3.0
    return logits.softmax(dim=-1)[:, 1:]  # CLS row over 1 + N keys, patch columns


# ------------------------------------------------------------------------------------------ DivPrune

# Four 2-D tokens: 0 and 1 almost the same direction, 2 at right angles, 3 opposite to 0.
# Nearest other token: 0 -> 1 (d~0.005), 1 -> 0, 2 -> 1 (d~0.90), 3 -> 2 (d=1.0): first pick 3.
# Distance to {3}: 0 -> 2.0, 1 -> ~1.995, 2 -> 1.0: second pick 0. Then 1 -> 0.005, 2 -> 1.0: third pick 2.
FOUR = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.0]])


@pytest.mark.parametrize("keep, kept", [(0, []), (1, [3]), (2, [0, 3]), (3, [0, 2, 3]), (4, [0, 1, 2, 3]),
                                        (9, [0, 1, 2, 3])])
def test_divprune_hand_made_picks_farthest_first_and_sorts(keep, kept):
    assert divprune_select(FOUR, keep).tolist() == kept


def test_divprune_first_pick_uses_second_smallest_of_each_column():
    # The diagonal is not excluded, it is the smallest entry of its column (about 0), so the 2nd smallest
    # is the nearest OTHER token. A tight pair far from everything loses to a loner.
    tokens = torch.tensor([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0], [-0.7, -0.7]])
    assert divprune_select(tokens, 1).tolist() == [3]


@pytest.mark.parametrize("count, dim, seed", [(576, 32, 0), (300, 64, 1), (97, 8, 2)])
@pytest.mark.parametrize("keep", [1, 2, 16, 64, 128, 192])
def test_divprune_equals_official_on_random_features(count, dim, seed, keep):
    tokens = random_tokens(count, dim, seed)
    kept = divprune_select(tokens, keep)
    expected = official_divprune(tokens, min(keep, count))
    assert len(set(expected)) == len(expected)  # the official picks are distinct here, so no defect applies
    assert kept.tolist() == expected
    reduced = divprune_reduce(tokens[None], keep)
    assert torch.equal(reduced.tokens[0], tokens[expected])
    assert reduced.sources[0].nonzero()[:, 1].tolist() == expected


def test_divprune_never_repeats_a_token_where_the_official_code_does():
    # 20 distinct tokens plus 5 identical copies of one vector (LLaVA-NeXT's row newlines): once the
    # distinct vectors are used up, the official code picks a chosen token again.
    tokens = torch.cat([random_tokens(20, 16, 3), random_tokens(1, 16, 4).expand(5, -1)])
    official = official_divprune(tokens, 24)
    assert len(set(official)) < 24
    kept = divprune_select(tokens, 24).tolist()
    assert len(set(kept)) == 24 and kept == sorted(kept)
    # up to the number of distinct vectors both agree, and at most one copy is kept
    assert divprune_select(tokens, 21).tolist() == official_divprune(tokens, 21)
    assert sum(position >= 20 for position in divprune_select(tokens, 21).tolist()) == 1


def test_divprune_single_token_and_zero_vector_do_not_fail():
    assert divprune_select(torch.ones(1, 4), 1).tolist() == [0]
    # The official code makes NaN of row 0 and picks garbage; here the zero vector is at distance 1 from
    # every token (itself included), so every first-pick score is 1 and the tie goes to position 0.
    tokens = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert divprune_select(tokens, 2).tolist() == [0, 1]
    assert divprune_select(tokens, 3).tolist() == [0, 1, 2]


def test_divprune_bad_shapes_and_counts_are_clear_errors():
    with pytest.raises(ValueError, match=r"\[N, dim\]"):
        divprune_select(torch.ones(4), 2)
    with pytest.raises(ValueError, match="keep=-1"):
        divprune_select(FOUR, -1)


# ------------------------------------------------------------------------------------------ VisPruner

# Six patches. Attention (head mean): 5 > 2 > 0 > 4 > 1 > 3. Features: 0 and 1 identical, 3 close to 4.
SIX_FEATURES = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0],
                             [0.0, 0.0, 1.0], [0.0, 0.1, 1.0], [0.5, 0.5, 0.5]])
SIX_ATTENTION = torch.tensor([[0.30, 0.05, 0.40, 0.01, 0.10, 0.50], [0.10, 0.05, 0.20, 0.01, 0.10, 0.30]])


def test_vispruner_hand_made():
    # T=2, r=0.5: important {5}; residual by attention [2, 0, 4, 1, 3], T_div=1.
    # Round 1 (R=5, r=min(8, 4)=4): evens [2, 4, 3], odds [0, 1]; their best cosine to an odd:
    # 2 -> 0, 4 -> 0, 3 -> 0: all tie at 0, so all three evens go (stable: only 3 evens exist) -> [0, 1].
    # Round 2 (R=2, r=1): evens [0], odds [1]; 0 goes -> [1]. Kept {5, 1}.
    assert vispruner_select(SIX_FEATURES, SIX_ATTENTION, 2).tolist() == [1, 5]
    # T=4, r=0.5: important {5, 2}; residual [0, 4, 1, 3], T_div=2.
    # Round 1 (R=4, r=2): evens [0, 1], odds [4, 3]; cosine to the best odd: 0 -> 0, 1 -> 0 (tie, both go)
    # -> [4, 3]. Kept {2, 3, 4, 5}.
    assert vispruner_select(SIX_FEATURES, SIX_ATTENTION, 4).tolist() == [2, 3, 4, 5]
    # r=1: the top attention only; T >= N: everything; T=0: nothing.
    assert vispruner_select(SIX_FEATURES, SIX_ATTENTION, 3, important_ratio=1.0).tolist() == [0, 2, 5]
    assert vispruner_select(SIX_FEATURES, SIX_ATTENTION, 6).tolist() == list(range(6))
    assert vispruner_select(SIX_FEATURES, SIX_ATTENTION, 0).tolist() == []


@pytest.mark.parametrize("keep", [16, 32, 64, 128, 192, 320])
def test_vispruner_equals_official_at_defect_free_budgets(keep):
    # N = 576 (LLaVA-1.5's patches), r = 0.5: every multiple of 16 runs the official code without its defect.
    features, attention = random_tokens(576, 24, keep), random_attention(4, 576, keep + 1)
    expected, misindexed = official_vispruner(features, attention, keep, 0.5)
    assert len(expected) == keep and not misindexed
    reduced = vispruner_reduce(features[None], attention[None], keep)
    assert reduced.sources[0].nonzero()[:, 1].tolist() == expected
    assert torch.equal(reduced.tokens[0], features[expected])


def test_vispruner_indexes_correctly_where_the_official_code_crashes():
    features, attention = random_tokens(576, 24, 5), random_attention(4, 576, 6)
    with pytest.raises(IndexError):
        official_vispruner(features, attention, 64, 0.3)  # T_imp = 19 makes the first remainder odd
    kept = vispruner_select(features, attention, 64, important_ratio=0.3)
    assert kept.tolist() == intended_vispruner(features, attention, 64, 0.3)
    assert len(kept) == 64


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75, 0.9])
def test_vispruner_equals_intended_for_every_budget_and_official_wherever_it_runs(ratio):
    features, attention = random_tokens(40, 12, 7), random_attention(3, 40, 8)
    for keep in range(0, 42):
        kept = vispruner_select(features, attention, keep, ratio).tolist()
        assert kept == intended_vispruner(features, attention, keep, ratio), keep
        assert len(kept) == min(keep, 40)
        try:
            official, misindexed = official_vispruner(features, attention, keep, ratio)
        except (IndexError, RuntimeError):
            continue
        if not misindexed:  # a round with R = 2r + 1 drops one even too many: the silent defect
            assert kept == official, keep


def test_vispruner_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="cls_attention"):
        vispruner_select(SIX_FEATURES, SIX_ATTENTION[:, :5], 2)
    with pytest.raises(ValueError, match="important_ratio"):
        vispruner_select(SIX_FEATURES, SIX_ATTENTION, 2, important_ratio=1.5)


# ------------------------------------------------------------------------------------------ VisionZip sources

def test_visionzip_sources_name_every_merged_patch():
    # The hand-made set of test_visionzip.py: dominant CLS, 2, 4; contextual 1 + {6} and 5 + {3}.
    hidden = torch.tensor([[[float(i), 10.0 * i] for i in range(7)]])
    attention = torch.tensor([[[0.05, 0.10, 0.10, 0.20, 0.00, 0.15], [0.00, 0.20, 0.00, 0.10, 0.05, 0.05]]])
    keys = torch.tensor([[[9.0, 9.0], [30.0, 0.0], [5.0, 5.0], [0.1, 2.0], [5.0, 5.0], [0.0, 1.0], [3.0, 0.5]]])
    reduced = visionzip_reduce(VisionZipFeatures(hidden, attention, keys), dominant=3, contextual=2)
    assert torch.equal(reduced.tokens, visionzip_compress(hidden, attention, keys, 3, 2)[0])
    groups = [row.nonzero().flatten().tolist() for row in reduced.sources[0]]
    assert groups == [[0], [2], [4], [1, 6], [3, 5]]


def test_visionzip_sources_cover_every_token_once_on_random_features():
    hidden, keys = torch.randn(2, 577, 8), torch.randn(2, 577, 4)
    attention = torch.rand(2, 3, 576)
    reduced = visionzip_reduce(VisionZipFeatures(hidden, attention, keys), dominant=54, contextual=10)
    assert reduced.sources.shape == (2, 64, 577)
    assert torch.equal(reduced.sources.sum(dim=1), torch.ones(2, 577, dtype=torch.long))


def test_reducer_names():
    assert REDUCERS == ("visionzip", "divprune", "vispruner")
    assert check_reducer_name("divprune") == "divprune"
    with pytest.raises(ValueError, match="unknown reducer 'holov'; choose one of visionzip, divprune, vispruner"):
        check_reducer_name("holov")
