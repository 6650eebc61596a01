"""What every model-family adapter shares: the visual-token record, the adapter interface, VisionZip on
a batch of crops, and loading a checkpoint's weights and processor.

An adapter turns images into a flat run of projected visual tokens plus their count per image, and a
tokenized prompt plus those tokens into the LLM's input embeddings (``embed_prompt``; by default the
token embeddings with the visual tokens at the image placeholders). The engine never learns which
family it runs.
"""

from __future__ import annotations

import gc
import json
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from zip_vlm_ros.errors import ModelLoadError, first_line
from zip_vlm_ros.models.clip_features import encode_for_visionzip, encode_to_feature_layer
from zip_vlm_ros.models.provenance import CropBox, TokenProvenance, center_crop_box
from zip_vlm_ros.reducers import (DEFAULT_IMPORTANT_RATIO, ReducedTokens, VisionZipFeatures, divprune_reduce, split_budget,
                                  vispruner_reduce, visionzip_reduce)

__all__ = ["EncodedPixels", "FamilyAdapter", "PromptEmbeddings", "VisualTokens", "check_clip_tower", "image_block",
           "load_weights_and_processor", "move_to_device", "read_config_json"]

ImageSize = tuple[int, int]  # (height, width) in pixels
# encode_for_visionzip or encode_reference_style: (vision_tower, pixel_values, feature_layer) -> features
Encoder = Callable[[torch.nn.Module, torch.Tensor, int], VisionZipFeatures]


@dataclass
class VisualTokens:
    """Projected visual tokens for a list of images, in the order the prompt's placeholders take them."""

    features: torch.Tensor              # [sum(counts), text_hidden]: image 0's tokens, then image 1's, ...
    counts: list[int]                   # visual tokens of each image
    reductions: list[str]               # per image: the reducer's name ("visionzip", "divprune", ...) or "none"
    vision_ms: float                    # preprocessing, vision encoder, projector, layout
    reduction_ms: float                 # the reducer's selection (+ merge) (0 when no image was reduced)
    # Per image, tokens the family's prompt embedding reads besides `features` (LLaVA-Mini: the
    # [patches, text_hidden] projected patch features its pre-fusion layers see); None for the others.
    patch_features: list[torch.Tensor] | None = None
    # Families with M-RoPE (Qwen2.5-VL): per image its stock token grid (t, rows, columns) on the LLM side,
    # and the stock raster indices of the tokens it feeds (None: all of them); None for the others.
    grids: list[tuple[int, int, int]] | None = None
    kept: list[torch.Tensor | None] | None = None
    # Per image, the frame patches each of its visual tokens stands for; None for an image (or a
    # family) that does not trace its tokens yet.
    provenance: list[TokenProvenance | None] | None = None


class EncodedPixels(NamedTuple):
    """What ``FamilyAdapter.encode_pixels`` returns (a 4-tuple without provenance is accepted too)."""

    features: torch.Tensor              # [sum(counts), text_hidden]
    counts: list[int]
    reductions: list[str]
    reduction_ms: float
    provenance: list[TokenProvenance | None] | None = None


@dataclass
class PromptEmbeddings:
    """What the LLM reads for a prompt about one image, from ``FamilyAdapter.embed_prompt``."""

    inputs_embeds: torch.Tensor         # [1, length, text_hidden]
    # The family's own state for the prompt's first `prefix_length` tokens, from which
    # ``embed_suffix`` continues (LLaVA-Mini: the pre-fusion key/value cache); None: nothing but the LLM's cache.
    prefix_state: object = None
    prefix_state_bytes: int = 0         # memory prefix_state keeps alive
    # [3, 1, length] M-RoPE positions of the prompt (Qwen2.5-VL); None: the LLM counts positions itself.
    position_ids: torch.Tensor | None = None


@dataclass
class CropTokens:
    """A per-crop reducer's output for a batch of crops, projected for the LLM.

    VisionZip: ``tokens [crops, dominant + contextual, text_hidden]``, ``kept_indices [crops, dominant]``
    ascending positions of the dominant tokens in each crop's ``1 + N`` tower tokens (0 is CLS).
    VisPruner: ``tokens [crops, kept, text_hidden]``, ``kept_indices [crops, kept]`` ascending patch
    positions in ``0..N-1`` (CLS dropped), ``contextual`` 0.
    ``sources [crops, tokens, S]``: the reducer's positions per output token (``ReducedTokens.sources``);
    position ``first_patch`` is a crop's first patch (1 for VisionZip, whose position 0 is CLS; 0 for VisPruner).
    """

    tokens: torch.Tensor
    kept_indices: torch.Tensor
    contextual: int
    reduction_ms: float
    sources: torch.Tensor
    first_patch: int


class FamilyAdapter:
    """One model family (LLaVA-1.5, LLaVA-NeXT, ...): config checks, preprocessing, the full-token and
    VisionZip paths, and how an image's visual tokens are laid out in the prompt.

    Subclasses set ``model_type`` (the checkpoint config's), ``label`` (for messages) and implement the
    methods that raise NotImplementedError. ``image_size`` arguments are ``(height, width)`` pixels.
    """

    model_type = ""
    label = ""
    # Answers one question over several images (``VlmEngine.generate_images``: each image's tokens from
    # ``encode_base``, placed at the prompt's placeholders by ``embed_prompt``).
    several_images = True
    # False for a family whose visual token count is fixed by training (LLaVA-Mini): token_budget is
    # then accepted and ignored, and results report the tokens the LLM really read.
    token_budget_applies = True
    # True for a family whose answers carry each image's provenance (``VisualTokens.provenance``: the frame
    # patches each visual token stands for), so that an overlay can be drawn of every answer.
    traces_visual_tokens = False
    # False for a family whose prompts carry their own positions (Qwen2.5-VL's M-RoPE): ``generate_batch``'s
    # left-padded rows count positions from the attention mask, which such a family cannot use, and a
    # ``DecodeBatch`` gives each of its rows the family's ``text_positions`` instead.
    batches_prompts = True

    def __init__(self, name: str, hf_config, model, processor, contextual_ratio: float,
                 clock: Callable[[], float]):
        self.name = name
        self.hf_config = hf_config
        self.model = model
        self.processor = processor
        self.image_processor = processor.image_processor
        self.contextual_ratio = contextual_ratio
        self.important_ratio = DEFAULT_IMPORTANT_RATIO  # VisPruner's T_imp = int(T * ratio), the official default
        self.clock = clock  # perf_counter after the device's queued work (the engine's)
        self.read_tower_geometry(hf_config)

    def torch_modules(self) -> list[torch.nn.Module]:
        """Every torch module the family runs (the engine chooses their CPU kernels)."""
        return [self.model]

    def read_tower_geometry(self, hf_config) -> None:
        """The vision tower's token geometry from the checkpoint's config (a CLIP tower's here)."""
        self.feature_layer = hf_config.vision_feature_layer
        self.select_strategy = hf_config.vision_feature_select_strategy
        vision_config = hf_config.vision_config
        self.patches_per_side = vision_config.image_size // vision_config.patch_size
        self.tokens_per_crop = 1 + self.patches_per_side ** 2  # what the tower emits per crop, CLS first

    @staticmethod
    def model_class():
        """The transformers class that loads this family's checkpoints."""
        raise NotImplementedError

    @classmethod
    def read_config(cls, name: str):
        """The checkpoint's config (``AutoConfig``); ModelLoadError in one line if it cannot be read."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(name)
        except Exception as error:
            raise ModelLoadError(f"cannot load model {name!r}: {first_line(error)}") from error

    @classmethod
    def check_config(cls, name: str, hf_config) -> None:
        """ModelLoadError if this family's code cannot serve the checkpoint `hf_config` describes."""
        check_clip_tower(name, hf_config)

    @classmethod
    def load(cls, name: str, hf_config, dtype: torch.dtype, device: torch.device, contextual_ratio: float,
             clock: Callable[[], float], vision_tower: str = "") -> "FamilyAdapter":
        """The adapter with the checkpoint's weights and processor loaded (`vision_tower`: LLaVA-Mini only)."""
        model, processor = load_weights_and_processor(name, cls.model_class(), dtype, device)
        return cls(name, hf_config, model, processor, contextual_ratio, clock)

    def limit_pixels(self, max_pixels: int) -> None:
        """Bound the pixels (and so the full visual-token count) of a dynamic-resolution family's images."""
        raise ModelLoadError(f"{self.name}: max_pixels={max_pixels} applies to dynamic-resolution checkpoints "
                             f"(Qwen2.5-VL); {self.label} reads images at a fixed size; set max_pixels to 0")

    @property
    def image_token_id(self) -> int:
        """The prompt's image placeholder token (repeated once per visual token)."""
        return self.hf_config.image_token_id

    @property
    def context_tokens(self) -> int:
        """The language model's context length: prompt plus answer."""
        return self.hf_config.text_config.max_position_embeddings

    @property
    def visual_tokens_full(self) -> int:
        """The most visual tokens the stock model feeds for one image (the upper end of token budgets)."""
        raise NotImplementedError

    def full_token_count(self, image_size: ImageSize) -> int:
        """Visual tokens the stock model feeds for an image of this size."""
        raise NotImplementedError

    def visual_token_count(self, image_size: ImageSize, budget: int, reducer: str = "visionzip") -> int:
        """Visual tokens the LLM reads for an image of this size at `budget` (>= 1) with `reducer`."""
        raise NotImplementedError

    def num_crops(self, image_size: ImageSize) -> int:
        """Square crops the vision tower encodes for an image of this size (1: the image itself)."""
        return 1

    def reduction_settings(self, image_size: ImageSize, budget: int, reducer: str = "visionzip") -> tuple:
        """Everything besides the pixels that decides an image's visual tokens (a prefix-cache key part)."""
        raise NotImplementedError

    def preprocess(self, images: list[np.ndarray]) -> dict:
        """The image processor's tensors for ``HxWx3 uint8`` `images`, on the model's device and dtype."""
        raise NotImplementedError

    def encode_pixels(self, pixels: dict, image_sizes: list[ImageSize], budget: int, reducer: str = "visionzip", *,
                      encoder: Encoder = encode_for_visionzip) -> EncodedPixels:
        """``EncodedPixels(features [sum(counts), text_hidden], counts, reductions, reduction ms, provenance)``
        from ``preprocess`` output; a family that does not trace its tokens may return the first four alone.
        `encoder` feeds VisionZip and VisPruner (``encode_reference_style`` for side-by-side benchmarks)."""
        raise NotImplementedError

    def encode(self, images: list[np.ndarray], budget: int, reducer: str = "visionzip") -> VisualTokens:
        """Visual tokens for ``HxWx3 uint8`` `images` at `budget`, as ``visual_token_count`` says."""
        start = self.clock()
        encoded = EncodedPixels(*self.encode_pixels(
            self.preprocess(images), [image.shape[:2] for image in images], budget, reducer))
        vision_ms = (self.clock() - start) * 1000.0 - encoded.reduction_ms
        return VisualTokens(encoded.features, encoded.counts, encoded.reductions, vision_ms, encoded.reduction_ms,
                            provenance=encoded.provenance)

    @property
    def base_tokens_full(self) -> int:
        """Visual tokens of one image at the tower's square input, without AnyRes crops: an image's full
        count in a multi-image request (576 for LLaVA-1.5 and LLaVA-NeXT-7B)."""
        return self.patches_per_side ** 2 + (1 if self.select_strategy == "full" else 0)

    def base_token_count(self, image_size: ImageSize) -> int:
        """Full visual tokens of an image of this size in a multi-image request (``base_tokens_full`` unless
        the family's count depends on the image, as Qwen2.5-VL's does)."""
        return self.base_tokens_full

    def encode_base(self, image: np.ndarray, budget: int, reducer: str = "visionzip") -> VisualTokens:
        """One image of a multi-image request: ``min(budget, base_tokens_full)`` visual tokens of the whole
        image at the tower's input size. Single-crop families read every image that way (``encode``);
        AnyRes families override it to skip their grid crops."""
        return self.encode([image], budget, reducer)

    def multi_image_settings(self, count: int, reducer: str = "visionzip") -> tuple:
        """Everything besides the pixels that decides one image's ``encode_base`` tokens at `count` visual
        tokens (a part of the per-image cache's key)."""
        if count >= self.base_tokens_full:
            return ("base", count, self.feature_layer, self.select_strategy, None)
        return ("base", count, self.feature_layer, self.select_strategy, reducer, self.reducer_options(reducer))

    # How the checkpoint's chat template wraps one image's placeholder (Qwen2.5-VL: between
    # <|vision_start|> and <|vision_end|>); a multi-image prompt replaces that whole slot.
    image_slot = "{image}"

    def multi_image_text(self, labels: Sequence[str], counts: Sequence[int], image_token: str) -> str:
        """What replaces the template's image placeholder in a multi-image prompt: each image's label, then
        its `counts` placeholders (``image_block``)."""
        return image_block(labels, counts, image_token)

    def reduction_name(self, image_size: ImageSize, budget: int, reducer: str = "visionzip") -> str:
        """What results report as the reduction of an image of this size at `budget`: `reducer` or "none"."""
        return reducer if self.reduced(image_size, budget) else "none"

    def reducer_options(self, reducer: str) -> tuple:
        """The settings besides the budget that decide `reducer`'s tokens (a cache-key part)."""
        if reducer == "visionzip":
            return (self.contextual_ratio,)
        if reducer == "vispruner":
            return (self.important_ratio,)
        return ()

    # ------------------------------------------------------------------ the LLM's input embeddings

    def embed_prompt(self, prompt_ids: Sequence[int], prefix_length: int, visual: VisualTokens) -> PromptEmbeddings:
        """The LLM's input embeddings for a whole prompt about one image: token embeddings with the
        image placeholders replaced by ``visual.features``. The prefix needs no state of its own."""
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.model.device)
        return PromptEmbeddings(self.embed_with_image(input_ids, visual.features))

    def embed_suffix(self, suffix_ids: Sequence[int], prefix_state) -> torch.Tensor:
        """``[1, len(suffix_ids), text_hidden]`` embeddings of a later question's own tokens, continuing a
        prefix that ``embed_prompt`` returned `prefix_state` for (plain token embeddings here)."""
        suffix = torch.tensor([list(suffix_ids)], dtype=torch.long, device=self.model.device)
        return self.model.get_input_embeddings()(suffix)

    def text_positions(self, prefix_state, start: int, length: int) -> torch.Tensor | None:
        """Position ids of `length` tokens at sequence index `start` after a prompt whose prefix state is
        `prefix_state` (a later question's tokens, a decode step). None: the LLM counts them itself, as
        every family does whose positions are sequence indices."""
        return None

    def embed_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: VisualTokens) -> torch.Tensor:
        """``[batch, length, text_hidden]`` embeddings of left-padded prompts (``attention_mask`` 1 on
        real tokens), one image each, row 0's image first in `visual`."""
        return self.embed_with_image(input_ids, visual.features)

    def embed_with_image(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by `features`, as LlavaModel does.

        input_ids ``[batch, length]`` holding each row's image's count of image tokens; features
        ``[sum of counts, text_hidden]``, row 0's image first. Returns ``[batch, length, text_hidden]``.
        """
        inputs_embeds = self.model.get_input_embeddings()(input_ids)
        image_mask = (input_ids == self.image_token_id).unsqueeze(-1)  # [batch, length, 1]
        # masked_scatter fills the placeholders in row-major order: row 0's tokens, then row 1's.
        return inputs_embeds.masked_scatter(image_mask, features.to(inputs_embeds.device, inputs_embeds.dtype))

    # ------------------------------------------------------------------ shared by the families

    def frame_crop(self, image_size: ImageSize) -> CropBox:
        """The part of a frame a CLIP processor hands the tower: its centred square, or the whole frame
        for a processor that resizes without cropping."""
        size, crop_size = self.image_processor.size, getattr(self.image_processor, "crop_size", None)
        if "shortest_edge" in size and getattr(self.image_processor, "do_center_crop", False) and crop_size:
            return center_crop_box(image_size, size["shortest_edge"], (crop_size["height"], crop_size["width"]),
                                   self.patches_per_side)
        return CropBox(0.0, 0.0, float(image_size[0]), float(image_size[1]), self.patches_per_side)

    def reduced(self, image_size: ImageSize, budget: int) -> bool:
        return budget < self.full_token_count(image_size)

    def compress_crops(self, pixel_values: torch.Tensor, per_crop: int,
                       encoder: Encoder = encode_for_visionzip, reducer: str = "visionzip") -> CropTokens:
        """A per-crop reducer on every crop: ``pixel_values [crops, 3, H, W]`` -> `per_crop` projected tokens
        each (VisPruner: ``min(per_crop, N)``).

        VisionZip: every crop gets the same ``split_budget(per_crop)`` dominant/contextual split; CLS is
        kept among the dominant tokens and projected like a patch, as in the VisionZip reference.
        VisPruner: patch features (CLS dropped) and the CLS attention of the feature layer pick the
        patches; only the kept ones are projected (the projector works token by token, so this equals
        projecting all and masking, as the official code does, up to float rounding).
        """
        llava = self.model.model
        encoded = encoder(llava.vision_tower, pixel_values, self.feature_layer)
        reduction_start = self.clock()
        if reducer == "vispruner":
            patches = encoded.hidden_states[:, 1:]  # [crops, N, vision_hidden]
            reduced = vispruner_reduce(patches, encoded.cls_attention, per_crop, self.important_ratio)
            kept = reduced.sources.float().argmax(dim=2)  # [crops, kept] each output's one patch position
            contextual, first_patch = 0, 0
        else:
            dominant, contextual = split_budget(per_crop, self.contextual_ratio)
            reduced = visionzip_reduce(encoded, dominant, contextual)  # tokens [crops, per_crop, hidden]
            kept = reduced.sources[:, :dominant].float().argmax(dim=2)  # [crops, dominant] ascending
            first_patch = 1
        reduction_ms = (self.clock() - reduction_start) * 1000.0
        return CropTokens(llava.multi_modal_projector(reduced.tokens), kept, contextual, reduction_ms,
                          reduced.sources, first_patch)

    def projected_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The stock projected features of ``pixel_values [crops, 3, H, W]``: ``[crops, tokens, text_hidden]``
        (CLS dropped under the "default" strategy), with the tower run only up to the feature layer."""
        llava = self.model.model
        hidden = encode_to_feature_layer(llava.vision_tower, pixel_values, self.feature_layer)
        return llava.multi_modal_projector(hidden[:, 1:] if self.select_strategy == "default" else hidden)

    def divprune_tokens(self, features: torch.Tensor, budget: int) -> tuple[ReducedTokens, float]:
        """DivPrune on one image's projected tokens ``features [N, text_hidden]`` (the stock LLM input):
        ``(ReducedTokens of tokens [min(budget, N), text_hidden] in original order and their sources
        [min(budget, N), N], reduction ms)``."""
        reduction_start = self.clock()
        reduced = divprune_reduce(features[None], budget)
        return ReducedTokens(reduced.tokens[0], reduced.sources[0]), (self.clock() - reduction_start) * 1000.0


def image_block(labels: Sequence[str], counts: Sequence[int], image_token: str) -> str:
    """The prompt text that replaces the template's image placeholder: one labelled line per image.

    ``image_block(["rear", "front"], [2, 1], "<image>") == "rear: <image><image>\\nfront: <image>\\n"``;
    an empty label gives the image's placeholders alone.
    """
    lines = [(f"{label}: " if label else "") + image_token * count for label, count in zip(labels, counts)]
    return "\n".join(lines) + "\n"


def check_clip_tower(name: str, hf_config) -> None:
    """VisionZip reads one CLIP layer's attention: a CLIP tower and a single integer feature layer."""
    vision_type = hf_config.vision_config.model_type
    if vision_type != "clip_vision_model" or not isinstance(hf_config.vision_feature_layer, int):
        raise ModelLoadError(f"{name}: VisionZip needs a CLIP vision tower with one feature layer; this checkpoint "
                             f"has {vision_type!r} with vision_feature_layer={hf_config.vision_feature_layer!r}")


def load_weights_and_processor(name: str, model_class, dtype: torch.dtype, device: torch.device, processor=None):
    """``model_class.from_pretrained`` (eval, on `device`, SDPA as configured) and its processor
    (``AutoProcessor``'s unless the family loaded `processor` itself)."""
    from transformers import AutoProcessor

    # Any failure inside transformers' loaders is a problem with the checkpoint's files: report it in
    # one line and keep the original exception chained for logs.
    try:
        if processor is None:
            processor = AutoProcessor.from_pretrained(name)
    except Exception as error:
        raise ModelLoadError(f"cannot load the processor of {name!r}: {first_line(error)}") from error
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ModelLoadError(f"{name}: its processor ({type(processor).__name__}) has no image processor and "
                             f"tokenizer; a LLaVA checkpoint needs both (processor_config.json, tokenizer files)")
    try:
        # Loaded on the CPU, then moved: placing weights directly on a device needs `accelerate`.
        model = model_class.from_pretrained(name, dtype=dtype)
    except Exception as error:
        raise ModelLoadError(f"cannot load the weights of {name!r}: {first_line(error)}") from error
    return move_to_device(model, name, dtype, device).eval(), processor


def move_to_device(module: torch.nn.Module, name: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """`module` on `device`; ModelLoadError (and the memory freed) when it does not fit there."""
    try:
        return module.to(device)
    except torch.OutOfMemoryError:
        del module
        gc.collect()
        torch.cuda.empty_cache()
        raise ModelLoadError(f"{name} in {str(dtype).removeprefix('torch.')} does not fit in the memory of "
                             f"{device}; use a smaller model or free the GPU") from None


def read_config_json(path: pathlib.Path, name: str) -> dict:
    """A checkpoint directory's config.json as a dict; ModelLoadError in one line if it cannot be read."""
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{name}/config.json cannot be read ({error}); re-download the checkpoint") from None
