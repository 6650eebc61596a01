"""Qwen2.5-VL's vision tower run once with what VisionZip reads from it: the attention each merged token
receives at the last full-attention layer and that layer's keys, in the stock token order.

The tower permutes its patches into window order (``window_index``, in units of the 2x2 patches the
PatchMerger joins) before its first layer and un-permutes only the merged output. Two forward hooks on
the scoring layer keep its ``qkv`` projection and the rotary cos/sin and ``cu_seqlens`` it was called
with; the scores are then computed in query chunks (``received_attention``), never as a full map, and
mapped back to the stock order. The tower itself runs unchanged (SDPA, no ``output_attentions``), so the
merged features are exactly ``get_image_features``'.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from zip_vlm_ros.reducers.received_attention import DEFAULT_QUERY_CHUNK, received_attention

__all__ = ["TowerScores", "encode_with_received_attention", "scoring_layer"]


class TowerScores(NamedTuple):
    """Per image, in the stock (raster) order of its merged tokens.

    features: ``[merged, text_hidden]`` the stock LLM input tokens (``get_image_features``).
    scores: ``[merged]`` float32 attention received at the scoring layer, averaged over the image's
        queries and the heads, then over the four patches each merged token joins.
    keys: ``[merged, head_dim]`` float32 that layer's keys (after its rotary embedding) averaged over
        heads and over the four patches.
    """

    features: list[torch.Tensor]
    scores: list[torch.Tensor]
    keys: list[torch.Tensor]


def scoring_layer(visual) -> int:
    """The tower layer VisionZip reads: the last one with full attention over each image."""
    return visual.fullatt_block_indexes[-1]


@torch.no_grad()
def encode_with_received_attention(qwen_model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                                   chunk: int = DEFAULT_QUERY_CHUNK) -> TowerScores:
    """``qwen_model`` (``Qwen2_5_VLModel``) encodes ``pixel_values [patches, C*T*P*P]`` of the images
    ``image_grid_thw [images, 3]`` once; returns their stock features with VisionZip's scores and keys."""
    from transformers.vision_utils import get_vision_window_index

    visual = qwen_model.visual
    attention = visual.blocks[scoring_layer(visual)].attn
    captured: dict = {}

    def keep_call(module, args, kwargs):
        captured["cu_seqlens"], captured["rotary"] = kwargs["cu_seqlens"], kwargs["position_embeddings"]

    def keep_qkv(module, args, output):
        captured["qkv"] = output

    # The window layout, computed once: the tower takes it from its kwargs instead of computing it again.
    window_index, cu_window_seqlens = get_vision_window_index(image_grid_thw, visual.spatial_merge_size,
                                                              visual.window_size, visual.patch_size)
    handles = [attention.register_forward_pre_hook(keep_call, with_kwargs=True),
               attention.qkv.register_forward_hook(keep_qkv)]
    try:
        features = list(qwen_model.get_image_features(
            pixel_values=pixel_values, image_grid_thw=image_grid_thw, window_index=window_index,
            cu_window_seqlens=cu_window_seqlens).pooler_output)
    finally:
        for handle in handles:
            handle.remove()
    stock_order = torch.argsort(window_index.to(pixel_values.device))  # window position of each stock unit
    scores, keys = _window_scores_and_keys(attention, captured, visual.spatial_merge_unit, chunk)
    counts = [feature.shape[0] for feature in features]
    return TowerScores(features, list(scores[stock_order].split(counts)), list(keys[stock_order].split(counts)))


def _window_scores_and_keys(attention, captured: dict, merge_unit: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [units], keys [units, head_dim])`` in the tower's window order from the scoring layer's
    captured call (``units`` = patches / ``merge_unit``)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    qkv = captured["qkv"]  # [patches, 3 * vision_hidden], window order
    patches = qkv.shape[0]
    queries, keys, _ = qkv.reshape(patches, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = captured["rotary"]
    queries, keys = apply_rotary_pos_emb_vision(queries, keys, cos, sin)  # [patches, heads, head_dim] each
    queries, keys = queries.transpose(0, 1), keys.transpose(0, 1)         # [heads, patches, head_dim]
    bounds = captured["cu_seqlens"].tolist()  # full attention: each image attends within itself
    patch_scores = torch.cat([received_attention(queries[:, start:end], keys[:, start:end], attention.scaling, chunk)
                              for start, end in zip(bounds[:-1], bounds[1:])])
    unit_scores = patch_scores.view(-1, merge_unit).mean(dim=1)                               # [units]
    unit_keys = keys.float().mean(dim=0).view(-1, merge_unit, keys.shape[-1]).mean(dim=1)    # [units, head_dim]
    return unit_scores, unit_keys
