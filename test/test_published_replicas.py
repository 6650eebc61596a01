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
from zip_vlm_ros.tools.published_replica import REPLICA_SIZES

LLAVA_HF = [checkpoint for checkpoint in PUBLISHED_CHECKPOINTS if checkpoint.startswith('llava-hf/')]
MINI = 'ICTNLP/llava-mini-llama-3.1-8b'
QUESTION = 'What is in front of the robot?'
# Where the engine's prompt deliberately differs from the checkpoint's own, by name (README, "Published checkpoints").
DEVIATIONS = {
    'visual-token budget': 'LLaVA and LLaVA-NeXT: the image placeholder run holds the reduced count, not the full one',
    'one BOS': "LLaVA-Mini: the reference's tokenizer_image_token yields two BOS tokens (its training drops one)",
    'assistant header': 'LLaVA-Mini: the prompt ends with the assistant header (the reference leaves it to the model)',
    'image placeholder id': "LLaVA-Mini: <image> is a special token at id len(vocab), the reference's -200",
}
# The config fields the replica may change: widths and depths.
SIZE_FIELDS = {'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads',
               'mm_hidden_size'}


def _leaves(config: dict, path: tuple = ()) -> dict:
    leaves = {}
    for key, value in config.items():
        leaves.update(_leaves(value, path + (key,)) if isinstance(value, dict) else {path + (key,): value})
    return leaves


@pytest.fixture(scope='module')
def engines(published_replicas):
    """One engine per replica (float32, CPU), as the node's configure builds it."""
    loaded = {checkpoint: VlmEngine(EngineConfig(
        model=str(published_replicas[checkpoint]), device='cpu', max_new_tokens=4,
        vision_tower=str(published_replicas[PUBLISHED_CLIP_TOWER]) if checkpoint == MINI else ''))
        for checkpoint in PUBLISHED_CHECKPOINTS}
    yield loaded
    for engine in loaded.values():
        engine.close()


@pytest.mark.parametrize('checkpoint', PUBLISHED_CHECKPOINTS)
def test_a_replica_changes_only_widths_and_depths_of_the_published_config(published_replicas, checkpoint):
    published = _leaves(json.loads((published_files(checkpoint) / 'config.json').read_text()))
    replica = _leaves(json.loads((published_replicas[checkpoint] / 'config.json').read_text()))
    changed = {path for path in published.keys() | replica.keys() if published.get(path) != replica.get(path)}
    assert changed and {path[-1] for path in changed} <= SIZE_FIELDS, sorted(changed)
    for name in ('tokenizer_config.json', 'generation_config.json', 'special_tokens_map.json'):
        assert (published_replicas[checkpoint] / name).read_text() == (published_files(checkpoint) / name).read_text()


@pytest.mark.parametrize('checkpoint', PUBLISHED_CHECKPOINTS)
def test_a_replica_tokenizer_has_the_published_special_tokens_at_their_ids(engines, checkpoint):
    settings = json.loads((published_files(checkpoint) / 'tokenizer_config.json').read_text())
    tokenizer = engines[checkpoint].processor.tokenizer
    placed = {int(index): tokenizer.convert_tokens_to_ids(entry['content'])
              for index, entry in settings['added_tokens_decoder'].items()}
    assert placed == {index: index for index in placed}
    assert (tokenizer.bos_token, tokenizer.eos_token) == (settings['bos_token'], settings['eos_token'])


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


@pytest.mark.parametrize('checkpoint', LLAVA_HF)
def test_the_llava_prompt_is_the_checkpoints_own_token_for_token(engines, checkpoint):
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
    the token the model predicts first (a positive top logit, so the probe's logit is the new maximum)."""
    engine, image = engines[checkpoint], skimage.data.coffee()
    eos = json.loads((published_files(checkpoint) / 'generation_config.json').read_text())['eos_token_id']
    stop_ids = set(eos) if isinstance(eos, list) else {eos}
    assert engine.eos_token_ids == stop_ids
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
        with torch.no_grad():
            lm_head.copy_(original)
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
    qwen = tmp_path / 'qwen'
    qwen.mkdir()
    (qwen / 'config.json').write_text(json.dumps({'model_type': 'qwen2_5_vl'}))
    assert main([str(qwen), str(tmp_path / 'out')]) == 2
    assert "no replica for model_type 'qwen2_5_vl'" in capsys.readouterr().err
