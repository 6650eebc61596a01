"""Offline Qwen2.5-VL checkpoints with random weights, for ``vlm_tiny_model --preset tiny-qwen2.5-vl``.

The layout is the released Qwen/Qwen2.5-VL-*-Instruct one (``Qwen2_5_VLForConditionalGeneration``, a
``Qwen2VLImageProcessor`` with ``min_pixels``/``max_pixels``, the checkpoint's chat template and its
special tokens ``<|im_start|>``, ``<|vision_start|>``, ``<|image_pad|>`` ...), so the files load through
the code that loads the real ones. The tokenizer is the tiny presets' BPE with Qwen's special tokens
and, as Qwen's, no BOS token.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

from zip_vlm_ros.tools.tokenizer import train_bpe

__all__ = ["QWEN_CHAT_TEMPLATE", "QWEN_PRESETS", "QWEN_SPECIAL_TOKENS", "QwenPreset", "write_qwen_checkpoint"]

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<unk>")

# Qwen/Qwen2.5-VL-3B-Instruct's chat_template.json (the default system turn, images as
# <|vision_start|><|image_pad|><|vision_end|> where the message puts them).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class QwenPreset:
    """Geometry and size of one offline Qwen2.5-VL checkpoint."""

    patch_size: int
    merge_size: int
    window_size: int                    # pixels per side of a window-attention window
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    fullatt_block_indexes: tuple[int, ...]
    text_hidden_size: int
    text_intermediate_size: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    mrope_section: tuple[int, int, int]  # halves of the head dim rotated by t, h, w (sum = head_dim / 2)
    max_position_embeddings: int
    tokenizer_vocab_size: int
    text_initializer_range: float
    min_pixels: int
    max_pixels: int


QWEN_PRESETS: dict[str, QwenPreset] = {
    # up to 36 merged tokens (168x168 px); windows of 2x2 merged tokens, full attention in the last of 3 layers.
    "tiny-qwen2.5-vl": QwenPreset(
        patch_size=14, merge_size=2, window_size=56,
        vision_hidden_size=32, vision_intermediate_size=64, vision_layers=3, vision_heads=4,
        fullatt_block_indexes=(2,),
        text_hidden_size=64, text_intermediate_size=128, text_layers=2, text_heads=4, text_kv_heads=2,
        mrope_section=(2, 3, 3), max_position_embeddings=4096, tokenizer_vocab_size=600,
        text_initializer_range=0.2, min_pixels=28 * 28, max_pixels=36 * 28 * 28),
    # Qwen2.5-VL-3B's vision geometry (patch 14, merge 2, window 112, 32 layers, full attention at
    # 7/15/23/31) with a narrow tower, and the bench preset's 8-layer 2048-wide LLM (head dim 128 as
    # Qwen2.5-VL's, so its mrope_section is the released one).
    "bench-qwen2.5-vl": QwenPreset(
        patch_size=14, merge_size=2, window_size=112,
        vision_hidden_size=128, vision_intermediate_size=512, vision_layers=32, vision_heads=2,
        fullatt_block_indexes=(7, 15, 23, 31),
        text_hidden_size=2048, text_intermediate_size=5504, text_layers=8, text_heads=16, text_kv_heads=16,
        mrope_section=(16, 24, 24), max_position_embeddings=8192, tokenizer_vocab_size=1000,
        text_initializer_range=0.02, min_pixels=56 * 56, max_pixels=1280 * 28 * 28),
}


def _tokenizer(spec: QwenPreset):
    from transformers import PreTrainedTokenizerFast

    # "never": text tokenized in pieces equals the text tokenized at once, as with Qwen's byte-level BPE.
    bpe = train_bpe(spec.tokenizer_vocab_size, QWEN_SPECIAL_TOKENS, prepend_scheme="never")
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", padding_side="left")


def _config(spec: QwenPreset, tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("vision_token_id", "<|vision_pad|>"), ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"))}
    vision_config = dict(
        depth=spec.vision_layers, hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_intermediate_size,
        num_heads=spec.vision_heads, out_hidden_size=spec.text_hidden_size, patch_size=spec.patch_size,
        spatial_merge_size=spec.merge_size, window_size=spec.window_size,
        fullatt_block_indexes=list(spec.fullatt_block_indexes), temporal_patch_size=2, tokens_per_second=2,
        hidden_act="silu", in_channels=3)
    text_config = dict(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden_size, intermediate_size=spec.text_intermediate_size,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.text_initializer_range, rope_theta=1000000.0, hidden_act="silu",
        rope_scaling={"type": "mrope", "mrope_section": list(spec.mrope_section)},
        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False)
    return Qwen2_5_VLConfig(vision_config=vision_config, text_config=text_config, tie_word_embeddings=False, **ids)


def _image_processor(spec: QwenPreset):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # The PIL backend needs no torchvision; OpenAI CLIP's mean/std as the released preprocessor_config.
    return Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size, merge_size=spec.merge_size, temporal_patch_size=2,
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


def write_qwen_checkpoint(out_dir: pathlib.Path, spec: QwenPreset, seed: int) -> None:
    """A Qwen2.5-VL checkpoint of `spec` with its processor and chat template, written into `out_dir`."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _tokenizer(spec)
    config = _config(spec, tokenizer)
    # Weight init draws from torch's global generator: seed it, and leave it as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    # The released checkpoints' processor files: preprocessor_config.json, the tokenizer's, chat_template.json.
    # (Qwen2_5_VLProcessor.save_pretrained would also need a video processor, which needs torchvision.)
    image_processor = _image_processor(spec)
    image_processor.processor_class = "Qwen2_5_VLProcessor"
    image_processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_CHAT_TEMPLATE}, indent=2) + "\n")
