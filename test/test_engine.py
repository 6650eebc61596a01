"""VlmEngine on the offline tiny LLaVA checkpoint: loading errors, stock equivalence, VisionZip budgets,
batches, sampling and request validation."""
import shutil

import numpy as np
import pytest
import skimage.data
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zip_vlm_ros.engine import (EngineConfig, EngineError, ModelLoadError, RequestError, SamplingOptions,
                                VlmEngine)
from zip_vlm_ros.models.clip_features import encode_reference_style
from zip_vlm_ros.reducers import split_budget, visionzip_compress

IMAGES = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}
PROMPTS = ["What is in the image?", "Describe the scene in detail, please.", "Is the path clear?"]
FULL = 16  # the tiny preset: 56 px / patch 14 -> 16 patches, "default" strategy drops CLS


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    # CPU even where CUDA exists: these tests compare exact token sequences in float32.
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", max_new_tokens=10))
    yield engine
    engine.close()


def _chat_text(engine, prompt: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return engine.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def _stock_generate(engine, image, prompt, max_new_tokens) -> list[int]:
    """New token ids from stock processor + LlavaForConditionalGeneration.generate (greedy)."""
    inputs = engine.processor(images=image, text=_chat_text(engine, prompt), return_tensors="pt").to(engine.device)
    with torch.inference_mode():
        output = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs.input_ids.shape[1]:].tolist()


def _decoded(engine, token_ids) -> str:
    return engine.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------- loading

def _load_error(tmp_path, **config) -> str:
    with pytest.raises(ModelLoadError) as error:
        VlmEngine(EngineConfig(**config))
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, EngineError)
    return message


def test_load_error_missing_path(tmp_path):
    message = _load_error(tmp_path, model=str(tmp_path / "no_such_model"))
    assert "does not exist" in message and "no_such_model" in message


def test_load_error_directory_without_config(tmp_path):
    (tmp_path / "photos").mkdir()
    assert "no config.json" in _load_error(tmp_path, model=str(tmp_path / "photos"))


def test_load_error_names_the_non_llava_model_type(tmp_path):
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    message = _load_error(tmp_path, model=str(tmp_path / "llama"))
    assert "is not a LLaVA checkpoint" in message
    assert "model_type 'llama'" in message and "LlamaForCausalLM" in message


def test_load_error_cuda_requested_but_absent_or_out_of_range(tmp_path, tiny_model_dir):
    if torch.cuda.is_available():
        message = _load_error(tmp_path, model=str(tiny_model_dir), device=f"cuda:{torch.cuda.device_count()}")
        assert "does not exist" in message
    else:
        message = _load_error(tmp_path, model=str(tiny_model_dir), device="cuda")
        assert "CUDA is not available" in message and "'cpu'" in message
        assert "CUDA is not available" in _load_error(tmp_path, model=str(tiny_model_dir), device="cuda:0")


@pytest.mark.parametrize("field, value, expected", [
    ("device", "tpu", "device 'tpu' is not supported; use one of auto, cpu, cuda or cuda:N"),
    ("device", "cuda:x", "device 'cuda:x' is not valid"),
    ("dtype", "float8", "dtype 'float8' is not supported; use auto, float16, bfloat16 or float32"),
    ("contextual_ratio", 1.0, "contextual_ratio must be in [0, 1)"),
    ("token_budget", 0, "token_budget must be a whole number >= 1"),
    ("prefix_cache_entries", -1, "prefix_cache_entries must be a whole number >= 0"),
    ("model", "  ", "model is empty"),
])
def test_load_error_bad_config_values(tmp_path, tiny_model_dir, field, value, expected):
    config = {"model": str(tiny_model_dir), field: value}
    assert expected in _load_error(tmp_path, **config)


def test_loaded_engine_describes_itself(engine, tiny_model_dir):
    assert engine.model_name == str(tiny_model_dir)
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32
    assert engine.visual_tokens_full == FULL
    assert not engine.model.training
    assert engine.model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------- stock equivalence

@pytest.mark.parametrize("image_name, prompt", [("astronaut", PROMPTS[0]), ("coffee", PROMPTS[1]),
                                                ("chelsea", PROMPTS[2])])
def test_full_budget_is_token_for_token_stock_generate(engine, image_name, prompt):
    image = IMAGES[image_name]
    stock = _stock_generate(engine, image, prompt, max_new_tokens=16)
    for budget in (FULL, 10_000):
        output = engine.generate(image, prompt, token_budget=budget, max_new_tokens=16)
        assert output.reduction == "none" and output.reduction_ms == 0.0
        assert output.token_budget == output.visual_tokens == FULL
        assert output.generated_tokens == len(stock)
        assert output.text == _decoded(engine, stock)


@pytest.mark.parametrize("budget", [1, 4, 8, 15])
def test_reduced_budget_matches_stock_generate_on_reference_visionzip_tokens(engine, budget):
    """The engine's fast path and placement vs. the VisionZip reference encoder + stock generate."""
    image, prompt = IMAGES["rocket"], PROMPTS[0]
    text = _chat_text(engine, prompt).replace("<image>", "<image>" * budget)
    input_ids = engine.tokenizer(text, return_tensors="pt").input_ids
    pixel_values = engine.processor.image_processor(images=image, return_tensors="pt").pixel_values
    llava = engine.model.model
    with torch.inference_mode():
        features = encode_reference_style(llava.vision_tower, pixel_values, feature_layer=-2)
        tokens, _ = visionzip_compress(*features, *split_budget(budget, 10 / 64))
        image_features = llava.multi_modal_projector(tokens)[0]  # [budget, text_hidden]
        inputs_embeds = engine.model.get_input_embeddings()(input_ids).clone()
        inputs_embeds[input_ids == engine.image_token_id] = image_features
        stock = engine.model.generate(inputs_embeds=inputs_embeds, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=12, do_sample=False)[0].tolist()

    output = engine.generate(image, prompt, token_budget=budget, max_new_tokens=12)
    assert output.reduction == "visionzip"
    assert output.token_budget == output.visual_tokens == budget
    assert output.visual_tokens_full == FULL
    assert output.generated_tokens == len(stock)
    assert output.text == _decoded(engine, stock)


def test_budgets_report_tokens_timings_and_cache_size(engine):
    image = IMAGES["chelsea"]
    outputs = {budget: engine.generate(image, PROMPTS[2], token_budget=budget, max_new_tokens=6)
               for budget in (2, 4, 8, FULL)}
    for budget, output in outputs.items():
        assert output.visual_tokens == budget
        assert output.reduction == ("none" if budget == FULL else "visionzip")
        assert 1 <= output.generated_tokens <= 6
        assert output.prompt == PROMPTS[2] and output.text
        assert output.vision_ms > 0 and output.prefill_ms > 0 and output.decode_ms >= 0
        assert output.reduction_ms > 0 if budget < FULL else output.reduction_ms == 0
        assert output.ttft_ms >= output.vision_ms + output.reduction_ms + output.prefill_ms
        assert output.total_ms >= output.ttft_ms + output.decode_ms
        assert not output.prefix_reused
    # The prefix KV cache grows by one position per visual token: same prefix text, 2 -> 16 tokens.
    per_token = (outputs[4].kv_cache_bytes - outputs[2].kv_cache_bytes) / 2
    assert per_token > 0
    assert outputs[FULL].kv_cache_bytes - outputs[2].kv_cache_bytes == per_token * (FULL - 2)


def test_default_budget_comes_from_the_config(engine, tiny_model_dir):
    assert engine.check_budget(None) == FULL  # config default 64 >= 16: no reduction
    assert engine.check_budget(5) == 5 and engine.check_budget(np.int64(7)) == 7
    reduced = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", token_budget=6, max_new_tokens=3))
    try:
        output = reduced.generate(IMAGES["coffee"], PROMPTS[0])
        assert (output.token_budget, output.reduction, output.generated_tokens) == (6, "visionzip", 3)
    finally:
        reduced.close()


# ---------------------------------------------------------------------- batches

@pytest.mark.parametrize("budget", [FULL, 8, 3])
def test_batch_matches_per_image_generate(engine, budget):
    images = [IMAGES["astronaut"], IMAGES["coffee"], IMAGES["chelsea"]]
    # Prompts of different lengths: the batch is left-padded.
    batch = engine.generate_batch(images, PROMPTS, token_budget=budget, max_new_tokens=10)
    singles = [engine.generate(image, prompt, token_budget=budget, max_new_tokens=10)
               for image, prompt in zip(images, PROMPTS)]
    assert [o.text for o in batch] == [o.text for o in singles]
    assert [o.generated_tokens for o in batch] == [o.generated_tokens for o in singles]
    assert [o.prompt for o in batch] == PROMPTS
    assert {o.visual_tokens for o in batch} == {budget}
    assert len({o.text for o in batch}) == 3  # the images (and prompts) matter


def test_each_batch_row_stops_at_its_own_eos(tiny_model_dir):
    """Make EOS the winner wherever one row would emit a token the other row never emits."""
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu", max_new_tokens=10))
    try:
        images, prompts = [IMAGES["astronaut"], IMAGES["coffee"]], PROMPTS[:2]
        first, second = (_stock_generate(engine, image, prompt, 10) for image, prompt in zip(images, prompts))
        stop_step = next(step for step, token in enumerate(first)
                         if step >= 2 and token not in first[:step] and token not in second)
        eos = engine.tokenizer.eos_token_id
        with torch.no_grad():
            engine.model.lm_head.weight[eos] = 1.5 * engine.model.lm_head.weight[first[stop_step]]
        stock_first = _stock_generate(engine, images[0], prompts[0], 10)
        assert stock_first[-1] == eos and len(stock_first) == stop_step + 1

        single = engine.generate(images[0], prompts[0])
        assert single.generated_tokens == stop_step + 1
        assert single.text == _decoded(engine, stock_first)
        batch = engine.generate_batch(images, prompts)
        assert [o.generated_tokens for o in batch] == [stop_step + 1, 10]
        assert [o.text for o in batch] == [single.text, engine.generate(images[1], prompts[1]).text]
    finally:
        engine.close()


# ---------------------------------------------------------------------- sampling

def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    image = IMAGES["astronaut"]

    def sample(seed, **options):
        return engine.generate(image, PROMPTS[0], token_budget=8, max_new_tokens=12,
                               sampling=SamplingOptions(do_sample=True, seed=seed, **options)).text

    assert sample(7) == sample(7)
    assert sample(7, temperature=0.7, top_p=0.9, top_k=50) == sample(7, temperature=0.7, top_p=0.9, top_k=50)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_sampling_with_one_candidate_is_greedy(engine):
    image = IMAGES["coffee"]
    greedy = engine.generate(image, PROMPTS[1], token_budget=8, max_new_tokens=12).text
    for options in (SamplingOptions(do_sample=True, top_k=1, seed=3),
                    SamplingOptions(do_sample=True, top_p=1e-6, seed=4),
                    SamplingOptions(do_sample=True, temperature=1e-4, seed=5)):
        assert engine.generate(image, PROMPTS[1], token_budget=8, max_new_tokens=12, sampling=options).text == greedy


# ---------------------------------------------------------------------- request errors

def _request_error(call) -> str:
    with pytest.raises(RequestError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("budget, expected", [
    (0, "token_budget must be >= 1 (>= 16 means no reduction); got 0"),
    (-3, "got -3"),
    (2.5, "token_budget must be a whole number"),
    (True, "got True"),
])
def test_bad_budget(engine, budget, expected):
    assert expected in _request_error(lambda: engine.generate(IMAGES["coffee"], "Hi?", token_budget=budget))
    assert expected in _request_error(lambda: engine.check_budget(budget))


@pytest.mark.parametrize("prompt, expected", [
    ("", "prompt must be a non-empty question"),
    ("  \n ", "prompt must be a non-empty question"),
    (None, "got None"),
    ("What is <image>?", "must not contain the image placeholder '<image>'"),
])
def test_bad_prompt(engine, prompt, expected):
    assert expected in _request_error(lambda: engine.generate(IMAGES["coffee"], prompt))


@pytest.mark.parametrize("image, expected", [
    (np.zeros((32, 32), np.uint8), "got shape (32, 32) dtype uint8"),
    (np.zeros((32, 32, 4), np.uint8), "got shape (32, 32, 4)"),
    (np.zeros((32, 32, 3), np.float32), "dtype float32"),
    (np.zeros((0, 32, 3), np.uint8), "H, W >= 1; got shape (0, 32, 3)"),
    ([[0, 0, 0]], "numpy array; got list"),
])
def test_bad_image(engine, image, expected):
    assert expected in _request_error(lambda: engine.generate(image, "Hi?"))


def test_bad_request_options(engine):
    image = IMAGES["coffee"]
    assert "max_new_tokens must be a whole number >= 1" in _request_error(
        lambda: engine.generate(image, "Hi?", max_new_tokens=0))
    assert "temperature must be > 0" in _request_error(
        lambda: engine.generate(image, "Hi?", sampling=SamplingOptions(do_sample=True, temperature=0.0)))
    assert "top_p must be in (0, 1]" in _request_error(
        lambda: engine.generate(image, "Hi?", sampling=SamplingOptions(do_sample=True, top_p=1.5)))
    assert "one prompt per image; got 2 images and 1 prompts" in _request_error(
        lambda: engine.generate_batch([image, image], ["Hi?"]))
    assert "images[1] must be an HxWx3 uint8 RGB array" in _request_error(
        lambda: engine.generate_batch([image, image[..., 0]], ["Hi?", "Hi?"]))
    assert "prompts must be a non-empty list" in _request_error(lambda: engine.generate_many(image, []))
    assert "frame_key must be hashable" in _request_error(lambda: engine.generate(image, "Hi?", frame_key=["f", 1]))


def test_tiny_and_odd_sized_images_work_and_errors_leave_the_engine_usable(engine):
    with pytest.raises(RequestError):
        engine.generate(np.zeros((4, 4), np.uint8), "Hi?")
    for shape in ((1, 1, 3), (3, 3, 3), (480, 17, 3)):
        image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        assert engine.generate(image, "Hi?", token_budget=4, max_new_tokens=2).generated_tokens >= 1


def test_closed_engine_refuses_requests(tiny_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu"))
    engine.close()
    engine.close()
    with pytest.raises(EngineError, match="was closed; create a new VlmEngine"):
        engine.generate(IMAGES["coffee"], "Hi?")


# ---------------------------------------------------------------------- CUDA (skipped without a GPU)

def test_auto_device_and_dtype(tiny_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir)))
    try:
        cuda = torch.cuda.is_available()
        assert engine.device.type == ("cuda" if cuda else "cpu")
        assert engine.dtype == (torch.float16 if cuda else torch.float32)
        assert next(engine.model.parameters()).device.type == engine.device.type
    finally:
        engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_engine_generates_reuses_batches_and_frees_memory(tiny_model_dir, dtype):
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cuda", dtype=dtype, max_new_tokens=8))
    try:
        assert engine.device.type == "cuda" and engine.dtype == getattr(torch, dtype)
        image = IMAGES["astronaut"]
        for budget in (4, FULL):
            first = engine.generate(image, PROMPTS[0], token_budget=budget, frame_key=("gpu", budget))
            again = engine.generate(image, PROMPTS[0], token_budget=budget, frame_key=("gpu", budget))
            assert not first.prefix_reused and again.prefix_reused
            assert again.text == first.text and first.generated_tokens >= 1
            assert first.vision_ms > 0 and first.prefill_ms > 0
        if dtype == "float32":
            stock = _stock_generate(engine, image, PROMPTS[1], max_new_tokens=8)
            assert engine.generate(image, PROMPTS[1], token_budget=FULL).text == _decoded(engine, stock)
        batch = engine.generate_batch([image, IMAGES["coffee"]], PROMPTS[:2], token_budget=6)
        assert [o.visual_tokens for o in batch] == [6, 6] and all(o.generated_tokens >= 1 for o in batch)
        sampled = [engine.generate(image, PROMPTS[0], token_budget=6,
                                   sampling=SamplingOptions(do_sample=True, seed=5)).text for _ in range(2)]
        assert sampled[0] == sampled[1]
        allocated = torch.cuda.memory_allocated()
    finally:
        engine.close()
    assert torch.cuda.memory_allocated() < allocated


def test_load_error_corrupt_weights(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "cannot load the weights of" in _load_error(tmp_path, model=str(broken))


def test_strided_views_are_valid_images(engine):
    image = IMAGES["astronaut"]
    as_copy = engine.generate(np.ascontiguousarray(image[::-2, ::2, ::-1]), "Hi?", token_budget=4, max_new_tokens=4)
    as_view = engine.generate(image[::-2, ::2, ::-1], "Hi?", token_budget=4, max_new_tokens=4)
    assert as_view.text == as_copy.text
