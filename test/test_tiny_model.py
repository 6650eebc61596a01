"""vlm_tiny_model: offline checkpoints that load and run like real LLaVA checkpoints."""
import dataclasses
import hashlib
import json

import pytest
import skimage.data
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from zip_vlm_ros.tools import tiny_model
from zip_vlm_ros.tools.tokenizer import train_tokenizer
from zip_vlm_ros.tools.tiny_model import MARKER_FILE, build_checkpoint, main


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _question_text(processor, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def test_tiny_checkpoint_loads_through_the_stock_loaders(tiny_model_dir):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    config = model.config
    assert config.model_type == "llava"
    assert config.vision_config.model_type == "clip_vision_model"
    assert config.text_config.model_type == "llama"
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == "default"
    assert (config.vision_config.image_size // config.vision_config.patch_size) ** 2 == 16
    assert processor.tokenizer.convert_ids_to_tokens(config.image_token_index) == "<image>"
    assert model.config._attn_implementation == "sdpa"


def test_chat_template_is_llava_1_5_style(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    assert _question_text(processor, "Is the path clear?") == "USER: <image>\nIs the path clear? ASSISTANT:"


def test_processor_expands_the_image_token_to_one_per_patch(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    text = _question_text(processor, "What is in the image?")
    inputs = processor(images=skimage.data.astronaut(), text=text, return_tensors="pt")
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert tuple(inputs.pixel_values.shape) == (1, 3, 56, 56)
    assert int((inputs.input_ids == image_token_id).sum()) == 16
    assert inputs.input_ids[0, 0].item() == processor.tokenizer.bos_token_id


def test_tokenizer_round_trips_text_and_marks_unknown_characters(tiny_model_dir):
    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    text = "Is the red box near the door?\nYes, two meters ahead."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    # Characters outside the training alphabet (so every token decodes to printable text).
    assert tokenizer.unk_token_id in tokenizer("café", add_special_tokens=False).input_ids


def test_random_model_generates_image_dependent_text(tiny_model_dir):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    text = _question_text(processor, "Describe the scene.")
    answers = []
    for image in (skimage.data.astronaut(), skimage.data.coffee()):
        inputs = processor(images=image, text=text, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        answers.append(output[0, inputs.input_ids.shape[1]:].tolist())
    # Not stuck on EOS, not one token repeated, printable, and the image matters.
    for answer in answers:
        assert len(answer) == 12
        assert len(set(answer)) > 3
        assert processor.decode(answer, skip_special_tokens=True).replace("\n", " ").isprintable()
    assert answers[0] != answers[1]


def test_build_is_deterministic_per_seed_and_idempotent(tmp_path, tiny_model_dir):
    again = build_checkpoint(tmp_path / "again", preset="tiny", seed=0)
    other_seed = build_checkpoint(tmp_path / "seed1", preset="tiny", seed=1)
    weights = _sha256(tiny_model_dir / "model.safetensors")
    assert _sha256(again / "model.safetensors") == weights
    assert _sha256(again / "tokenizer.json") == _sha256(tiny_model_dir / "tokenizer.json")
    assert _sha256(other_seed / "model.safetensors") != weights

    mtime = (again / "model.safetensors").stat().st_mtime_ns
    assert build_checkpoint(again, preset="tiny", seed=0) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((again / MARKER_FILE).read_text())["preset"] == "tiny"
    # Built beside the target and renamed in: no staging directories are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "seed1"]


def test_build_refuses_a_directory_holding_something_else(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="already holds a 'tiny' checkpoint with seed 0"):
        build_checkpoint(tiny_model_dir, preset="tiny", seed=3)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="already holds other files"):
        build_checkpoint(foreign)
    assert (foreign / "cat.jpg").read_bytes() == b"not a checkpoint"
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of tiny, bench"):
        build_checkpoint(tmp_path / "huge", preset="huge")


def test_bench_preset_has_llava_1_5_token_geometry():
    # Only the config: the bench weights take seconds and ~1.7 GB, and the benchmark builds them.
    tokenizer = train_tokenizer(tiny_model.PRESETS["bench"].tokenizer_vocab_size)
    config = tiny_model._llava_config(tiny_model.PRESETS["bench"], tokenizer)
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size, vision.num_hidden_layers) == (336, 14, 24)
    assert (vision.image_size // vision.patch_size) ** 2 == 576
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert (config.text_config.num_hidden_layers, config.text_config.hidden_size) == (8, 2048)


def test_cli_builds_and_reports_errors(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--preset", "tiny"]) == 0
    assert "16 visual tokens" in capsys.readouterr().out
    assert main([str(tmp_path / "cli"), "--preset", "tiny", "--seed", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("vlm_tiny_model: ") and "give an empty or new directory" in error
    assert len(error.splitlines()) == 1
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--preset", "huge"])


def test_mini_presets_share_the_llava_geometry_and_build_deterministically(tmp_path, tiny_mini_model_dir, capsys):
    for mini, base in (("tiny-mini", "tiny"), ("bench-mini", "bench")):
        spec, base_spec = tiny_model.PRESETS[mini], tiny_model.PRESETS[base]
        assert (spec.compressor_size, spec.prefusion_layers) == (1, 4)
        assert dataclasses.replace(spec, compressor_size=None) == base_spec
    assert main([str(tmp_path / "mini"), "--preset", "tiny-mini"]) == 0
    assert "LLaVA-Mini (1 token(s) per image, 4 pre-fusion layers)" in capsys.readouterr().out
    assert _sha256(tmp_path / "mini" / "model.safetensors") == _sha256(tiny_mini_model_dir / "model.safetensors")
    other_seed = build_checkpoint(tmp_path / "mini-seed1", preset="tiny-mini", seed=1)
    assert _sha256(other_seed / "model.safetensors") != _sha256(tiny_mini_model_dir / "model.safetensors")
    assert json.loads((other_seed / MARKER_FILE).read_text())["preset"] == "tiny-mini"


def test_qwen_presets_have_the_released_layout_and_bench_has_3b_vision_geometry(tiny_qwen_model_dir, capsys):
    from zip_vlm_ros.tools import tiny_model_qwen

    released = json.loads((tiny_qwen_model_dir / 'chat_template.json').read_text())['chat_template']
    assert released == tiny_model_qwen.QWEN_CHAT_TEMPLATE
    config = json.loads((tiny_qwen_model_dir / 'config.json').read_text())
    assert config['model_type'] == 'qwen2_5_vl' and config['architectures'] == ['Qwen2_5_VLForConditionalGeneration']
    preprocessor = json.loads((tiny_qwen_model_dir / 'preprocessor_config.json').read_text())
    assert preprocessor['processor_class'] == 'Qwen2_5_VLProcessor'
    # The bench preset: Qwen2.5-VL-3B's vision geometry (its weights take minutes to build: not here).
    spec = tiny_model_qwen.QWEN_PRESETS['bench-qwen2.5-vl']
    vision = {'patch_size': spec.patch_size, 'merge': spec.merge_size, 'window': spec.window_size,
              'depth': spec.vision_layers, 'full': spec.fullatt_block_indexes}
    assert vision == {'patch_size': 14, 'merge': 2, 'window': 112, 'depth': 32, 'full': (7, 15, 23, 31)}
    assert spec.text_hidden_size // spec.text_heads // 2 == sum(spec.mrope_section)  # the released 16/24/24
    assert main([str(tiny_qwen_model_dir), '--preset', 'tiny-qwen2.5-vl']) == 0
    assert 'Qwen2.5-VL checkpoint' in capsys.readouterr().out
