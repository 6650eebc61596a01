"""VisionZip visual-token reduction (Yang et al., "VisionZip: Longer is Better but Not Necessary in
Vision Language Models", arXiv 2412.04467) as pure tensor functions.

A CLIP vision encoder turns an image into ``1 + N`` tokens (CLS first, then N patches; N = 576 for
LLaVA-1.5). VisionZip keeps a token budget ``T = dominant + contextual`` of them:

* dominant tokens: the CLS token plus the ``dominant - 1`` patches the CLS query attends to most
  (attention summed over heads) in the encoder layer that produced the LLaVA features;
* contextual tokens: the remaining tokens are clustered around ``contextual`` evenly spaced targets
  by cosine similarity of that layer's keys, and each cluster becomes one token.

``visionzip_compress`` reproduces the authors' reference rules exactly, quirks included (the CLS token
is kept and later projected like a patch; a contextual token is the target's hidden state *plus* the
mean of the tokens merged into it). ``encode_for_visionzip`` is the fast way to get its inputs from a
transformers ``CLIPVisionModel``; ``encode_reference_style`` is the reference's way (eager attention
maps in every layer), kept for side-by-side benchmarks and tests.

Nothing here knows about LLaVA prompts, budgets larger than the token count, or ROS: that is the
engine's job.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "VisionZipFeatures",
    "encode_for_visionzip",
    "encode_reference_style",
    "split_budget",
    "visionzip_compress",
]

# The paper's split: 64 -> 54 + 10, 128 -> 108 + 20, 192 -> 162 + 30.
DEFAULT_CONTEXTUAL_RATIO = 10 / 64


class VisionZipFeatures(NamedTuple):
    """What ``visionzip_compress`` needs from the vision encoder, for one batch of images.

    hidden_states: ``[batch, 1 + N, hidden]`` encoder output at the feature layer (index 0 is CLS).
    cls_attention: ``[batch, heads, N]`` float32 softmax weights of the CLS query over the N patch
        keys inside the layer that produced ``hidden_states`` (softmax taken over all ``1 + N`` keys).
    keys: ``[batch, 1 + N, head_dim]`` that layer's key vectors, averaged over heads.
    """

    hidden_states: torch.Tensor
    cls_attention: torch.Tensor
    keys: torch.Tensor


def split_budget(token_budget: int, contextual_ratio: float = DEFAULT_CONTEXTUAL_RATIO) -> tuple[int, int]:
    """Split a visual-token budget ``T`` into ``(dominant, contextual)`` counts.

    ``contextual = round(T * contextual_ratio)`` (Python's round, halves to even) and
    ``dominant = T - contextual``; ``dominant`` counts the CLS token. ``contextual`` is capped at
    ``T - 1`` so that at least the CLS token stays dominant. With the default ratio 10/64 this gives
    the paper's splits 64 -> (54, 10), 128 -> (108, 20), 192 -> (162, 30).

    Raises ValueError for a budget below 1 or a ratio outside [0, 1).
    """
    try:
        budget = operator.index(token_budget)
    except TypeError:
        raise ValueError(
            f"token_budget={token_budget!r} is not an integer; give a whole number of visual tokens >= 1 (e.g. 64)"
        ) from None
    if budget < 1:
        raise ValueError(f"token_budget={budget} is too small; it must be an integer >= 1 (e.g. 64, 128 or 192)")
    if not 0.0 <= contextual_ratio < 1.0:
        raise ValueError(
            f"contextual_ratio={contextual_ratio} is out of range; it must be in [0, 1) (the paper uses 10/64)"
        )
    contextual = min(round(budget * contextual_ratio), budget - 1)
    return budget - contextual, contextual


def visionzip_compress(
    hidden_states: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce ``1 + N`` vision tokens to ``dominant + contextual`` VisionZip tokens.

    Args:
        hidden_states: ``[batch, 1 + N, hidden]`` vision-encoder output at the feature layer, CLS first.
        cls_attention: ``[batch, heads, N]`` softmax attention of the CLS query over the N patch keys in
            the layer that produced ``hidden_states``.
        keys: ``[batch, 1 + N, head_dim]`` that layer's keys averaged over heads (the merge metric).
        dominant: tokens kept as they are, counting CLS: CLS plus the ``dominant - 1`` patches with the
            largest attention summed over heads. Equal scores: the lower patch index wins.
        contextual: tokens made by merging the rest; 0 keeps only the dominant tokens.

    The ``R = 1 + N - dominant`` other tokens, in sequence order, are the remainder. Its positions
    ``0, s, 2s, ...`` with ``s = max(1, R // contextual)`` (the first ``contextual`` of them) are
    targets; every other remainder token joins the target whose L2-normalised key is most
    cosine-similar (equal similarity: the earlier target wins). A contextual token is its target's
    hidden state plus the mean hidden state of the tokens that joined it (plus 0 if none did).

    Returns:
        tokens: ``[batch, dominant + contextual, hidden]``: dominant tokens in sequence order (CLS
            first), then contextual tokens in target order; dtype of ``hidden_states``.
        dominant_indices: ``[batch, dominant]`` int64 positions of the dominant tokens in
            ``hidden_states``, ascending (so ``dominant_indices[:, 0] == 0``).

    Raises ValueError for tensors whose shapes disagree and for counts that cannot work
    (``dominant < 1``, ``dominant > 1 + N``, ``contextual < 0``, ``contextual > R``).
    """
    batch_size, seq_length, hidden_size = _check_feature_shapes(hidden_states, cls_attention, keys)
    dominant, contextual = _check_split(dominant, contextual, seq_length)
    remainder_length = seq_length - dominant
    device = hidden_states.device

    with torch.no_grad():
        patch_scores = cls_attention.float().sum(dim=1)  # [batch, N]
        # A stable descending sort ranks equal scores by position, so ties go to the lower index
        # (torch.topk gives no such guarantee).
        top_patches = torch.sort(patch_scores, dim=1, descending=True, stable=True).indices[:, : dominant - 1] + 1
        is_dominant = torch.zeros(batch_size, seq_length, dtype=torch.uint8, device=device)
        is_dominant[:, 0] = 1
        is_dominant.scatter_(1, top_patches, 1)
        # Stable ascending sort of the 0/1 flags lists the remainder, then the dominant tokens, each in
        # sequence order: both index sets from one vectorised call.
        order = torch.sort(is_dominant, dim=1, stable=True).indices  # [batch, 1 + N]
        remainder_indices = order[:, :remainder_length]  # [batch, R]
        dominant_indices = order[:, remainder_length:]  # [batch, dominant]

    dominant_tokens = _gather_tokens(hidden_states, dominant_indices)  # [batch, dominant, hidden]
    if contextual == 0:
        return dominant_tokens, dominant_indices

    step = max(1, remainder_length // contextual)
    target_positions = torch.arange(0, remainder_length, step)[:contextual]  # [contextual]
    is_target = torch.zeros(remainder_length, dtype=torch.bool)
    is_target[target_positions] = True
    source_positions = torch.arange(remainder_length)[~is_target]  # [R - contextual]
    target_positions = target_positions.to(device)
    source_positions = source_positions.to(device)

    with torch.no_grad():
        remainder_keys = _gather_tokens(keys, remainder_indices).float()  # [batch, R, head_dim]
        remainder_keys = remainder_keys / remainder_keys.norm(dim=-1, keepdim=True)
        similarity = torch.bmm(
            remainder_keys[:, source_positions], remainder_keys[:, target_positions].transpose(1, 2)
        )  # [batch, R - contextual, contextual]
        # argmax returns the first maximum: equal similarity goes to the earlier target.
        assignment = nn.functional.one_hot(similarity.argmax(dim=2), contextual).float()

    remainder_hidden = _gather_tokens(hidden_states, remainder_indices).float()  # [batch, R, hidden]
    # A one-hot matmul (not scatter_add) keeps the sums deterministic on CUDA.
    merged_sum = torch.bmm(assignment.transpose(1, 2), remainder_hidden[:, source_positions])
    # merged_sum: [batch, contextual, hidden]
    merged_count = assignment.sum(dim=1).clamp(min=1).unsqueeze(-1)  # [batch, contextual, 1]
    contextual_tokens = remainder_hidden[:, target_positions] + merged_sum / merged_count
    tokens = torch.cat([dominant_tokens, contextual_tokens.to(hidden_states.dtype)], dim=1)
    return tokens, dominant_indices


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
    layers = _encoder_layers(vision_tower)
    producing_layer = _producing_layer(feature_layer, len(layers))

    hidden_states = vision_tower.embeddings(pixel_values)
    hidden_states = vision_tower.pre_layrnorm(hidden_states)
    for encoder_layer in layers[:producing_layer]:
        hidden_states = encoder_layer(hidden_states, None)

    self_attn = layers[producing_layer].self_attn
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
        hidden_states = layers[producing_layer](hidden_states, None)
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
    layers = _encoder_layers(vision_tower)
    producing_layer = _producing_layer(feature_layer, len(layers))
    self_attn = layers[producing_layer].self_attn
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
    cls_attention = outputs.attentions[producing_layer][:, :, 0, 1:].float()
    keys = projected_keys[0].view(batch_size, seq_length, self_attn.num_heads, self_attn.head_dim).mean(dim=2)
    return VisionZipFeatures(hidden_states, cls_attention, keys)


def _check_feature_shapes(
    hidden_states: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor
) -> tuple[int, int, int]:
    """Validate the three encoder tensors against each other; returns ``(batch, 1 + N, hidden)``."""
    if hidden_states.dim() != 3 or hidden_states.shape[1] < 2:
        raise ValueError(
            f"hidden_states must be [batch, 1 + patches, hidden] with at least one patch, "
            f"got shape {tuple(hidden_states.shape)}"
        )
    batch_size, seq_length, hidden_size = hidden_states.shape
    if cls_attention.dim() != 3 or cls_attention.shape[0] != batch_size or cls_attention.shape[2] != seq_length - 1:
        raise ValueError(
            f"cls_attention must be [batch={batch_size}, heads, patches={seq_length - 1}] to match hidden_states "
            f"{tuple(hidden_states.shape)}, got shape {tuple(cls_attention.shape)}"
        )
    if keys.dim() != 3 or keys.shape[:2] != (batch_size, seq_length):
        raise ValueError(
            f"keys must be [batch={batch_size}, tokens={seq_length}, head_dim] to match hidden_states "
            f"{tuple(hidden_states.shape)}, got shape {tuple(keys.shape)}"
        )
    return batch_size, seq_length, hidden_size


def _check_split(dominant: int, contextual: int, seq_length: int) -> tuple[int, int]:
    """Validate an explicit ``(dominant, contextual)`` split for ``seq_length = 1 + N`` tokens."""
    try:
        dominant, contextual = operator.index(dominant), operator.index(contextual)
    except TypeError:
        raise ValueError(f"dominant={dominant!r} and contextual={contextual!r} must be integers") from None
    if not 1 <= dominant <= seq_length:
        raise ValueError(
            f"dominant={dominant} is out of range; it counts the CLS token and must be between 1 and {seq_length} "
            f"(CLS + {seq_length - 1} patches)"
        )
    remainder_length = seq_length - dominant
    if not 0 <= contextual <= remainder_length:
        raise ValueError(
            f"contextual={contextual} is out of range; with dominant={dominant} of {seq_length} tokens it must be "
            f"between 0 and {remainder_length} (the tokens left to merge)"
        )
    return dominant, contextual


def _gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tokens [batch, seq, dim]``, ``indices [batch, k]`` -> ``[batch, k, dim]``."""
    return tokens.gather(1, indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def _encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """The encoder layers of a CLIP-style vision tower, or a ValueError naming what is missing."""
    parts = ("embeddings", "pre_layrnorm", "encoder")
    if not all(hasattr(vision_tower, part) for part in parts) or not hasattr(vision_tower.encoder, "layers"):
        raise ValueError(
            f"VisionZip needs a CLIP vision tower (CLIPVisionModel with a CLS token), got "
            f"{type(vision_tower).__name__}; use a LLaVA checkpoint whose vision_config is CLIP"
        )
    return vision_tower.encoder.layers


def _producing_layer(feature_layer: int, num_layers: int) -> int:
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
