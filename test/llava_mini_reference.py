"""LLaVA-Mini's computation written out from a checkpoint's tensors, independently of the adapter.

It follows the reference implementation's formulation step by step (ictnlp/LLaVA-Mini,
``llavamini_arch.py``), not the adapter's shortcuts: the prompt is tokenized in chunks around a ``-200``
image sentinel as ``tokenizer_image_token`` does (with the doubled BOS removed as its training code
does); pre-fusion runs over the WHOLE sequence ``[patches, compressed, every prompt token]`` with the
placeholder and token id 0 masked as keys and positions counted over unmasked tokens only; the decoder
layers, the compressor's attention and its sin-cos table are written by hand from the tensors. CLIP and
the LLM are transformers' own modules loaded from the same tensors.
"""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SENTINEL = -200  # the reference's IMAGE_TOKEN_INDEX
SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
          "that the user provides, and assist the user with a variety of tasks using natural language.")


def load_tensors(checkpoint: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key).float() for key in handle.keys()})
    return tensors


def sincos_table(embed_dim: int, grid_size: int) -> torch.Tensor:
    """The reference's table: meshgrid(w, h) with w first, so the first half encodes the column index."""
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))

    def one_d(dim, positions):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
        out = positions.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_d(embed_dim // 2, grid_w), one_d(embed_dim // 2, grid_h)], axis=1)
    return torch.from_numpy(table.astype(np.float32))


def reference_prompt_ids(tokenizer, question: str) -> list[int]:
    """``tokenizer_image_token`` on the llava_llama_3_1 prompt (with the assistant header), BOS once."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "<image>\n" + question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chunks = [tokenizer(chunk).input_ids for chunk in text.split("<image>")]
    ids = [chunks[0][0]]
    for index, chunk in enumerate(chunks):
        if index:
            ids.append(IMAGE_SENTINEL)
        ids.extend(chunk[1:])
    if ids[0] == ids[1] == tokenizer.bos_token_id:  # the training code's "remove the first bos token"
        ids = ids[1:]
    return ids


def compress(patches: torch.Tensor, t: dict, heads: int) -> torch.Tensor:
    """patches ``[P, D]`` -> ``[C^2, D]``: LayerNorms, sin-cos positions and multi-head attention by hand."""
    prefix = "model.compressor."
    queries, dim = t[prefix + "query"].shape
    table = t[prefix + "pos_embed"]
    side, target = round(math.sqrt(queries)), round(math.sqrt(patches.shape[0]))
    key_table = table if side == target else F.interpolate(
        table.reshape(1, side, side, dim).permute(0, 3, 1, 2), size=(target, target), mode="bicubic",
        align_corners=False).permute(0, 2, 3, 1).reshape(-1, dim)
    q_in = F.layer_norm(t[prefix + "query"], (dim,), t[prefix + "ln_q.weight"], t[prefix + "ln_q.bias"]) + table
    kv = F.layer_norm(patches, (dim,), t[prefix + "ln_kv.weight"], t[prefix + "ln_kv.bias"])
    w_q, w_k, w_v = t[prefix + "attn.in_proj_weight"].chunk(3)
    b_q, b_k, b_v = t[prefix + "attn.in_proj_bias"].chunk(3)
    head_dim = dim // heads
    q = (q_in @ w_q.T + b_q).view(-1, heads, head_dim).transpose(0, 1)
    k = ((kv + key_table) @ w_k.T + b_k).view(-1, heads, head_dim).transpose(0, 1)
    v = (kv @ w_v.T + b_v).view(-1, heads, head_dim).transpose(0, 1)
    attended = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim), dim=-1) @ v  # [heads, C^2, head_dim]
    out = attended.transpose(0, 1).reshape(-1, dim)
    return out @ t[prefix + "attn.out_proj.weight"].T + t[prefix + "attn.out_proj.bias"]


def project(x: torch.Tensor, t: dict) -> torch.Tensor:
    hidden = F.gelu(x @ t["model.mm_projector.0.weight"].T + t["model.mm_projector.0.bias"])
    return hidden @ t["model.mm_projector.2.weight"].T + t["model.mm_projector.2.bias"]


def decoder_layer(x: torch.Tensor, t: dict, prefix: str, config: dict, allowed: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """One Llama decoder layer by hand: x ``[N, H]``, allowed ``[N, N]`` (query, key) bool, positions ``[N]``."""
    eps = config["rms_norm_eps"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))

    def rms(h, weight):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope(h):  # [heads, N, head_dim]
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = positions.float()[:, None] * inv_freq[None, :]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        rotated = torch.cat([-h[..., head_dim // 2:], h[..., :head_dim // 2]], dim=-1)
        return h * cos + rotated * sin

    h = rms(x, t[prefix + "input_layernorm.weight"])
    q = rope((h @ t[prefix + "self_attn.q_proj.weight"].T).view(-1, heads, head_dim).transpose(0, 1))
    k = rope((h @ t[prefix + "self_attn.k_proj.weight"].T).view(-1, kv_heads, head_dim).transpose(0, 1))
    v = (h @ t[prefix + "self_attn.v_proj.weight"].T).view(-1, kv_heads, head_dim).transpose(0, 1)
    k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
    scores = (q @ k.transpose(1, 2) / math.sqrt(head_dim)).masked_fill(~allowed, float("-inf"))
    attended = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(x.shape[0], -1)
    x = x + attended @ t[prefix + "self_attn.o_proj.weight"].T
    h = rms(x, t[prefix + "post_attention_layernorm.weight"])
    gate, up = h @ t[prefix + "mlp.gate_proj.weight"].T, h @ t[prefix + "mlp.up_proj.weight"].T
    return x + (F.silu(gate) * up) @ t[prefix + "mlp.down_proj.weight"].T


def _load(checkpoint: pathlib.Path):
    """``(config dict, tensors, CLIP tower, image processor)`` from a checkpoint's files."""
    from transformers import AutoImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = json.loads((checkpoint / "config.json").read_text())
    t = load_tensors(checkpoint)
    clip_dir = checkpoint / config["mm_vision_tower"]
    tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(clip_dir)).eval()
    tower_prefix = "model.vision_tower.vision_tower.vision_model."  # transformers 5's CLIPVisionModel drops vision_model.
    tower.load_state_dict({k[len(tower_prefix):]: v for k, v in t.items() if k.startswith(tower_prefix)})
    return config, t, tower, AutoImageProcessor.from_pretrained(clip_dir)


def _encode_frame(pixels: torch.Tensor, config: dict, t: dict, tower, heads: int):
    """pixels ``[1, 3, H, W]`` -> ``(projected patches [P, H_llm], projected compressed [C^2, H_llm])``."""
    patches = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[
        config["mm_vision_select_layer"]][0, 1:]  # [P, D]
    return project(patches, t), project(compress(patches, t, heads), t)


def _prefuse(patch_tokens, compressed, ids: torch.Tensor, config: dict, t: dict):
    """The reference's ``encode_images_mini`` for one image (one video frame): pre-fusion over the whole
    masked sequence ``[patches, compressed, every prompt token]``. Returns ``(fused compressed [C^2, H],
    fused text [len(ids), H] with masked positions as plain embeddings)``."""
    text_mask = ids <= 0
    text = t["model.embed_tokens.weight"][ids.clamp(min=0)]
    x = torch.cat([patch_tokens, compressed, text])
    masked = torch.cat([torch.zeros(len(patch_tokens) + len(compressed), dtype=torch.bool), text_mask])
    count = len(x)
    allowed = torch.ones(count, count, dtype=torch.bool).tril() & ~masked[None, :]
    positions = (~masked).long().cumsum(0) - 1
    positions[masked] = 1
    for index in range(config["prefusion_layer_num"]):
        x = decoder_layer(x, t, f"model.prefusion_layers.{index}.", config, allowed, positions)
    fused_text = torch.where(text_mask[:, None], text, x[-len(ids):])
    return x[len(patch_tokens):len(patch_tokens) + len(compressed)], fused_text


def _llm_logits(config: dict, t: dict, llm_inputs: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaConfig, LlamaForCausalLM

    llm_config = LlamaConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    llm = LlamaForCausalLM(llm_config).eval()
    llm.load_state_dict({k: v for k, v in t.items() if k.startswith(("model.layers.", "model.embed_tokens.",
                                                                      "model.norm.", "lm_head."))})
    return llm(inputs_embeds=llm_inputs[None]).logits[0]


def reference_logits(checkpoint: pathlib.Path, image: np.ndarray, question: str, compressor_heads: int = 8):
    """``(prompt ids with the -200 sentinel, LLM logits [LLM length, vocab])`` for one image and question."""
    from transformers import AutoTokenizer

    config, t, tower, processor = _load(checkpoint)
    pixels = processor(images=[image], return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    with torch.no_grad():
        patch_tokens, compressed = _encode_frame(pixels, config, t, tower, compressor_heads)
        ids = torch.tensor(reference_prompt_ids(AutoTokenizer.from_pretrained(checkpoint), question))
        fused_compressed, fused_text = _prefuse(patch_tokens, compressed, ids, config, t)
        image_at = int((ids == IMAGE_SENTINEL).nonzero()[0])
        llm_inputs = torch.cat([fused_text[:image_at], fused_compressed, fused_text[image_at + 1:]])
        logits = _llm_logits(config, t, llm_inputs)
    return ids.tolist(), logits


def resize_frame_like_reference(frame: np.ndarray, side: int) -> np.ndarray:
    """The reference's video loader: ``interpolate`` (default: nearest) of the uint8 frame to side x side."""
    if frame.shape[:2] == (side, side):
        return frame
    tensor = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
    return F.interpolate(tensor, size=(side, side))[0].permute(1, 2, 0).to(torch.uint8).numpy()


def reference_video_logits(checkpoint: pathlib.Path, frames: list[np.ndarray], user_text: str,
                           compressor_heads: int = 8):
    """The reference's video mode (``prepare_inputs_labels_for_multimodal`` with 6-D images): every frame
    resized and preprocessed, then through ``encode_images_mini`` with the same prompt; the frames' fused
    compressed tokens concatenated at the one image sentinel, the fused text averaged over the frames (a
    float32 sum divided by the frame count). `user_text` follows ``<image>\\n`` in the user turn.
    Returns ``(prompt ids with the sentinel, LLM logits [LLM length, vocab])``."""
    from transformers import AutoTokenizer

    config, t, tower, processor = _load(checkpoint)
    side = processor.crop_size["height"]
    resized = [resize_frame_like_reference(frame, side) for frame in frames]
    pixels = processor(images=resized, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    with torch.no_grad():
        ids = torch.tensor(reference_prompt_ids(AutoTokenizer.from_pretrained(checkpoint), user_text))
        frame_tokens, text_sum = [], 0
        for index in range(len(frames)):
            patch_tokens, compressed = _encode_frame(pixels[index:index + 1], config, t, tower, compressor_heads)
            fused_compressed, fused_text = _prefuse(patch_tokens, compressed, ids, config, t)
            frame_tokens.append(fused_compressed)
            text_sum = text_sum + fused_text.float()
        fused_text = text_sum / len(frames)
        image_at = int((ids == IMAGE_SENTINEL).nonzero()[0])
        llm_inputs = torch.cat([fused_text[:image_at], *frame_tokens, fused_text[image_at + 1:]])
        logits = _llm_logits(config, t, llm_inputs)
    return ids.tolist(), logits
