"""Random-weight LLaVA-Mini checkpoints in the released checkpoint's layout (``tiny-mini``, ``bench-mini``).

``write_mini_checkpoint(out_dir, spec, seed)`` writes what ``ICTNLP/llava-mini-llama-3.1-8b`` holds, so
that ``zip_vlm_ros.models.llava_mini_checkpoint`` reads both the same way:

* ``config.json``: a Llama config with ``model_type: llava_mini_llama`` and LLaVA-Mini's fields
  (``mm_vision_tower``, ``mm_projector_type: mlp2x_gelu``, ``mm_hidden_size``, ``mm_vision_select_layer:
  -2``, ``compressor_size``, ``prefusion_layer_num``, ``resolution_ratio: 1``, ...);
* ``model.safetensors``: the reference's parameter names (``model.layers.*``, ``lm_head.*``,
  ``model.mm_projector.*``, ``model.compressor.*``, ``model.prefusion_layers.*`` and the CLIP tower under
  ``model.vision_tower.vision_tower.*``);
* a Llama-3 style tokenizer (``<|begin_of_text|>``, header and end-of-turn tokens, a chat template of
  the same shape as Llama-3.1's) and ``generation_config.json`` with the end-of-turn tokens as EOS;
* ``clip_vision_tower/``: the CLIP tower's ``config.json`` and ``preprocessor_config.json`` (the real
  checkpoint names ``openai/clip-vit-large-patch14-336`` instead); ``mm_vision_tower`` names it
  relative to the checkpoint.

The weights are random (seeded): the text such a model generates is meaningless.
"""

from __future__ import annotations

import json
import pathlib

__all__ = ["CLIP_SUBDIR", "LLAMA3_CHAT_TEMPLATE", "mini_tensors", "write_mini_checkpoint"]

CLIP_SUBDIR = "clip_vision_tower"
MINI_SPECIAL_TOKENS = ("<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>", "<|eom_id|>")
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")

# Llama-3 turn format: <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>, after one BOS.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages -%}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif -%}"
)


def write_mini_checkpoint(out_dir: pathlib.Path, spec, seed: int) -> None:
    """Write a LLaVA-Mini checkpoint of `spec` (a ``tiny_model.Preset`` with ``compressor_size``) into the
    existing directory `out_dir`, weights drawn from `seed`."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from zip_vlm_ros.models.llava_mini import SYSTEM_PROMPT
    from zip_vlm_ros.tools.tokenizer import TOKENIZER_CORPUS, train_tokenizer

    corpus = TOKENIZER_CORPUS + f"system user assistant\n{SYSTEM_PROMPT}\n"
    tokenizer = train_tokenizer(spec.tokenizer_vocab_size, MINI_SPECIAL_TOKENS, bos="<|begin_of_text|>",
                                 eos="<|eot_id|>", pad=None, corpus=corpus, prepend_scheme="never")
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    llm_config, vision_config = _configs(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):  # seeded init that leaves the global generator as it was
        torch.manual_seed(seed)
        tensors = _random_tensors(spec, llm_config, vision_config)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    raw = {**llm_config.to_dict(), **_mini_fields(spec), "model_type": "llava_mini_llama",
           "architectures": ["LlavaMiniLlamaForCausalLM"]}
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    stop_ids = [tokenizer.convert_tokens_to_ids(token) for token in END_OF_TURN_TOKENS]
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_clip_directory(out_dir / CLIP_SUBDIR, spec, vision_config)


def _configs(spec, tokenizer):
    """``(LlamaConfig, CLIPVisionConfig)`` of `spec`, the LLM's vocabulary that of `tokenizer`."""
    from transformers import CLIPVisionConfig, LlamaConfig

    llm_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden_size, intermediate_size=spec.text_intermediate_size,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.text_initializer_range, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size, intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=spec.image_size,
        patch_size=spec.patch_size, projection_dim=spec.vision_hidden_size, hidden_act="quick_gelu")
    return llm_config, vision_config


def _mini_fields(spec) -> dict:
    """LLaVA-Mini's config fields, with the released image model's values."""
    return {
        "mm_vision_tower": CLIP_SUBDIR, "mm_hidden_size": spec.vision_hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "square", "compressor_size": spec.compressor_size,
        "prefusion_layer_num": spec.prefusion_layers, "resolution_ratio": 1, "use_mm_proj": True,
    }


def _random_tensors(spec, llm_config, vision_config) -> dict:
    """Every parameter under the released checkpoint's name, randomly initialised."""
    from transformers import CLIPVisionModel

    from zip_vlm_ros.models.llava_mini_checkpoint import published_tower_state

    tensors = mini_tensors(llm_config, spec.vision_hidden_size, spec.compressor_size, spec.prefusion_layers)
    tower = CLIPVisionModel(vision_config)
    tensors.update({name: tensor.detach() for name, tensor in published_tower_state(tower).items()})
    return tensors


def mini_tensors(llm_config, vision_hidden: int, compressor_size: int, prefusion_layers: int) -> dict:
    """The LLM, projector, compressor and pre-fusion parameters of a LLaVA-Mini checkpoint under their
    published names (``model.*``, ``lm_head.*``, ``model.mm_projector.*``, ``model.compressor.*``,
    ``model.prefusion_layers.*``), randomly initialised from torch's global generator; no CLIP tower."""
    import torch
    from transformers import LlamaForCausalLM

    from zip_vlm_ros.models.llava_mini_modules import Compressor, PreFusion, build_projector

    llm = LlamaForCausalLM(llm_config)
    prefusion = PreFusion(llm_config, prefusion_layers)
    prefusion.apply(llm._init_weights)  # the LLM's init (wide enough to move the residual stream)
    compressor = Compressor(compressor_size, vision_hidden)
    torch.nn.init.normal_(compressor.query, std=0.02)
    parts = {
        "": llm,
        "model.mm_projector.": build_projector(vision_hidden, llm_config.hidden_size),
        "model.compressor.": compressor,
        "model.prefusion_layers.": prefusion.layers,
    }
    return {prefix + name: tensor.detach() for prefix, module in parts.items()
            for name, tensor in module.state_dict().items()}


def _write_clip_directory(clip_dir: pathlib.Path, spec, vision_config) -> None:
    """The tower's config and CLIP preprocessing at the preset's resolution (no weights: the checkpoint
    holds them)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    clip_dir.mkdir()
    vision_config.save_pretrained(clip_dir)
    CLIPImageProcessorPil(size={"shortest_edge": spec.image_size},
                          crop_size={"height": spec.image_size, "width": spec.image_size},
                          do_center_crop=True).save_pretrained(clip_dir)
