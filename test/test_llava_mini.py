"""LLaVA-Mini on offline checkpoints in the released layout: logits against the reference formulation
built independently from the tensors, the prompt's tokens, the caching contract, budgets that do not
apply, half precision on the CPU, and where the CLIP tower comes from."""
import json
import shutil

import numpy as np
import pytest
import skimage.data
import torch
from llava_mini_reference import IMAGE_SENTINEL, load_tensors, reference_logits, sincos_table

from zip_vlm_ros.engine import EngineConfig, ModelLoadError, SamplingOptions, VlmEngine
from zip_vlm_ros.models.llava_mini import pad_to_square
from zip_vlm_ros.tools.tiny_model_mini import CLIP_SUBDIR

IMAGES = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}
# "é" is outside the tiny tokenizer's alphabet: it becomes <unk>, token id 0, which pre-fusion skips.
QUESTIONS = ["Describe the scene.", "Is there a person in front of the robot?", "Is the café open?"]


def _engine(model_dir, **config) -> VlmEngine:
    # CPU even where CUDA exists: the tests compare exact token sequences in float32.
    return VlmEngine(EngineConfig(model=str(model_dir), device="cpu", max_new_tokens=8, **config))


@pytest.fixture(scope="module")
def engine(tiny_mini_model_dir):
    engine = _engine(tiny_mini_model_dir)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def uncached(tiny_mini_model_dir):
    engine = _engine(tiny_mini_model_dir, prefix_cache_entries=0)
    yield engine
    engine.close()


def _adapter_logits(engine, image, question):
    """The engine's own path: its tokenization, the adapter's encode and embed_prompt, the LLM."""
    family = engine.family
    prefix_ids, suffix_ids = engine.prompts.tokenize(question, family.visual_tokens_full)
    with torch.inference_mode():
        visual = family.encode([image], 1)
        embedded = family.embed_prompt(prefix_ids + suffix_ids, len(prefix_ids), visual)
        logits = engine.model(inputs_embeds=embedded.inputs_embeds).logits[0]
    return prefix_ids + suffix_ids, logits


@pytest.mark.parametrize("which", ["tiny-mini", "c2"])
@pytest.mark.parametrize("question", QUESTIONS)
def test_logits_match_the_reference_formulation_in_float32(tiny_mini_model_dir, mini_c2_dir, which, question):
    model_dir = tiny_mini_model_dir if which == "tiny-mini" else mini_c2_dir
    engine = _engine(model_dir)
    try:
        image = IMAGES["astronaut"]
        ids, logits = _adapter_logits(engine, image, question)
        expected_ids, expected = reference_logits(model_dir, image, question)
        # The same prompt: one sentinel in the reference where the engine has C^2 placeholders.
        placeholder = engine.family.image_token_id
        collapsed = [IMAGE_SENTINEL if token == placeholder else token for index, token in enumerate(ids)
                     if token != placeholder or ids[index - 1] != placeholder]
        assert collapsed == expected_ids
        assert ids.count(placeholder) == engine.family.visual_tokens_full == (1 if which == "tiny-mini" else 4)
        if "é" in question:
            assert 0 in ids  # token id 0 is in the prompt, so its pre-fusion masking is exercised
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    finally:
        engine.close()


def test_checkpoint_holds_the_published_parameter_names_and_table(tiny_mini_model_dir):
    config = json.loads((tiny_mini_model_dir / "config.json").read_text())
    assert config["model_type"] == "llava_mini_llama" and config["mm_projector_type"] == "mlp2x_gelu"
    assert (config["compressor_size"], config["prefusion_layer_num"], config["mm_vision_select_layer"]) == (1, 4, -2)
    tensors = load_tensors(tiny_mini_model_dir)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.mm_projector.0.weight",
                 "model.mm_projector.2.bias", "model.compressor.query", "model.compressor.attn.in_proj_weight",
                 "model.compressor.ln_kv.bias", "model.prefusion_layers.3.mlp.down_proj.weight",
                 "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"):
        assert name in tensors, name
    torch.testing.assert_close(tensors["model.compressor.pos_embed"], sincos_table(config["mm_hidden_size"], 1))


def test_sincos_table_matches_the_reference_order(mini_c2_dir):
    tensors = load_tensors(mini_c2_dir)
    table = tensors["model.compressor.pos_embed"]
    torch.testing.assert_close(table, sincos_table(table.shape[1], 2))
    # Cell (row 0, column 1): the first half encodes the column, so it differs from cell (1, 0) there.
    assert not torch.equal(table[1, :table.shape[1] // 2], table[2, :table.shape[1] // 2])


def test_results_report_llava_mini_counts_and_budgets_do_not_apply(engine):
    image = IMAGES["coffee"]
    outputs = [engine.generate(image, QUESTIONS[0], token_budget=budget) for budget in (None, 1, 64, 10_000)]
    assert {(o.reduction, o.visual_tokens, o.visual_tokens_full, o.token_budget) for o in outputs} == \
        {("llava-mini", 1, 1, 1)}
    assert len({o.text for o in outputs}) == 1 and outputs[0].generated_tokens >= 1
    assert engine.visual_tokens_full == 1 and engine.token_budget_applies is False
    assert all(o.vision_ms > 0 and o.prefill_ms > 0 and o.kv_cache_bytes > 0 for o in outputs)


@pytest.mark.parametrize("sampling", [None, SamplingOptions(do_sample=True, temperature=0.9, top_k=50, seed=5)],
                         ids=["greedy", "seeded-sampling"])
def test_reused_prefix_answers_equal_from_scratch_token_for_token(tiny_mini_model_dir, uncached, sampling):
    cached = _engine(tiny_mini_model_dir)
    try:
        for index, name in enumerate(("astronaut", "chelsea")):
            key = ("front", index)
            questions = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[2], QUESTIONS[0]]
            outputs = [cached.generate(IMAGES[name], q, frame_key=key, sampling=sampling) for q in questions]
            expected = [uncached.generate(IMAGES[name], q, frame_key=key, sampling=sampling) for q in questions]
            assert [o.prefix_reused for o in outputs] == [False, True, True, True]
            assert not any(o.prefix_reused for o in expected)
            assert [o.text for o in outputs] == [o.text for o in expected]
            assert [o.generated_tokens for o in outputs] == [o.generated_tokens for o in expected]
            assert len({o.text for o in outputs}) >= 2  # the question matters
            # A reused prefix skips CLIP, the compressor and the prefix's pre-fusion and LLM prefill.
            assert all(o.vision_ms == 0 and o.reduction_ms == 0 for o in outputs[1:])
        # The cache holds each frame's pre-fusion keys/values besides the LLM's: more than the LLM prefix alone.
        assert cached.prefix_cache_bytes > 2 * outputs[0].kv_cache_bytes
        many = cached.generate_many(IMAGES["rocket"], QUESTIONS, sampling=sampling)
        assert [o.prefix_reused for o in many] == [False, True, True]
        assert [o.text for o in many] == [uncached.generate(IMAGES["rocket"], q, sampling=sampling).text
                                          for q in QUESTIONS]
    finally:
        cached.close()


def test_batch_matches_per_image_generate(engine):
    images = [IMAGES["astronaut"], IMAGES["coffee"], IMAGES["rocket"]]
    batch = engine.generate_batch(images, QUESTIONS)
    singles = [engine.generate(image, question) for image, question in zip(images, QUESTIONS)]
    assert [o.text for o in batch] == [o.text for o in singles]
    assert [o.generated_tokens for o in batch] == [o.generated_tokens for o in singles]
    assert {(o.reduction, o.visual_tokens) for o in batch} == {("llava-mini", 1)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_on_the_cpu(tiny_mini_model_dir, dtype):
    engine = VlmEngine(EngineConfig(model=str(tiny_mini_model_dir), device="cpu", dtype=dtype, max_new_tokens=4))
    try:
        assert engine.dtype == getattr(torch, dtype)
        assert {p.dtype for p in engine.family.prefusion.parameters()} == {engine.dtype}
        first = engine.generate(IMAGES["astronaut"], QUESTIONS[0], frame_key="half")
        again = engine.generate(IMAGES["astronaut"], QUESTIONS[1], frame_key="half")
        assert first.generated_tokens >= 1 and again.prefix_reused and again.generated_tokens >= 1
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_engine_generates_reuses_and_batches(tiny_mini_model_dir, dtype):
    engine = VlmEngine(EngineConfig(model=str(tiny_mini_model_dir), device="cuda", dtype=dtype, max_new_tokens=4))
    try:
        modules = (engine.model, engine.family.vision_tower, engine.family.compressor, engine.family.prefusion)
        assert {p.device.type for module in modules for p in module.parameters()} == {"cuda"}
        first = engine.generate(IMAGES["astronaut"], QUESTIONS[0], frame_key="gpu")
        again = engine.generate(IMAGES["astronaut"], QUESTIONS[1], frame_key="gpu")
        assert first.generated_tokens >= 1 and again.prefix_reused and again.generated_tokens >= 1
        batch = engine.generate_batch([IMAGES["coffee"], IMAGES["rocket"]], QUESTIONS[:2])
        assert all(o.generated_tokens >= 1 and o.visual_tokens == 1 for o in batch)
    finally:
        engine.close()


def _without_tower(source, target):
    """A copy of checkpoint `source` whose safetensors lack the CLIP tower, and a CLIP directory with it."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    shutil.copytree(source, target)
    tensors = load_tensors(source)
    prefix = "model.vision_tower.vision_tower."
    save_file({k: v.contiguous() for k, v in tensors.items() if not k.startswith(prefix)},
              str(target / "model.safetensors"), metadata={"format": "pt"})
    clip_dir = target.parent / f"{target.name}-clip"
    tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(source / CLIP_SUBDIR))
    named = prefix + "vision_model."  # the published names; transformers 5's module has no vision_model. level
    tower.load_state_dict({k[len(named):]: v for k, v in tensors.items() if k.startswith(named)})
    tower.save_pretrained(clip_dir)
    shutil.copy(source / CLIP_SUBDIR / "preprocessor_config.json", clip_dir)
    shutil.rmtree(target / CLIP_SUBDIR)
    return clip_dir


def test_tower_from_a_clip_directory_when_the_checkpoint_lacks_it(tiny_mini_model_dir, engine, tmp_path):
    clip_dir = _without_tower(tiny_mini_model_dir, tmp_path / "no-tower")
    with pytest.raises(ModelLoadError) as error:
        _engine(tmp_path / "no-tower")
    assert "vision_tower" in str(error.value) and "downloaded" in str(error.value)
    other = _engine(tmp_path / "no-tower", vision_tower=str(clip_dir))
    try:
        assert other.family.vision_source == str(clip_dir)
        for question in QUESTIONS[:2]:
            assert other.generate(IMAGES["chelsea"], question).text == engine.generate(IMAGES["chelsea"], question).text
    finally:
        other.close()


def test_a_hub_id_tower_is_never_downloaded(tiny_mini_model_dir, tmp_path, monkeypatch):
    # An empty Hugging Face cache (read when called), whatever this machine has downloaded before.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    broken = tmp_path / "hub-tower"
    shutil.copytree(tiny_mini_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as error:
        _engine(broken)
    assert "huggingface-cli download openai/clip-vit-large-patch14-336" in str(error.value)


@pytest.mark.parametrize("field, value, expected", [
    ("resolution_ratio", 2, "resolution_ratio = 1"),
    ("mm_projector_type", "linear", "mm_projector_type = 'mlp2x_gelu'"),
    ("image_aspect_ratio", "anyres", "image_aspect_ratio 'square' or 'pad'"),
])
def test_unsupported_config_values_are_refused_by_name(tiny_mini_model_dir, tmp_path, field, value, expected):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_mini_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config[field] = value
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as error:
        _engine(broken)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_pad_to_square_centres_the_image_on_the_fill_colour():
    image = np.full((2, 4, 3), 9, dtype=np.uint8)
    square = pad_to_square(image, (1, 2, 3))
    assert square.shape == (4, 4, 3)
    assert (square[1:3] == 9).all()
    assert (square[0] == (1, 2, 3)).all() and (square[3] == (1, 2, 3)).all()
    assert pad_to_square(square, (0, 0, 0)) is not square and (pad_to_square(square, (0, 0, 0)) == square).all()
