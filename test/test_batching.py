"""DecodeBatch on the offline tiny LLaVA checkpoints in float32: every request's answer in a batch equals
its answer alone, token for token, whoever runs beside it and whenever it joins or leaves."""
import numpy as np
import pytest
import skimage.data
import torch

from zip_vlm_ros.engine import EngineConfig, GenerationStopped, SamplingOptions, VlmEngine

IMAGES = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}
FULL = 16  # the tiny preset's visual tokens per image


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", max_new_tokens=10))
    yield engine
    engine.close()


def run_batch(engine, requests, *, max_rows=4, join_at=None):
    """Admit ``requests[i]`` before decode step ``join_at[i]`` (0: at once) while there is a free row;
    step until every request ended. Returns the largest number of rows that decoded together."""
    join_at = join_at or [0] * len(requests)
    batch = engine.decode_batch(max_rows)
    waiting = list(zip(join_at, requests))
    ended, widest, step = [], 0, 0
    while waiting or batch:
        while waiting and waiting[0][0] <= step and batch.accepts:
            _, request = waiting.pop(0)
            if not batch.admit(request):
                ended.append(request)
        widest = max(widest, len(batch))
        if batch:
            ended.extend(batch.step())
        step += 1
    assert sorted(map(id, ended)) == sorted(map(id, requests))  # each request ends exactly once
    return widest


CASES = [  # image, prompt, budget, max_new_tokens: different frames, lengths, budgets and ends
    ("astronaut", "What is in the image?", FULL, 10),
    ("coffee", "Describe the scene in detail, please, with every object you see.", 8, 4),
    ("chelsea", "Is the path clear?", 3, 12),
    ("rocket", "What color is the sky?", 5, 7),
]


def test_greedy_answers_in_a_batch_equal_answers_alone(engine):
    alone = [engine.generate(IMAGES[name], prompt, token_budget=budget, max_new_tokens=new)
             for name, prompt, budget, new in CASES]
    requests = [engine.open_request(IMAGES[name], [prompt], token_budget=budget, max_new_tokens=new)
                for name, prompt, budget, new in CASES]
    # Two start together, one joins after 2 steps, one after 5 (when the 4-token row has left).
    widest = run_batch(engine, requests, join_at=[0, 0, 2, 5])
    assert widest == 3
    for request, single in zip(requests, alone):
        assert request.error is None
        [output] = request.outputs
        assert (output.text, output.generated_tokens) == (single.text, single.generated_tokens)
        assert (output.visual_tokens, output.token_budget) == (single.visual_tokens, single.token_budget)
    assert [request.outputs[0].generated_tokens for request in requests][:3] == [10, 4, 12]
    assert len({request.outputs[0].text for request in requests}) == 4


def test_one_row_at_a_time_is_generate(engine):
    name, prompt, budget, new = CASES[0]
    single = engine.generate(IMAGES[name], prompt, token_budget=budget, max_new_tokens=new)
    request = engine.open_request(IMAGES[name], [prompt], token_budget=budget, max_new_tokens=new)
    assert run_batch(engine, [request], max_rows=1) == 1
    assert request.outputs[0].text == single.text


def test_a_row_cancelled_mid_batch_leaves_the_others_exact(engine):
    alone = [engine.generate(IMAGES[name], prompt, token_budget=budget, max_new_tokens=new)
             for name, prompt, budget, new in CASES[:3]]
    streamed = []

    def cancel_after_three() -> str | None:
        return "cancelled by the caller" if len(streamed) >= 3 else None

    requests = [engine.open_request(IMAGES[name], [prompt], token_budget=budget, max_new_tokens=new)
                for name, prompt, budget, new in CASES[:3]]
    requests[0] = engine.open_request(IMAGES[CASES[0][0]], [CASES[0][1]], token_budget=CASES[0][2],
                                      max_new_tokens=CASES[0][3], should_stop=cancel_after_three,
                                      on_token=streamed.append)
    assert run_batch(engine, requests) == 3
    stopped = requests[0].error
    assert isinstance(stopped, GenerationStopped) and stopped.reason == "cancelled by the caller"
    assert requests[0].outputs == [] and len(stopped.tokens[0]) == 3
    assert alone[0].text.startswith(stopped.texts[0])  # the tokens it had were its alone answer's
    for request, single in zip(requests[1:], alone[1:]):
        assert request.error is None and request.outputs[0].text == single.text


def test_a_row_that_stops_at_eos_leaves_the_others_exact(tiny_model_dir):
    """Make EOS the winner where the astronaut row would emit a token the coffee row never emits."""
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", max_new_tokens=10))
    try:
        first = engine.generate(IMAGES["astronaut"], CASES[0][1])
        second = engine.generate(IMAGES["coffee"], CASES[1][1])
        first_ids = engine.tokenizer(first.text, add_special_tokens=False).input_ids
        second_ids = set(engine.tokenizer(second.text, add_special_tokens=False).input_ids)
        stop_token = next(token for step, token in enumerate(first_ids)
                          if step >= 2 and token not in first_ids[:step] and token not in second_ids)
        with torch.no_grad():
            engine.model.lm_head.weight[engine.tokenizer.eos_token_id] = 1.5 * engine.model.lm_head.weight[stop_token]
        alone = [engine.generate(IMAGES["astronaut"], CASES[0][1]), engine.generate(IMAGES["coffee"], CASES[1][1])]
        assert alone[0].generated_tokens < 10 and alone[1].generated_tokens == 10
        requests = [engine.open_request(IMAGES["astronaut"], [CASES[0][1]]),
                    engine.open_request(IMAGES["coffee"], [CASES[1][1]])]
        run_batch(engine, requests)
        assert [r.outputs[0].generated_tokens for r in requests] == [o.generated_tokens for o in alone]
        assert [r.outputs[0].text for r in requests] == [o.text for o in alone]
    finally:
        engine.close()


def test_seeded_sampling_in_a_batch_equals_sampling_alone(engine):
    options = [SamplingOptions(do_sample=True, seed=7), None,
               SamplingOptions(do_sample=True, seed=11, temperature=0.7, top_p=0.9, top_k=50)]
    alone = [engine.generate(IMAGES[name], prompt, token_budget=budget, max_new_tokens=12, sampling=sampling)
             for (name, prompt, budget, _), sampling in zip(CASES, options)]
    requests = [engine.open_request(IMAGES[name], [prompt], token_budget=budget, max_new_tokens=12,
                                    sampling=sampling)
                for (name, prompt, budget, _), sampling in zip(CASES, options)]
    assert run_batch(engine, requests, join_at=[0, 1, 3]) == 3
    assert [request.outputs[0].text for request in requests] == [output.text for output in alone]


def test_several_prompts_and_cached_prefixes_join_without_being_written(engine):
    questions = ["What is in the image?", "Is the path clear?", "Describe the scene in detail."]
    engine.clear_prefix_cache()
    alone = engine.generate_many(IMAGES["chelsea"], questions, token_budget=8, max_new_tokens=6)
    warm = engine.generate(IMAGES["chelsea"], questions[0], token_budget=8, max_new_tokens=6, frame_key="cat")
    [cached] = engine.generator.prefix_cache._entries.values()
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cached.kv_cache.layers]

    streamed: dict[int, str] = {}
    many = engine.open_request(IMAGES["chelsea"], questions, token_budget=8, max_new_tokens=6, frame_key="cat",
                               on_token=lambda piece: streamed.__setitem__(piece.prompt_index, piece.text))
    again = engine.open_request(IMAGES["chelsea"], questions[1:2], token_budget=8, max_new_tokens=6,
                                frame_key="cat")
    other = engine.open_request(IMAGES["rocket"], ["What color is the sky?"], token_budget=5, max_new_tokens=9)
    assert run_batch(engine, [many, again, other]) == 3
    assert warm.text == alone[0].text
    assert [output.text for output in many.outputs] == [output.text for output in alone]
    assert [output.prefix_reused for output in many.outputs] == [True, True, True]
    assert streamed == {index: output.text for index, output in enumerate(alone)}
    assert again.outputs[0].text == alone[1].text
    assert other.outputs[0].text == engine.generate(IMAGES["rocket"], "What color is the sky?", token_budget=5,
                                                    max_new_tokens=9).text
    for layer, (keys, values) in zip(cached.kv_cache.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_a_failing_request_ends_alone_and_the_batch_goes_on(engine):
    def broken_stream(_piece):
        raise RuntimeError("the caller's stream broke")

    good = engine.open_request(IMAGES["coffee"], ["What is in the image?"], max_new_tokens=5)
    bad = engine.open_request(IMAGES["rocket"], ["What is in the image?"], max_new_tokens=5, on_token=broken_stream)
    late = engine.open_request(IMAGES["rocket"], ["What is in the image?"], max_new_tokens=5,
                               should_stop=lambda: "timed out")
    run_batch(engine, [good, bad, late])
    assert isinstance(bad.error, RuntimeError) and bad.outputs == []
    assert isinstance(late.error, GenerationStopped) and late.error.tokens == []
    assert good.error is None
    assert good.outputs[0].text == engine.generate(IMAGES["coffee"], "What is in the image?", max_new_tokens=5).text


def test_the_batch_holds_at_most_max_rows(engine):
    batch = engine.decode_batch(2)
    for name in ("astronaut", "coffee"):
        assert batch.accepts and batch.admit(engine.open_request(IMAGES[name], ["Hi?"], max_new_tokens=3))
    assert not batch.accepts and len(batch) == 2
    with pytest.raises(ValueError, match="the batch is full"):
        batch.admit(engine.open_request(IMAGES["rocket"], ["Hi?"], max_new_tokens=3))
    with pytest.raises(ValueError, match="max_rows"):
        engine.decode_batch(0)
    ended = []
    while batch:
        ended += batch.step()
    assert [len(request.outputs) for request in ended] == [1, 1]


def test_bad_requests_are_refused_before_any_model_work(engine):
    from zip_vlm_ros.engine import RequestError

    with pytest.raises(RequestError, match="max_new_tokens"):
        engine.open_request(IMAGES["coffee"], ["Hi?"], max_new_tokens=0)
    with pytest.raises(RequestError, match="image"):
        engine.open_request(np.zeros((4, 4), np.uint8), ["Hi?"])


@pytest.mark.parametrize("model_dir", ["tiny_next_model_dir", "tiny_mini_model_dir", "tiny_qwen_model_dir"])
def test_other_families_batch_exactly(request, model_dir):
    """LLaVA-NeXT (AnyRes prompts of different lengths per image), LLaVA-Mini (pre-fused prompts) and
    Qwen2.5-VL (M-RoPE: each row's text continues after its own frame's positions, which differ with the
    frame's size)."""
    engine = VlmEngine(EngineConfig(model=str(request.getfixturevalue(model_dir)), device="cpu", max_new_tokens=8))
    try:
        cases = [("astronaut", "What is in the image?", 6), ("coffee", "Describe the table in detail.", 8),
                 ("rocket", "Is the path clear?", 3)]
        alone = [engine.generate(IMAGES[name], prompt, max_new_tokens=new).text for name, prompt, new in cases]
        requests = [engine.open_request(IMAGES[name], [prompt], max_new_tokens=new) for name, prompt, new in cases]
        assert run_batch(engine, requests, join_at=[0, 0, 1]) == 3
        assert [r.outputs[0].text for r in requests] == alone
    finally:
        engine.close()


def test_a_roomy_layer_holds_what_torch_cat_would_and_leaves_its_inputs_alone():
    """A batch's cache layer written in place for more steps than its spare room holds (it regrows)."""
    from zip_vlm_ros.engine.batching import GROWTH, RoomyLayer

    generator = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 3, 5, 4, generator=generator), torch.randn(2, 3, 5, 4, generator=generator)
    keys_before, values_before = keys.clone(), values.clone()
    layer = RoomyLayer(keys, values)
    expected_keys, expected_values = keys, values
    for _ in range(GROWTH + 7):
        new_keys, new_values = torch.randn(2, 3, 1, 4, generator=generator), torch.randn(2, 3, 1, 4, generator=generator)
        got_keys, got_values = layer.update(new_keys, new_values)
        expected_keys = torch.cat([expected_keys, new_keys], dim=-2)
        expected_values = torch.cat([expected_values, new_values], dim=-2)
        assert torch.equal(got_keys, expected_keys) and torch.equal(got_values, expected_values)
    assert layer.get_seq_length() == 5 + GROWTH + 7
    assert layer.key_buffer.shape[-2] > GROWTH + 12   # it grew once: the first buffer had room for 5 + GROWTH
    assert torch.equal(keys, keys_before) and torch.equal(values, values_before)


def test_a_roomy_layer_takes_an_update_longer_than_its_spare_room():
    from zip_vlm_ros.engine.batching import GROWTH, RoomyLayer

    generator = torch.Generator().manual_seed(4)
    keys, values = torch.randn(1, 2, 3, 4, generator=generator), torch.randn(1, 2, 3, 4, generator=generator)
    layer = RoomyLayer(keys, values)
    new_keys, new_values = (torch.randn(1, 2, 2 * GROWTH, 4, generator=generator),
                            torch.randn(1, 2, 2 * GROWTH, 4, generator=generator))
    got_keys, got_values = layer.update(new_keys, new_values)
    assert torch.equal(got_keys, torch.cat([keys, new_keys], dim=-2))
    assert torch.equal(got_values, torch.cat([values, new_values], dim=-2))


def test_rows_decoding_past_the_spare_room_stay_exact(tiny_model_dir):
    """Rows longer than one growth of the batch's buffers, joining at different steps, answer as alone."""
    from zip_vlm_ros.engine.batching import GROWTH

    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", max_new_tokens=GROWTH + 20))
    try:
        # An end token outside the vocabulary: every row runs its whole max_new_tokens, alone and batched.
        engine.generator.eos_token_ids = {engine.model.config.text_config.vocab_size + 1}
        cases = [("astronaut", "What is in the image?", GROWTH + 20), ("coffee", "Is the path clear?", GROWTH + 5),
                 ("rocket", "What color is the sky?", 9)]
        alone = [engine.generate(IMAGES[name], prompt, max_new_tokens=new) for name, prompt, new in cases]
        requests = [engine.open_request(IMAGES[name], [prompt], max_new_tokens=new) for name, prompt, new in cases]
        assert run_batch(engine, requests, join_at=[0, 3, GROWTH - 2]) == 3
        assert [r.outputs[0].generated_tokens for r in requests] == [new for _, _, new in cases]
        assert [r.outputs[0].text for r in requests] == [output.text for output in alone]
    finally:
        engine.close()
