"""VlmEngine's should_stop: a caller (deadline, cancel, shutdown) stops a generation between stages or
before the next decode step; GenerationStopped carries the reason and the tokens so far; the engine
stays usable and its prefix cache is not left half-written."""
import pytest
import skimage.data

from zip_vlm_ros.engine import EngineConfig, EngineError, GenerationStopped, VlmEngine

IMAGE = skimage.data.coffee()
PROMPT = "Describe every object in detail."


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", token_budget=8, max_new_tokens=12))
    yield engine
    engine.close()


class StopOnCall:
    """should_stop that gives `reason` on its n-th call and records every call."""

    def __init__(self, n: int, reason: str = "timed out"):
        self.n, self.reason, self.calls = n, reason, 0

    def __call__(self):
        self.calls += 1
        return self.reason if self.calls >= self.n else None


def test_never_stopping_is_the_plain_answer(engine):
    plain = engine.generate(IMAGE, PROMPT)
    asked = StopOnCall(10**9)
    assert engine.generate(IMAGE, PROMPT, should_stop=asked).text == plain.text
    # asked between stages and before every decode step
    assert asked.calls >= plain.generated_tokens


def test_stop_waits_for_at_most_one_decode_step(engine):
    """Stopping on call n+1 instead of n yields at most one more token, and the tokens so far are
    the first tokens of the full answer (greedy)."""
    full = engine.generate(IMAGE, PROMPT, max_new_tokens=12)
    assert full.generated_tokens >= 6, "the tiny checkpoint should not stop this early on this prompt"
    counts = []
    for n in range(1, 12):
        should_stop = StopOnCall(n, reason=f"stop {n}")
        with pytest.raises(GenerationStopped) as stopped:
            engine.generate(IMAGE, PROMPT, max_new_tokens=12, should_stop=should_stop)
        error = stopped.value
        assert isinstance(error, EngineError) and error.reason == f"stop {n}" and str(error) == f"stop {n}"
        assert should_stop.calls == n, "the engine kept asking after it was told to stop"
        tokens = error.tokens[0] if error.tokens else []
        counts.append(len(tokens))
        if tokens:
            assert error.texts[0] == engine.generate(IMAGE, PROMPT, max_new_tokens=len(tokens)).text
    assert counts[0] == 0 and counts[-1] > 0
    assert all(later - earlier in (0, 1) for earlier, later in zip(counts, counts[1:])), counts


def test_generate_many_reports_the_answers_it_finished(engine):
    prompts = ["What is on the table?", PROMPT, "Is there a cup?"]
    answers = engine.generate_many(IMAGE, prompts, frame_key=("front", 1))
    # stop once the second prompt's first decode step is being asked for
    calls_first = StopOnCall(10**9)
    engine.generate_many(IMAGE, prompts[:1], frame_key=("front", 1), should_stop=calls_first)
    should_stop = StopOnCall(calls_first.calls + 3)
    with pytest.raises(GenerationStopped) as stopped:
        engine.generate_many(IMAGE, prompts, frame_key=("front", 1), should_stop=should_stop)
    completed = stopped.value.completed
    assert [output.text for output in completed] == [answers[0].text]
    # the engine and its prefix cache serve the same answers afterwards
    again = engine.generate_many(IMAGE, prompts, frame_key=("front", 1))
    assert [output.text for output in again] == [output.text for output in answers]


def test_stop_before_the_prefix_is_prefilled_caches_nothing_broken(engine):
    key = ("front", 2)
    with pytest.raises(GenerationStopped):
        engine.generate(IMAGE, PROMPT, frame_key=key, should_stop=StopOnCall(2))  # after vision
    fresh = engine.generate(IMAGE, PROMPT, frame_key=key)
    assert not fresh.prefix_reused
    assert fresh.text == engine.generate(IMAGE, PROMPT).text


def test_batch_stops_with_tokens_per_row(engine):
    images = [skimage.data.astronaut(), skimage.data.rocket()]
    prompts = [PROMPT, "What is in the image?"]
    with pytest.raises(GenerationStopped) as stopped:
        engine.generate_batch(images, prompts, should_stop=StopOnCall(5))
    assert len(stopped.value.tokens) == 2 and len(stopped.value.texts) == 2
    assert all(len(row) <= 3 for row in stopped.value.tokens)
    assert len(engine.generate_batch(images, prompts)) == 2
