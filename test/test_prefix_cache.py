"""The per-frame prefix cache: reuse gives exactly the from-scratch answers, never mutates the shared
state, and is bounded by entries and bytes with least-recently-used eviction."""
import pytest
import skimage.data

from zip_vlm_ros.engine import EngineConfig, SamplingOptions, VlmEngine

FRAMES = {("front", index): getattr(skimage.data, name)()
          for index, name in enumerate(("astronaut", "coffee", "chelsea", "rocket"))}
QUESTIONS = ["Describe the scene.", "Is there a person in front of the robot?", "What color is the cup?"]
FULL = 16


def _engine(model_dir, **config) -> VlmEngine:
    # CPU even where CUDA exists: the tests compare exact token sequences in float32.
    return VlmEngine(EngineConfig(model=str(model_dir), device="cpu", max_new_tokens=8, **config))


@pytest.fixture(scope="module")
def uncached(tiny_model_dir):
    """The reference: every answer computed from scratch."""
    engine = _engine(tiny_model_dir, prefix_cache_entries=0)
    yield engine
    engine.close()


@pytest.fixture
def cached(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    yield engine
    engine.close()


@pytest.mark.parametrize("budget", [FULL, 6])
def test_reuse_is_token_for_token_from_scratch_and_does_not_mutate_the_shared_prefix(cached, uncached, budget):
    key = ("front", 0)
    image = FRAMES[key]
    # The same question before and after a different one: decoding on a copy leaves the cached prefix intact.
    questions = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0], QUESTIONS[2]]
    outputs = [cached.generate(image, q, token_budget=budget, frame_key=key) for q in questions]
    expected = [uncached.generate(image, q, token_budget=budget, frame_key=key) for q in questions]
    assert [o.prefix_reused for o in outputs] == [False, True, True, True]
    assert not any(o.prefix_reused for o in expected)
    assert [o.text for o in outputs] == [o.text for o in expected]
    assert [o.generated_tokens for o in outputs] == [o.generated_tokens for o in expected]
    assert outputs[2].text == outputs[0].text
    assert len({o.text for o in outputs}) == 3  # the question matters
    # A reused prefix skips vision, reduction and the prefix prefill.
    assert outputs[0].vision_ms > 0
    assert all(o.vision_ms == 0 and o.reduction_ms == 0 for o in outputs[1:])
    assert all(o.kv_cache_bytes == outputs[0].kv_cache_bytes > 0 for o in outputs)


@pytest.mark.parametrize("sampling", [None, SamplingOptions(do_sample=True, temperature=0.9, top_k=50, seed=5)],
                         ids=["greedy", "seeded-sampling"])
@pytest.mark.parametrize("budget", [FULL, 8, 3])
def test_exactness_contract_over_frames_budgets_and_question_orders(cached, uncached, budget, sampling):
    """float32: every answer on a reused prefix (kept from another question's one-forward prompt) is the
    from-scratch answer, token for token, whichever question came first."""
    orders = [QUESTIONS, QUESTIONS[::-1], [QUESTIONS[1], QUESTIONS[2], QUESTIONS[0]]]
    for index, (key, image) in enumerate(FRAMES.items()):
        questions = orders[index % len(orders)]
        reused = [cached.generate(image, q, token_budget=budget, frame_key=key, max_new_tokens=12,
                                  sampling=sampling) for q in questions]
        scratch = [uncached.generate(image, q, token_budget=budget, max_new_tokens=12, sampling=sampling)
                   for q in questions]
        assert [o.prefix_reused for o in reused] == [False, True, True]
        assert [(o.text, o.generated_tokens) for o in reused] == [(o.text, o.generated_tokens) for o in scratch]
        assert len({o.text for o in reused}) > 1  # the answers depend on the question


def _language_model_calls(engine):
    """A list that records the number of positions of every forward of the engine's language model."""
    calls = []
    hook = engine.model.model.language_model.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    return calls, hook


def test_first_question_is_one_forward_and_later_ones_read_only_their_own_tokens(cached, uncached):
    key, image = ("front", 0), FRAMES[("front", 0)]
    calls, hook = _language_model_calls(cached)
    try:
        first = cached.generate(image, QUESTIONS[1], token_budget=8, frame_key=key, max_new_tokens=1)
        first_calls = list(calls)
        calls.clear()
        later = cached.generate(image, QUESTIONS[2], token_budget=8, frame_key=key, max_new_tokens=1)
    finally:
        hook.remove()
    prefix_ids, first_suffix = cached.prompts.tokenize(QUESTIONS[1], 8)
    _, later_suffix = cached.prompts.tokenize(QUESTIONS[2], 8)
    assert not first.prefix_reused and later.prefix_reused
    assert first_calls == [len(prefix_ids) + len(first_suffix)]
    assert calls == [len(later_suffix)]
    # The prefix is held as views of the first prompt's cache: its positions plus the question's stay alive.
    per_position = first.kv_cache_bytes / len(prefix_ids)
    assert cached.prefix_cache_bytes == per_position * (len(prefix_ids) + len(first_suffix))


def test_a_prefix_view_shares_memory_and_survives_both_continuations(uncached):
    """The first question decodes on its prompt cache while the frame keeps a view of its prefix: neither
    continuation writes into the shared tensors."""
    import torch

    from zip_vlm_ros.models.kv_cache import fork_cache

    language_model = uncached.model
    prompt = language_model(input_ids=torch.tensor([[1, 5, 9, 14, 3, 11, 12]]), use_cache=True).past_key_values
    snapshot = [(layer.keys.clone(), layer.values.clone()) for layer in prompt.layers]
    prefix = fork_cache(prompt, 5)
    assert prefix.get_seq_length() == 5
    for view, layer in zip(prefix.layers, prompt.layers):
        assert view.keys.data_ptr() == layer.keys.data_ptr() and view.values.data_ptr() == layer.values.data_ptr()

    language_model(input_ids=torch.tensor([[2]]), past_key_values=prompt, use_cache=True)    # first question
    later = fork_cache(prefix)
    language_model(input_ids=torch.tensor([[7, 8]]), past_key_values=later, use_cache=True)  # a later one
    assert prompt.get_seq_length() == 8 and later.get_seq_length() == 7 and prefix.get_seq_length() == 5
    for view, (keys, values) in zip(prefix.layers, snapshot):
        assert torch.equal(view.keys, keys[..., :5, :]) and torch.equal(view.values, values[..., :5, :])
    # The later question's prefix positions are the kept ones, not recomputed.
    for layer, (keys, _) in zip(later.layers, snapshot):
        assert torch.equal(layer.keys[..., :5, :], keys[..., :5, :])


def test_a_forked_cache_grows_without_touching_the_shared_tensors(uncached):
    """The invariant the prefix cache rests on, checked on the tensors themselves."""
    import torch

    from zip_vlm_ros.models.kv_cache import fork_cache

    language_model = uncached.model
    prefix_ids = torch.tensor([[1, 5, 9, 14, 3]])
    shared = language_model(input_ids=prefix_ids, use_cache=True).past_key_values
    snapshot = [(layer.keys.clone(), layer.values.clone()) for layer in shared.layers]

    fork = fork_cache(shared)
    language_model(input_ids=torch.tensor([[7, 8]]), past_key_values=fork, use_cache=True)

    assert fork.get_seq_length() == 7 and shared.get_seq_length() == 5
    for layer, (keys, values) in zip(shared.layers, snapshot):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_seeded_sampling_is_the_same_with_and_without_reuse(cached, uncached):
    key, options = ("front", 1), SamplingOptions(do_sample=True, temperature=0.8, top_p=0.95, seed=11)
    first = cached.generate(FRAMES[key], QUESTIONS[0], token_budget=8, frame_key=key, sampling=options)
    reused = cached.generate(FRAMES[key], QUESTIONS[0], token_budget=8, frame_key=key, sampling=options)
    scratch = uncached.generate(FRAMES[key], QUESTIONS[0], token_budget=8, sampling=options)
    assert reused.prefix_reused and not first.prefix_reused
    assert first.text == reused.text == scratch.text


def test_reuse_needs_the_same_frame_key_and_reduction(cached):
    image = FRAMES[("front", 2)]

    def reused(**request) -> bool:
        return cached.generate(image, QUESTIONS[0], **request).prefix_reused

    assert not reused(frame_key=("front", 2), token_budget=8)
    assert reused(frame_key=("front", 2), token_budget=8)
    assert not reused(frame_key=("front", 2), token_budget=4)        # another budget
    assert not reused(frame_key=("rear", 2), token_budget=8)         # another camera
    assert not reused(frame_key=None, token_budget=8)                # reuse disabled
    assert not reused(frame_key=None, token_budget=8)
    # Budgets at or above the full count all mean "no reduction": one entry.
    assert not reused(frame_key=("front", 2), token_budget=FULL)
    assert reused(frame_key=("front", 2), token_budget=1000)
    cached.clear_prefix_cache()
    assert not reused(frame_key=("front", 2), token_budget=8)


@pytest.mark.parametrize("frame_key", [None, ("front", 3)])
def test_generate_many_shares_one_prefix_and_answers_in_order(cached, uncached, frame_key):
    image = FRAMES[("front", 3)]
    outputs = cached.generate_many(image, QUESTIONS, token_budget=6, frame_key=frame_key)
    expected = [uncached.generate(image, q, token_budget=6) for q in QUESTIONS]
    assert [o.prompt for o in outputs] == QUESTIONS
    assert [o.text for o in outputs] == [o.text for o in expected]
    assert [o.prefix_reused for o in outputs] == [False, True, True]
    assert outputs[0].vision_ms > 0 and outputs[0].reduction_ms > 0
    assert all(o.vision_ms == 0 and o.reduction_ms == 0 for o in outputs[1:])
    later = cached.generate(image, QUESTIONS[1], token_budget=6, frame_key=frame_key)
    assert later.prefix_reused == (frame_key is not None)
    assert later.text == expected[1].text


def _reuse_pattern(engine, keys, budget=FULL) -> list[bool]:
    return [engine.generate(FRAMES[key], QUESTIONS[0], token_budget=budget, frame_key=key,
                            max_new_tokens=1).prefix_reused for key in keys]


A, B, C = ("front", 0), ("front", 1), ("front", 2)
# Two slots: A B fill them, A is touched (B is now least recent), C evicts B, A still cached,
# B evicts C, C evicts A.
LRU_KEYS = [A, B, A, C, A, B, C, A]
LRU_REUSED = [False, False, True, False, True, False, False, False]


def test_lru_eviction_by_entries(tiny_model_dir):
    engine = _engine(tiny_model_dir, prefix_cache_entries=2)
    try:
        assert _reuse_pattern(engine, LRU_KEYS) == LRU_REUSED
    finally:
        engine.close()


def test_lru_eviction_by_bytes_and_oversized_entries(tiny_model_dir, cached):
    # An entry holds its first prompt's whole cache: the prefix's positions and the question's.
    assert _reuse_pattern(cached, [A]) == [False]
    entry_bytes = cached.prefix_cache_bytes
    prefix_bytes = cached.generate(FRAMES[A], QUESTIONS[0], frame_key=A, max_new_tokens=1).kv_cache_bytes
    assert entry_bytes > prefix_bytes > 0
    engine = _engine(tiny_model_dir, prefix_cache_entries=100, prefix_cache_bytes=2 * entry_bytes + entry_bytes // 2)
    try:
        assert _reuse_pattern(engine, LRU_KEYS) == LRU_REUSED
    finally:
        engine.close()
    # A full-budget prefix is bigger than the bound: not cached. A 4-token one still fits.
    engine = _engine(tiny_model_dir, prefix_cache_bytes=entry_bytes - 1)
    try:
        assert _reuse_pattern(engine, [A, A, A]) == [False, False, False]
        assert _reuse_pattern(engine, [A, A], budget=4) == [False, True]
    finally:
        engine.close()


def test_zero_entries_disables_the_cache(uncached):
    assert _reuse_pattern(uncached, [A, A]) == [False, False]


@pytest.mark.parametrize("sampling", [None, SamplingOptions(do_sample=True, temperature=0.9, top_k=50, seed=7)],
                         ids=["greedy", "seeded-sampling"])
def test_llava_next_reuse_is_the_from_scratch_answer(tiny_next_model_dir, sampling):
    """The one-forward first question and the kept prefix views hold for AnyRes frames too: frames of two
    aspect ratios (different crop grids and unpadding), at full tokens and under VisionZip."""
    cached, uncached = _engine(tiny_next_model_dir), _engine(tiny_next_model_dir, prefix_cache_entries=0)
    try:
        coffee = FRAMES[("front", 1)]  # 400x600
        frames = {("wide", 0): coffee, ("tall", 1): coffee[:, 150:350].copy()}
        for budget in (10_000, 20):
            for key, image in frames.items():
                reused = [cached.generate(image, q, token_budget=budget, frame_key=(key, budget), max_new_tokens=10,
                                          sampling=sampling) for q in QUESTIONS]
                scratch = [uncached.generate(image, q, token_budget=budget, max_new_tokens=10, sampling=sampling)
                           for q in QUESTIONS]
                assert [o.prefix_reused for o in reused] == [False, True, True]
                assert [(o.text, o.generated_tokens) for o in reused] == [(o.text, o.generated_tokens)
                                                                          for o in scratch]
    finally:
        cached.close()
        uncached.close()
