"""Streamed answers without ROS: IncrementalDetokenizer on tokenizers where per-token decoding breaks
text (byte fallback, byte-level BPE), and VlmEngine's on_token callback on the tiny checkpoint."""
import pytest
import skimage.data
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from zip_vlm_ros.engine import EngineConfig, GenerationStopped, VlmEngine
from zip_vlm_ros.engine.streaming import REPLACEMENT_CHARACTER, IncrementalDetokenizer

# Multi-byte characters (2, 3 and 4 bytes in UTF-8), words that merge across tokens, inner spaces.
TEXT = 'The robot saw a café, naïve 日本語 and 🤖 — ok, go.'


def llama_style_byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE as Llama's: "▁" word marks, and characters outside the vocabulary
    (é, 日, 🤖 ...) encoded as their UTF-8 bytes <0xNN>, one token per byte."""
    specials = ['<unk>', '<s>', '</s>']
    byte_tokens = [f'<0x{value:02X}>' for value in range(256)]
    letters = sorted(set('abcdefghijklmnopqrstuvwxyzT,.') | {'\u2581'})
    merges = [('\u2581', 'r'), ('\u2581r', 'o'), ('\u2581ro', 'b'), ('o', 't'), ('\u2581rob', 'ot'),
              ('\u2581', 'o'), ('\u2581o', 'k'), ('\u2581', 'g'), ('\u2581g', 'o')]
    vocab = {token: index for index, token in enumerate(specials + byte_tokens + letters)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token='<unk>', byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend('\u2581'), normalizers.Replace(' ', '\u2581')])
    tokenizer.decoder = decoders.Sequence([decoders.Replace('\u2581', ' '), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(' ', 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token='<unk>', bos_token='<s>', eos_token='</s>')


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE: every token is bytes, so a character's bytes may span tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=['</s>'], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(['the robot saw a cafe and it was ok'] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token='</s>')


def stream(tokenizer, ids):
    """The deltas IncrementalDetokenizer gives for `ids` pushed one at a time, then its final rest."""
    decode = lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True).strip()  # noqa: E731
    detokenizer = IncrementalDetokenizer(decode)
    deltas = [detokenizer.push(token) for token in ids]
    deltas.append(detokenizer.finish())
    return deltas, decode(ids)


@pytest.mark.parametrize('make_tokenizer', [llama_style_byte_fallback_tokenizer, byte_level_tokenizer])
def test_deltas_concatenate_to_the_final_text_and_never_split_a_character(make_tokenizer):
    tokenizer = make_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)['input_ids'] + [tokenizer.eos_token_id]
    deltas, final = stream(tokenizer, ids)
    assert final == TEXT  # the tokenizer round-trips the text, so any difference below is the streaming's
    assert ''.join(deltas) == final
    assert not any(REPLACEMENT_CHARACTER in delta for delta in deltas), deltas
    # The case matters: decoding token by token breaks characters on this tokenizer.
    naive = ''.join(tokenizer.decode([token], skip_special_tokens=True) for token in ids)
    assert naive != TEXT
    # Each emitted piece is final: no delta ends in a space that might be stripped, none is lost.
    assert all(delta == '' or not delta[-1].isspace() for delta in deltas[:-1])


def test_byte_fallback_holds_a_character_back_until_its_last_byte():
    tokenizer = llama_style_byte_fallback_tokenizer()
    ids = tokenizer('ok 🤖', add_special_tokens=False)['input_ids']
    robot_bytes = [tokenizer.convert_tokens_to_ids(f'<0x{value:02X}>') for value in '🤖'.encode()]
    assert ids[-4:] == robot_bytes  # four byte tokens, one character
    deltas, final = stream(tokenizer, ids)
    assert deltas[-5:-2] == ['', '', ''] and deltas[-2] == ' 🤖' and final == 'ok 🤖'


def test_a_stream_that_ends_in_held_back_text_flushes_it():
    tokenizer = llama_style_byte_fallback_tokenizer()
    ids = tokenizer('ok ', add_special_tokens=False)['input_ids'] + tokenizer('é', add_special_tokens=False)['input_ids'][1:2]
    # 'ok' then the first byte of é alone: the final decode keeps the replacement character
    deltas, final = stream(tokenizer, ids)
    assert ''.join(deltas) == final and final.endswith(REPLACEMENT_CHARACTER)


# ---------------------------------------------------------------------- the engine

IMAGE = skimage.data.coffee()
PROMPT = 'Describe every object in detail.'


@pytest.fixture(scope='module')
def engine(tiny_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device='cpu', token_budget=8, max_new_tokens=24))
    yield engine
    engine.close()


def test_on_token_streams_the_answer_step_by_step(engine):
    plain = engine.generate(IMAGE, PROMPT)
    steps = []
    streamed = engine.generate(IMAGE, PROMPT, on_token=steps.append)
    assert streamed.text == plain.text and streamed.generated_tokens == plain.generated_tokens
    assert [step.generated_tokens for step in steps] == list(range(1, plain.generated_tokens + 1))
    assert ''.join(step.delta for step in steps) == plain.text
    for earlier, later in zip(steps, steps[1:]):
        assert later.text == earlier.text + later.delta
    # The first step is reported as soon as the first token exists: within the engine's own TTFT + 20 ms.
    assert steps[0].elapsed_ms >= streamed.ttft_ms
    assert steps[0].elapsed_ms <= streamed.ttft_ms + 20.0, (steps[0].elapsed_ms, streamed.ttft_ms)
    assert steps[-1].elapsed_ms <= streamed.total_ms


def test_on_token_names_the_prompt_of_generate_many(engine):
    steps = []
    outputs = engine.generate_many(IMAGE, ['What is this?', PROMPT], max_new_tokens=6, on_token=steps.append)
    for index, output in enumerate(outputs):
        mine = [step for step in steps if step.prompt_index == index]
        assert len(mine) == output.generated_tokens and mine[-1].text == output.text


def test_a_stopped_stream_is_the_start_of_the_answer(engine):
    full = engine.generate(IMAGE, PROMPT)
    steps = []

    def stop_after_four_tokens():
        return 'cancelled' if len(steps) >= 4 else None
    with pytest.raises(GenerationStopped) as stopped:
        engine.generate(IMAGE, PROMPT, on_token=steps.append, should_stop=stop_after_four_tokens)
    assert len(steps) == 4 and len(stopped.value.tokens[0]) == 4
    assert full.text.startswith(steps[-1].text)
