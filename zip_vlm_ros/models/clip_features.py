"""The CLIP tower side of VisionZip: run a transformers ``CLIPVisionModel`` to the feature layer and read
what the reducers need from it (hidden states, the CLS query's attention over the patches, the keys).

``encode_for_visionzip`` is the fast path the engine uses: layers up to the feature layer run with the
tower's own attention (SDPA by default) and only the CLS row of the producing layer's attention is
recomputed. ``encode_reference_style`` is the VisionZip reference's way (eager attention maps in every
layer), kept for side-by-side benchmarks and tests. The reduction itself is in ``zip_vlm_ros.reducers``.
"""

from __future__ import annotations

import torch
from torch import nn

from zip_vlm_ros.reducers.visionzip import VisionZipFeatures

__all__ = ["VisionZipFeatures", "encode_for_visionzip", "encode_reference_style", "encode_to_feature_layer",
           "encoder_layers", "producing_layer"]


@torch.no_grad()
def encode_for_visionzip(
    vision_tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int = -2
) -> VisionZipFeatures:
    """Run a transformers ``CLIPVisionModel`` just far enough to feed ``visionzip_compress``.

    Layers before the feature layer run unchanged with the model's own attention implementation
    (SDPA by default). The layer that produces the features also runs unchanged; its query and key
    projections are read with forward hooks, and only the CLS query row of its attention is
    recomputed (``[heads, 1 + N]`` per image instead of ``[heads, 1 + N, 1 + N]`` maps), in float32.
    Layers after it are not run. Inference only (no autograd graph).

    Args:
        vision_tower: the ``CLIPVisionModel`` of a ``LlavaForConditionalGeneration``
            (``model.model.vision_tower``).
        pixel_values: ``[batch, 3, height, width]`` on the tower's device, as the image processor makes.
        feature_layer: index into the tower's ``hidden_states`` (``num_layers + 1`` entries, entry 0
            being the embeddings), as LLaVA's ``vision_feature_layer``: -2 for LLaVA-1.5.

    Returns:
        ``VisionZipFeatures`` whose ``hidden_states`` equal
        ``vision_tower(pixel_values, output_hidden_states=True).hidden_states[feature_layer]``.
    """
    layers = encoder_layers(vision_tower)
    layer_index = producing_layer(feature_layer, len(layers))

    hidden_states = vision_tower.embeddings(pixel_values)
    hidden_states = vision_tower.pre_layrnorm(hidden_states)
    for encoder_layer in layers[:layer_index]:
        hidden_states = encoder_layer(hidden_states, None)

    self_attn = layers[layer_index].self_attn
    projections: dict[str, torch.Tensor] = {}

    def keep_output(name):
        def hook(module, args, output):
            projections[name] = output

        return hook

    handles = [
        self_attn.q_proj.register_forward_hook(keep_output("queries")),
        self_attn.k_proj.register_forward_hook(keep_output("keys")),
    ]
    try:
        hidden_states = layers[layer_index](hidden_states, None)
    finally:
        for handle in handles:
            handle.remove()

    batch_size, seq_length, _ = hidden_states.shape
    num_heads, head_dim = self_attn.num_heads, self_attn.head_dim
    keys = projections["keys"].view(batch_size, seq_length, num_heads, head_dim)
    cls_query = projections["queries"][:, 0].float().view(batch_size, num_heads, 1, head_dim)
    cls_logits = torch.matmul(cls_query, keys.float().permute(0, 2, 3, 1)).squeeze(2) * self_attn.scale
    cls_attention = cls_logits.softmax(dim=-1)[:, :, 1:]  # [batch, heads, N]
    return VisionZipFeatures(hidden_states, cls_attention, keys.mean(dim=2))


@torch.no_grad()
def encode_to_feature_layer(vision_tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int = -2) -> torch.Tensor:
    """``vision_tower(pixel_values, output_hidden_states=True).hidden_states[feature_layer]`` (``[batch, 1 + N,
    hidden]``) without running the layers after the feature layer, which stock feature extraction runs and
    throws away (the last of LLaVA-1.5's 24). DivPrune's input: no attention is read."""
    layers = encoder_layers(vision_tower)
    layer_index = producing_layer(feature_layer, len(layers))
    hidden_states = vision_tower.pre_layrnorm(vision_tower.embeddings(pixel_values))
    for encoder_layer in layers[:layer_index + 1]:
        hidden_states = encoder_layer(hidden_states, None)
    return hidden_states


@torch.no_grad()
def encode_reference_style(
    vision_tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int = -2
) -> VisionZipFeatures:
    """Get the same ``VisionZipFeatures`` the way the VisionZip reference does.

    The whole tower runs with eager attention and ``output_attentions=True`` and
    ``output_hidden_states=True``, so every layer materialises its ``[batch, heads, 1 + N, 1 + N]``
    attention map; the CLS row and keys are then read from the producing layer. Slow and memory
    hungry on purpose: it is the baseline for benchmarks and a cross-check for tests. The tower's
    attention implementation is restored afterwards, even on error.

    Shapes and arguments as ``encode_for_visionzip``; ``cls_attention`` is float32 but computed in
    the tower's dtype, like the reference.
    """
    layers = encoder_layers(vision_tower)
    layer_index = producing_layer(feature_layer, len(layers))
    self_attn = layers[layer_index].self_attn
    projected_keys: list[torch.Tensor] = []
    handle = self_attn.k_proj.register_forward_hook(lambda module, args, output: projected_keys.append(output))
    original_attention = vision_tower.config._attn_implementation
    vision_tower.set_attn_implementation("eager")
    try:
        outputs = vision_tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        vision_tower.set_attn_implementation(original_attention)
        handle.remove()

    hidden_states = outputs.hidden_states[feature_layer]
    batch_size, seq_length, _ = hidden_states.shape
    cls_attention = outputs.attentions[layer_index][:, :, 0, 1:].float()
    keys = projected_keys[0].view(batch_size, seq_length, self_attn.num_heads, self_attn.head_dim).mean(dim=2)
    return VisionZipFeatures(hidden_states, cls_attention, keys)


def encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """The encoder layers of a CLIP-style vision tower, or a ValueError naming what is missing."""
    parts = ("embeddings", "pre_layrnorm", "encoder")
    if not all(hasattr(vision_tower, part) for part in parts) or not hasattr(vision_tower.encoder, "layers"):
        raise ValueError(
            f"VisionZip needs a CLIP vision tower (CLIPVisionModel with a CLS token), got "
            f"{type(vision_tower).__name__}; use a LLaVA checkpoint whose vision_config is CLIP"
        )
    return vision_tower.encoder.layers


def producing_layer(feature_layer: int, num_layers: int) -> int:
    """Index of the encoder layer whose output is ``hidden_states[feature_layer]``.

    ``hidden_states`` has ``num_layers + 1`` entries: the embeddings, then each layer's output.
    """
    if isinstance(feature_layer, (list, tuple)):
        raise ValueError(
            f"feature_layer={list(feature_layer)} selects several layers; VisionZip works on one feature layer, "
            f"set vision_feature_layer to a single integer (LLaVA-1.5 uses -2)"
        )
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ValueError(f"feature_layer={feature_layer!r} must be an integer layer index (LLaVA-1.5 uses -2)")
    num_hidden_states = num_layers + 1
    if not -num_hidden_states <= feature_layer < num_hidden_states:
        raise ValueError(
            f"feature_layer={feature_layer} is out of range for a vision tower with {num_layers} layers; "
            f"use 1..{num_layers} or -{num_layers}..-1"
        )
    hidden_state_index = feature_layer % num_hidden_states
    if hidden_state_index == 0:
        raise ValueError(
            f"feature_layer={feature_layer} selects the patch embeddings, which no attention layer produced; "
            f"VisionZip needs that layer's attention: use 1..{num_layers} or -{num_layers}..-1"
        )
    return hidden_state_index - 1
