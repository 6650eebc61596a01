"""LLaVA-Mini's torch modules besides CLIP and the Llama LLM: the compressor, the projector and the
modality pre-fusion layers, with the parameter names of the published checkpoint
(``model.compressor.*``, ``model.mm_projector.*``, ``model.prefusion_layers.*``).

Written from the LLaVA-Mini paper (arXiv 2501.03895) and its code (ictnlp/LLaVA-Mini), on transformers'
Llama modules:

* ``Compressor``: C x C learnable queries attend to one image's CLIP patch features in one
  ``nn.MultiheadAttention`` (8 heads). Queries and keys carry a fixed 2D sin-cos table (the keys' is
  the C x C table resized bicubically to the patch grid); queries and features go through their own
  LayerNorm first; values are the normalised features without positions. Output: C^2 tokens per image,
  in CLIP's width, independent of any text.
* ``projector``: LLaVA's two-layer GELU MLP (``mlp2x_gelu``), applied to the patch features and to the
  compressed tokens alike.
* ``PreFusion``: a few Llama decoder layers (the LLM's geometry and RoPE, no final norm) run causally
  over ``[projected patches, projected compressed tokens, the prompt's text tokens]``. The reference
  masks the image placeholder and token id 0 out of that sequence and numbers positions over the
  unmasked tokens only; a masked position is then neither seen by the others nor used afterwards, so
  running the layers over the unmasked tokens alone, with positions 0..n-1, is the same computation
  (``test/llava_mini_reference.py`` checks it against the masked formulation). The sequence is causal,
  so its key/value cache up to the question is reusable for every question about the frame.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

__all__ = ["COMPRESSOR_HEADS", "Compressor", "PreFusion", "build_projector", "sincos_position_table"]

# The reference builds the compressor with 8 heads for any checkpoint.
COMPRESSOR_HEADS = 8


def sincos_position_table(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE-style 2D sin-cos positions: ``[grid_size * grid_size, embed_dim]`` float32, row-major cells.

    The first half of the channels encodes a cell's column index, the second half its row index (the
    order of the reference's table); each half is ``[sin(p * w_k), cos(p * w_k)]`` with
    ``w_k = 10000 ** (-k / (embed_dim / 4))``.
    """
    if embed_dim % 4:
        raise ValueError(f"sincos positions need an embedding width divisible by 4; got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32),
                             indexing="ij")  # [grid, grid] each: row index, column index

    def encode(positions: np.ndarray, channels: int) -> np.ndarray:
        frequencies = 1.0 / 10000 ** (np.arange(channels // 2, dtype=np.float32) / (channels / 2.0))
        angles = np.einsum("m,d->md", positions.reshape(-1), frequencies)  # [cells, channels / 2]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols, embed_dim // 2), encode(rows, embed_dim // 2)], axis=1)


def resize_position_table(table: torch.Tensor, cells: int) -> torch.Tensor:
    """``table [g * g, dim]`` resized (bicubic, in float32) to ``[cells, dim]`` for a square grid of
    `cells`; returned unchanged when the sizes already agree."""
    source, target = round(table.shape[0] ** 0.5), round(cells ** 0.5)
    if source == target:
        return table
    grid = table.float().reshape(1, source, source, -1).permute(0, 3, 1, 2)  # [1, dim, g, g]
    resized = nn.functional.interpolate(grid, size=(target, target), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)  # [cells, dim]


class Compressor(nn.Module):
    """C^2 learnable queries cross-attending to an image's patch features.

    Parameters (checkpoint names under ``model.compressor.``): ``query [C^2, dim]``, ``pos_embed
    [C^2, dim]`` (the fixed sin-cos table; stored in checkpoints), ``ln_q``, ``ln_kv``, ``attn``
    (``nn.MultiheadAttention``: ``in_proj_weight``, ``in_proj_bias``, ``out_proj``).
    """

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int = COMPRESSOR_HEADS):
        super().__init__()
        self.grid_size = grid_size
        table = torch.from_numpy(sincos_position_table(embed_dim, grid_size)).float()
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.query = nn.Parameter(torch.zeros(grid_size ** 2, embed_dim))
        self.ln_q = nn.LayerNorm(embed_dim)
        self.ln_kv = nn.LayerNorm(embed_dim)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)

    def forward(self, patch_features: torch.Tensor) -> torch.Tensor:
        """patch_features ``[images, patches, dim]`` -> compressed tokens ``[images, C^2, dim]``."""
        images, patches, _ = patch_features.shape
        features = self.ln_kv(patch_features)
        key_positions = resize_position_table(self.pos_embed, patches).to(features.dtype)  # [patches, dim]
        queries = (self.ln_q(self.query) + self.pos_embed.to(features.dtype)).expand(images, -1, -1)
        compressed, _ = self.attn(queries, features + key_positions, features, need_weights=False)
        return compressed


def build_projector(vision_hidden: int, text_hidden: int) -> nn.Sequential:
    """LLaVA's ``mlp2x_gelu`` projector; its state dict names are ``0.*`` and ``2.*`` as in checkpoints."""
    return nn.Sequential(nn.Linear(vision_hidden, text_hidden), nn.GELU(), nn.Linear(text_hidden, text_hidden))


class PreFusion(nn.Module):
    """LLaVA-Mini's modality pre-fusion: ``num_layers`` Llama decoder layers with the LLM's config.

    Checkpoint names: ``model.prefusion_layers.{i}.*`` -> ``layers.{i}.*``. ``forward`` continues a
    transformers ``DynamicCache`` of this stack, so a question can run on a frame's cached prefix.
    """

    def __init__(self, llm_config, num_layers: int):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.config = copy.deepcopy(llm_config)
        self.config.num_hidden_layers = num_layers
        self.layers = nn.ModuleList([LlamaDecoderLayer(self.config, layer_idx=index) for index in range(num_layers)])
        self.rotary_emb = LlamaRotaryEmbedding(config=self.config)

    def new_cache(self):
        from transformers.cache_utils import DynamicCache

        return DynamicCache(config=self.config)

    def forward(self, hidden_states: torch.Tensor, kv_cache) -> torch.Tensor:
        """hidden_states ``[1, length, text_hidden]`` after the `kv_cache`'s positions -> the fused
        states ``[1, length, text_hidden]``; `kv_cache` grows by `length` positions."""
        from transformers.masking_utils import create_causal_mask

        past = kv_cache.get_seq_length()
        position_ids = torch.arange(past, past + hidden_states.shape[1], device=hidden_states.device)[None]
        causal_mask = create_causal_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=None,
                                         past_key_values=kv_cache, position_ids=position_ids)
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=causal_mask, position_ids=position_ids,
                                  past_key_values=kv_cache, use_cache=True, position_embeddings=position_embeddings)
        return hidden_states
