"""Replicas of the published checkpoints (test/fixtures/published, zip_vlm_ros.tools.published_replica):
they differ from the published files only in widths, depths and the learnt vocabulary, their weights carry
the published names, and the engine loads them, renders the prompt the checkpoint's own chat template
renders (token for token, up to the deviations in DEVIATIONS) and stops at the checkpoint's own stop tokens."""
import json
import re
import shutil

import pytest
import skimage.data
import torch
from conftest import PUBLISHED_CHECKPOINTS, PUBLISHED_CLIP_TOWER, published_files

from zip_vlm_ros.engine import EngineConfig, GenerationStopped, VlmEngine
from zip_vlm_ros.tools.published_replica import REPLICA_SIZES, REWRITTEN_FILES

LLAVA_HF = [checkpoint for checkpoint in PUBLISHED_CHECKPOINTS if checkpoint.startswith('llava-hf/')]
MINI = 'ICTNLP/llava-mini-llama-3.1-8b'
QWEN = 'Qwen/Qwen2.5-VL-3B-Instruct'
QUESTION = 'What is in front of the robot?'
# Where the engine's prompt deliberately differs from the checkpoint's own, by name (README, "Published checkpoints").
DEVIATIONS = {
    'visual-token budget': 'LLaVA, LLaVA-NeXT and Qwen2.5-VL: the image placeholder run holds the reduced count, '
                           'not the full one',
    'one BOS': "LLaVA-Mini: the reference's tokenizer_image_token yields two BOS tokens (its training drops one)",
    'assistant header': 'LLaVA-Mini: the prompt ends with the assistant header (the reference leaves it to the model)',
    'image placeholder id': "LLaVA-Mini: <image> is a special token at id len(vocab), the reference's -200",
}
# The config fields the replica may change: widths and depths (Qwen2.5-VL's tower: depth, num_heads and the
# merger's out_hidden_size, the LLM's width) ...
SIZE_FIELDS = {'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads',
               'mm_hidden_size', 'depth', 'num_heads', 'out_hidden_size'}
# ... and the Qwen2.5-VL fields that follow them by a stated rule (checked by value below).
RULE_FIELDS = {'mrope_section', 'fullatt_block_indexes'}
# Engine settings a replica needs beyond its checkpoint: LLaVA-Mini's tower directory; Qwen2.5-VL reduces
# with DivPrune (it has no CLS token for VisionZip).
ENGINE_OPTIONS = {QWEN: {'reducer': 'divprune'}}


def _leaves(config: dict, path: tuple = ()) -> dict:
    leaves = {}
    for key, value in config.items():
        leaves.update(_leaves(value, path + (key,)) if isinstance(value, dict) else {path + (key,): value})
    return leaves


@pytest.fixture(scope='module')
def engines(published_replicas):
    """One engine per replica (float32, CPU), as the node's configure builds it."""
    options = {**ENGINE_OPTIONS, MINI: {'vision_tower': str(published_replicas[PUBLISHED_CLIP_TOWER])}}
    loaded = {checkpoint: VlmEngine(EngineConfig(model=str(published_replicas[checkpoint]), device='cpu',
                                                 max_new_tokens=4, **options.get(checkpoint, {})))
              for checkpoint in PUBLISHED_CHECKPOINTS}
    yield loaded
    for engine in loaded.values():
        engine.close()


@pytest.mark.parametrize('checkpoint', PUBLISHED_CHECKPOINTS)
def test_a_replica_changes_only_widths_and_depths_of_the_published_config(published_replicas, checkpoint):
    published = _leaves(json.loads((published_files(checkpoint) / 'config.json').read_text()))
    replica = _leaves(json.loads((published_replicas[checkpoint] / 'config.json').read_text()))
    changed = {path for path in published.keys() | replica.keys() if published.get(path) != replica.get(path)}
    assert changed and {path[-1] for path in changed} <= SIZE_FIELDS | RULE_FIELDS, sorted(changed)
    copied = [path for path in published_files(checkpoint).iterdir() if path.name not in REWRITTEN_FILES]
    assert {path.name for path in copied} >= {'tokenizer_config.json', 'generation_config.json'}
    for path in copied:
        assert (published_replicas[checkpoint] / path.name).read_text() == path.read_text()


def test_the_qwen_replica_shrinks_m_rope_and_the_window_layout_by_their_rules(published_replicas):
    """M-RoPE's [16, 24, 24] of Qwen2.5-VL-3B's 128-wide heads scales to [2, 3, 3] of the replica's 16-wide
    heads; the tower's 32 layers (full attention at 7, 15, 23, 31 after runs of 7 window layers) keep their
    four full-attention layers with one window layer before each; everything else in them as published."""
    published = json.loads((published_files(QWEN) / 'config.json').read_text())
    replica = json.loads((published_replicas[QWEN] / 'config.json').read_text())
    assert REPLICA_SIZES.text_hidden // REPLICA_SIZES.text_heads == 16
    assert replica['rope_scaling'] == {'type': 'mrope', 'mrope_section': [2, 3, 3]}
    assert published['rope_scaling'] == {'type': 'mrope', 'mrope_section': [16, 24, 24]}
    assert (replica['vision_config']['depth'], replica['vision_config']['fullatt_block_indexes']) == (8, [1, 3, 5, 7])
    assert replica['vision_config']['window_size'] == published['vision_config']['window_size'] == 112
    assert replica['tie_word_embeddings'] is True and replica['vocab_size'] == published['vocab_size'] == 151936


def test_the_shrinking_rules_on_hand_computed_cases():
    from zip_vlm_ros.tools.published_replica import shrink_mrope_section, shrink_window_layout

    assert shrink_mrope_section([16, 24, 24], 128, 32) == [4, 6, 6]
    with pytest.raises(ValueError, match='whole frequency pairs'):
        shrink_mrope_section([16, 24, 24], 128, 8)  # 16 * 8 / 128 = 1, but 24 * 8 / 128 = 1.5
    with pytest.raises(ValueError, match='not head_dim / 2'):
        shrink_mrope_section([16, 24, 24], 96, 16)
    assert shrink_window_layout(32, [7, 15, 23, 31], window_run=2) == (12, [2, 5, 8, 11])
    # no window layers before the first full one, and two after the last: [full, window, full, window]
    assert shrink_window_layout(6, [0, 3]) == (4, [0, 2])
    with pytest.raises(ValueError, match='ascending layer indexes below depth 4'):
        shrink_window_layout(4, [3, 5])


@pytest.mark.parametrize('checkpoint', PUBLISHED_CHECKPOINTS)
def test_a_replica_tokenizer_has_the_published_special_tokens_at_their_ids(engines, checkpoint):
    settings = json.loads((published_files(checkpoint) / 'tokenizer_config.json').read_text())
    tokenizer = engines[checkpoint].processor.tokenizer
    placed = {int(index): tokenizer.convert_tokens_to_ids(entry['content'])
              for index, entry in settings['added_tokens_decoder'].items()}
    assert placed == {index: index for index in placed}
    assert (tokenizer.bos_token, tokenizer.eos_token) == (settings['bos_token'], settings['eos_token'])


def test_the_qwen_replica_tokenizer_is_byte_level_through_qwen2_tokenizer(engines):
    """transformers loads it as the Qwen2Tokenizer tokenizer_config.json names (that class's own byte-level
    pipeline; tokenizer.json gives only the vocabulary), and every text round-trips: spaces, newlines,
    digits and characters outside the training text, with no <unk> (Qwen has none)."""
    tokenizer = engines[QWEN].processor.tokenizer
    assert type(tokenizer).__name__ == 'Qwen2Tokenizer' and tokenizer.unk_token is None
    text = 'Is the door open?\nYes, 2 m to the caf\u00e9.'
    ids = tokenizer(text, add_special_tokens=False)['input_ids']
    assert tokenizer.decode(ids) == text and max(ids) < REPLICA_SIZES.tokenizer_vocab
    assert tokenizer.convert_ids_to_tokens(tokenizer(' door', add_special_tokens=False)['input_ids']) == ['\u0120door']


def test_the_llava_1_5_replica_weights_carry_the_published_names_in_the_published_shards(published_replicas):
    published = json.loads((published_files(LLAVA_HF[0]) / 'model.safetensors.index.json').read_text())['weight_map']
    replica = json.loads((published_replicas[LLAVA_HF[0]] / 'model.safetensors.index.json').read_text())['weight_map']
    depth = {'language_model.model.layers': REPLICA_SIZES.text_layers,
             'vision_tower.vision_model.encoder.layers': REPLICA_SIZES.vision_layers}

    def kept(name: str) -> bool:
        match = re.match(r'(.+)\.(\d+)\.', name)
        return match is None or int(match.group(2)) < depth[match.group(1)]

    assert replica == {name: shard for name, shard in published.items() if kept(name)}
    assert {path.name for path in published_replicas[LLAVA_HF[0]].glob('*.safetensors')} == set(replica.values())


def test_the_qwen_replica_weights_carry_the_published_names_in_the_published_shards(published_replicas):
    """Qwen2.5-VL-3B's two shards, ``model.*`` and ``visual.*`` names, and no ``lm_head.weight`` (tied to the
    embeddings); the replica's 2 LLM layers and 8 tower blocks are the first of the published ones."""
    from safetensors import safe_open

    published = json.loads((published_files(QWEN) / 'model.safetensors.index.json').read_text())['weight_map']
    replica = json.loads((published_replicas[QWEN] / 'model.safetensors.index.json').read_text())['weight_map']
    depth = {'model.layers': REPLICA_SIZES.text_layers, 'visual.blocks': 8}

    def kept(name: str) -> bool:
        match = re.match(r'(model\.layers|visual\.blocks)\.(\d+)\.', name)
        return match is None or int(match.group(2)) < depth[match.group(1)]

    assert 'lm_head.weight' not in published
    assert replica == {name: shard for name, shard in published.items() if kept(name)}
    assert set(replica.values()) == {'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'}
    for shard in set(replica.values()):
        with safe_open(str(published_replicas[QWEN] / shard), 'pt') as weights:
            assert set(weights.keys()) == {name for name, file in replica.items() if file == shard}


@pytest.mark.parametrize('checkpoint', LLAVA_HF + [QWEN])
def test_the_llava_and_qwen_prompt_is_the_checkpoints_own_token_for_token(engines, checkpoint):
    """The stock processor's ids (its chat template, its image-token expansion) at the full count; at a
    budget, the same with the placeholder run shortened ('visual-token budget')."""
    engine, image = engines[checkpoint], skimage.data.astronaut()
    processor = engine.processor
    conversation = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': QUESTION}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    stock = processor(images=image, text=text, return_tensors='pt')['input_ids'][0].tolist()
    full = engine.family.full_token_count(image.shape[:2])
    assert stock.count(engine.image_token_id) == full
    assert list(sum(engine.prompts.tokenize(QUESTION, full), ())) == stock
    first = stock.index(engine.image_token_id)
    shortened = stock[:first] + [engine.image_token_id] * 64 + stock[first + full:]
    assert list(sum(engine.prompts.tokenize(QUESTION, 64), ())) == shortened


def test_the_llava_mini_prompt_is_the_checkpoints_own_token_for_token(engines):
    """The reference's prompt: the checkpoint's chat template over LLaVA-Mini's system message and the user
    turn ``<image>\\n{question}``, split at ``<image>`` and tokenized piecewise (tokenizer_image_token),
    except for 'one BOS', 'assistant header' and 'image placeholder id'."""
    from zip_vlm_ros.models.llava_mini import SYSTEM_PROMPT

    engine = engines[MINI]
    tokenizer = engine.processor.tokenizer  # the checkpoint's own class, plus the <image> marker
    messages = [{'role': 'system', 'content': SYSTEM_PROMPT}, {'role': 'user', 'content': f'<image>\n{QUESTION}'}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    before, after = text.split('<image>')
    reference = tokenizer(before)['input_ids'] + [-200] + tokenizer(after)['input_ids'][1:]
    assert reference[:2] == [tokenizer.bos_token_id] * 2  # the reference's two BOS
    header = tokenizer('<|start_header_id|>assistant<|end_header_id|>\n\n', add_special_tokens=False)['input_ids']
    expected = [engine.image_token_id if token == -200 else token for token in reference[1:]] + header
    assert list(sum(engine.prompts.tokenize(QUESTION, 1), ())) == expected
    assert engine.image_token_id == len(tokenizer) - 1 == 128256


@pytest.mark.parametrize('checkpoint', PUBLISHED_CHECKPOINTS)
def test_generation_stops_at_the_checkpoints_own_stop_tokens(engines, checkpoint):
    """Every EOS id of generation_config.json ends the answer when the model predicts it; a token that is
    not one does not. The prediction is forced: the probed token's lm_head row becomes twice the row of
    the token the model predicts first (a positive top logit, so the probe's logit is the new maximum).
    Qwen2.5-VL-3B ties lm_head to the embeddings; the probe changes an untied copy, so the prompt (which
    holds <|im_end|>, a stop token) is embedded as before."""
    engine, image = engines[checkpoint], skimage.data.coffee()
    eos = json.loads((published_files(checkpoint) / 'generation_config.json').read_text())['eos_token_id']
    stop_ids = set(eos) if isinstance(eos, list) else {eos}
    assert engine.eos_token_ids == stop_ids
    tied = engine.model.lm_head.weight
    assert (tied is engine.model.get_input_embeddings().weight) == (checkpoint == QWEN)
    engine.model.lm_head.weight = torch.nn.Parameter(tied.detach().clone(), requires_grad=False)
    lm_head = engine.model.lm_head.weight
    original = lm_head.detach().clone()
    first, logit = _first_token(engine, image)
    assert logit > 0 and first not in stop_ids
    filler = next(index for index in range(len(original) - 1, 0, -1)
                  if index not in stop_ids and index != engine.image_token_id)
    try:
        for probe in sorted(stop_ids) + [filler]:
            with torch.no_grad():
                lm_head.copy_(original)
                lm_head[probe] = 2 * original[first]
            engine.clear_prefix_cache()
            out = engine.generate(image, QUESTION, max_new_tokens=4)
            assert out.generated_tokens == (1 if probe in stop_ids else 4), (probe, out)
            if probe in stop_ids:
                assert out.text == ''
    finally:
        engine.model.lm_head.weight = tied
        engine.clear_prefix_cache()


def _first_token(engine, image) -> tuple[int, float]:
    """The token the model predicts first for QUESTION about `image`, and its logit."""
    steps = []
    with pytest.raises(GenerationStopped) as stopped:
        engine.generate(image, QUESTION, max_new_tokens=2, on_token=steps.append,
                        should_stop=lambda: 'probed' if steps else None)
    first = stopped.value.tokens[0][0]
    logits = []
    handle = engine.model.lm_head.register_forward_hook(lambda module, args, output: logits.append(output[0, -1]))
    try:
        engine.clear_prefix_cache()
        engine.generate(image, QUESTION, max_new_tokens=1)
    finally:
        handle.remove()
    assert int(logits[0].argmax()) == first
    return first, float(logits[0][first])


def test_the_engine_reads_the_published_fields_that_shape_the_model(engines):
    """The fields a replica keeps reach the loaded model: Llama-3.1's rope scaling, AnyRes pinpoints."""
    rope = engines[MINI].family.hf_config.rope_parameters
    assert (rope['rope_type'], rope['factor'], rope['original_max_position_embeddings']) == ('llama3', 8.0, 8192)
    assert engines[MINI].context_tokens == 131072
    for checkpoint in LLAVA_HF[1:]:
        published = json.loads((published_files(checkpoint) / 'config.json').read_text())
        assert engines[checkpoint].family.hf_config.image_grid_pinpoints == published['image_grid_pinpoints']


def test_the_qwen_replica_loads_the_published_fields_that_shape_the_model(engines):
    """Qwen2.5-VL-3B's flat config (LLM fields at the top level, the old "type": "mrope" key) reaches the
    model: M-RoPE sections in the rotary embedding, the window layout in the tower, tied embeddings, the
    context length and the image processor's pixel bounds."""
    engine = engines[QWEN]
    model = engine.model.model
    assert model.language_model.rotary_emb.mrope_section == [2, 3, 3]
    assert (model.visual.fullatt_block_indexes, model.visual.window_size, len(model.visual.blocks)) == ([1, 3, 5, 7],
                                                                                                          112, 8)
    assert engine.model.lm_head.weight is engine.model.get_input_embeddings().weight
    assert engine.context_tokens == 128000
    assert (engine.family.min_pixels, engine.family.max_pixels) == (3136, 12845056)
    # skimage's 512 x 512 astronaut: resized to 504 x 504, 36 x 36 patches, 18 x 18 merged tokens
    assert engine.family.token_grid((512, 512)) == (18, 18)


def test_the_qwen_replica_at_the_full_count_answers_as_stock_generate(engines):
    """The published config's fields (flat LLM fields, M-RoPE sections, window layout, tied embeddings) mean
    the same to the adapter as to the stock model: one image and two, greedy, token for token."""
    from zip_vlm_ros.engine.requests import ImageInput

    engine = engines[QWEN]
    odd = skimage.data.astronaut()[100:200, 200:330].copy()  # 100 x 130: resized to 112 x 140
    for images in ([skimage.data.astronaut()], [odd, skimage.data.coffee()]):
        content = [{'type': 'image'} for _ in images] + [{'type': 'text', 'text': QUESTION}]
        text = engine.processor.apply_chat_template([{'role': 'user', 'content': content}], add_generation_prompt=True)
        inputs = engine.processor(images=images, text=text, return_tensors='pt')
        with torch.inference_mode():
            generated = engine.model.generate(**inputs, max_new_tokens=6, do_sample=False, repetition_penalty=1.0)
        stock = engine.tokenizer.decode(generated[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()
        output = engine.generate_images([ImageInput(image, '') for image in images], [QUESTION],
                                        token_budget=100_000, max_new_tokens=6)[0]
        assert output.reduction == 'none' and output.generated_tokens == 6
        assert output.text == stock and stock


def test_a_llava_mini_checkpoint_without_tokenizer_config_is_refused_by_name(published_replicas, tmp_path):
    from zip_vlm_ros.errors import ModelLoadError

    broken = tmp_path / 'llava-mini'
    shutil.copytree(published_replicas[MINI], broken)
    (broken / 'tokenizer_config.json').unlink()
    with pytest.raises(ModelLoadError, match='cannot read tokenizer_config.json'):
        VlmEngine(EngineConfig(model=str(broken), device='cpu',
                               vision_tower=str(published_replicas[PUBLISHED_CLIP_TOWER])))


def test_vlm_published_replica_refuses_a_used_directory_and_an_unknown_family(tmp_path, capsys):
    from zip_vlm_ros.tools.published_replica import main

    used = tmp_path / 'used'
    used.mkdir()
    (used / 'something').write_text('kept')
    assert main([str(published_files(LLAVA_HF[0])), str(used)]) == 2
    assert 'is not empty' in capsys.readouterr().err and (used / 'something').read_text() == 'kept'
    paligemma = tmp_path / 'paligemma'
    paligemma.mkdir()
    (paligemma / 'config.json').write_text(json.dumps({'model_type': 'paligemma'}))
    assert main([str(paligemma), str(tmp_path / 'out')]) == 2
    assert "no replica for model_type 'paligemma'" in capsys.readouterr().err
