"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one image resized to the tower's square input.

Full path: the model's own ``get_image_features`` (``N`` patches, plus CLS under the "full" strategy).
Reduced paths, on the one crop: VisionZip (the LLM reads its tokens as ``visionzip_compress`` orders them:
CLS, dominant patches in sequence order, contextual tokens); VisPruner (kept patches in raster order, as
the official code's mask); DivPrune on the stock projected features (kept tokens in their order), as the
official code prunes the LLM's input embeddings.
"""

from __future__ import annotations

import numpy as np
import torch

from zip_vlm_ros.models.base import EncodedPixels, Encoder, FamilyAdapter, ImageSize
from zip_vlm_ros.models.clip_features import encode_for_visionzip
from zip_vlm_ros.models.provenance import CropBox, center_crop_box, provenance_from_sources, provenance_of_all_patches

__all__ = ["LlavaAdapter"]


class LlavaAdapter(FamilyAdapter):
    model_type = "llava"
    label = "LLaVA-1.5"

    @staticmethod
    def model_class():
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @property
    def visual_tokens_full(self) -> int:
        # "default" drops CLS from the stock features, "full" keeps it.
        return self.patches_per_side ** 2 + (1 if self.select_strategy == "full" else 0)

    def full_token_count(self, image_size: ImageSize) -> int:
        return self.visual_tokens_full

    def visual_token_count(self, image_size: ImageSize, budget: int, reducer: str = "visionzip") -> int:
        # VisPruner keeps patches only (never CLS under the "full" strategy): at most N of them.
        kept = min(budget, self.patches_per_side ** 2) if reducer == "vispruner" else budget
        return min(kept, self.visual_tokens_full)

    def reduction_settings(self, image_size: ImageSize, budget: int, reducer: str = "visionzip") -> tuple:
        if not self.reduced(image_size, budget):
            return ("none", self.feature_layer, self.select_strategy)
        return (reducer, self.feature_layer, self.select_strategy, budget, self.reducer_options(reducer))

    def preprocess(self, images: list[np.ndarray]) -> dict:
        pixel_values = self.image_processor(images=images, return_tensors="pt",
                                            input_data_format="channels_last")["pixel_values"]
        return {"pixel_values": pixel_values.to(self.model.device, self.model.dtype)}  # [batch, 3, height, width]

    def frame_crop(self, image_size: ImageSize) -> CropBox:
        """The part of a frame the tower sees: CLIP preprocessing's centred square, or the whole frame
        for a processor that resizes without cropping."""
        size, crop_size = self.image_processor.size, getattr(self.image_processor, "crop_size", None)
        if "shortest_edge" in size and getattr(self.image_processor, "do_center_crop", False) and crop_size:
            return center_crop_box(image_size, size["shortest_edge"], (crop_size["height"], crop_size["width"]),
                                   self.patches_per_side)
        return CropBox(0.0, 0.0, float(image_size[0]), float(image_size[1]), self.patches_per_side)

    def encode_pixels(self, pixels: dict, image_sizes: list[ImageSize], budget: int, reducer: str = "visionzip", *,
                      encoder: Encoder = encode_for_visionzip) -> EncodedPixels:
        """All images in one tower forward: ``[len(images) * count, text_hidden]`` features, each image's
        tokens traced to its frame."""
        count = self.visual_token_count(image_sizes[0], budget, reducer)
        reduction = self.reduction_name(image_sizes[0], budget, reducer)
        crops = [[self.frame_crop(image_size)] for image_size in image_sizes]
        cls_first = 1 if self.select_strategy == "full" else 0  # the stock features' leading CLS token
        reduction_ms = 0.0
        if reduction == "none":
            image_outputs = self.model.model.get_image_features(
                pixel_values=pixels["pixel_values"], vision_feature_layer=self.feature_layer,
                vision_feature_select_strategy=self.select_strategy)
            features = torch.cat(list(image_outputs.pooler_output))  # [batch * visual_tokens_full, text_hidden]
            provenance = [provenance_of_all_patches(image_crops, cls_first) for image_crops in crops]
        elif reduction == "divprune":
            # the stock features (tower run to the feature layer only), then a selection per image
            reduced = [self.divprune_tokens(image_features, budget)
                       for image_features in self.projected_features(pixels["pixel_values"])]
            features = torch.cat([tokens for (tokens, _), _ in reduced])  # [batch * count, text_hidden]
            reduction_ms = sum(ms for _, ms in reduced)
            provenance = [provenance_from_sources(sources, image_crops, cls_first)
                          for ((_, sources), _), image_crops in zip(reduced, crops)]
        else:
            compressed = self.compress_crops(pixels["pixel_values"], budget, encoder, reducer)
            features = compressed.tokens.flatten(0, 1)  # [batch * count, text_hidden]
            reduction_ms = compressed.reduction_ms
            provenance = [provenance_from_sources(sources, image_crops, compressed.first_patch)
                          for sources, image_crops in zip(compressed.sources, crops)]
        return EncodedPixels(features, [count] * len(image_sizes), [reduction] * len(image_sizes), reduction_ms,
                             provenance)
