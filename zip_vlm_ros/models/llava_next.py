"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes, a base image plus a grid of crops.

Full path: the model's own ``get_image_features`` (base patches, then the stitched grid unpadded with
an ``image_newline`` token after each row), so the answer is stock ``generate``'s token for token.
Reduced paths, each as its authors' LLaVA-NeXT code does: VisionZip and VisPruner on every crop (base and
grid) with the same per-crop share of the budget (``split_budget_over_crops``), laid out as
``anyres_visionzip_layout`` / ``anyres_vispruner_layout`` say; DivPrune once over the image's whole stock
sequence (base, unpadded grid, row newlines) with the whole budget.
A frame's full count depends on its aspect ratio: 1948 tokens for 1280x720 on LLaVA-NeXT-7B.
Multi-image requests read the base image only (``encode_base``; why: ``zip_vlm_ros.engine.multi_image``).
"""

from __future__ import annotations

import numpy as np
import torch

from zip_vlm_ros.models.anyres import (anyres_full_token_count, anyres_grid_shape, anyres_vispruner_layout,
                                       anyres_visionzip_layout, split_budget_over_crops)
from zip_vlm_ros.errors import ModelLoadError
from zip_vlm_ros.models.base import Encoder, FamilyAdapter, ImageSize, VisualTokens, check_clip_tower
from zip_vlm_ros.models.clip_features import encode_for_visionzip

__all__ = ["LlavaNextAdapter"]


class LlavaNextAdapter(FamilyAdapter):
    model_type = "llava_next"
    label = "LLaVA-NeXT"

    def __init__(self, name: str, hf_config, model, processor, contextual_ratio: float, clock):
        super().__init__(name, hf_config, model, processor, contextual_ratio, clock)
        self.grid_pinpoints = [list(pinpoint) for pinpoint in hf_config.image_grid_pinpoints]
        self.crop_size = hf_config.vision_config.image_size
        crop = getattr(self.image_processor, "crop_size", None) or {}
        crop_height = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
        processor_pinpoints = [list(p) for p in getattr(self.image_processor, "image_grid_pinpoints", []) or []]
        if crop_height != self.crop_size or processor_pinpoints != self.grid_pinpoints:
            raise ModelLoadError(
                f"{name}: the image processor cuts {crop_height} px crops on grids {processor_pinpoints}, but the "
                f"model expects {self.crop_size} px crops on {self.grid_pinpoints}; the processor and model files "
                f"come from different checkpoints")
        self._visual_tokens_full = max(self.full_token_count(tuple(pinpoint)) for pinpoint in self.grid_pinpoints)

    @staticmethod
    def model_class():
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    @classmethod
    def check_config(cls, name: str, hf_config) -> None:
        check_clip_tower(name, hf_config)
        # The stock AnyRes packing reshapes N patches per crop into a P x P grid: CLS must be dropped.
        if hf_config.vision_feature_select_strategy != "default" or not hf_config.image_grid_pinpoints:
            raise ModelLoadError(
                f"{name}: LLaVA-NeXT support needs vision_feature_select_strategy 'default' and image_grid_pinpoints; "
                f"this checkpoint has {hf_config.vision_feature_select_strategy!r} and "
                f"{hf_config.image_grid_pinpoints!r}")

    @property
    def visual_tokens_full(self) -> int:
        """The full count of an image whose aspect ratio fits its grid exactly (no unpadding), largest grid."""
        return self._visual_tokens_full

    def full_token_count(self, image_size: ImageSize) -> int:
        return anyres_full_token_count(image_size, self.grid_pinpoints, self.crop_size, self.patches_per_side)

    def grid_shape(self, image_size: ImageSize) -> tuple[int, int]:
        return anyres_grid_shape(image_size, self.grid_pinpoints, self.crop_size)

    def num_crops(self, image_size: ImageSize) -> int:
        grid_height, grid_width = self.grid_shape(image_size)
        return 1 + grid_height * grid_width

    def tokens_per_crop_at(self, image_size: ImageSize, budget: int, reducer: str = "visionzip") -> int:
        # VisPruner keeps patches (at most P * P per crop), VisionZip tokens of CLS + patches.
        most = self.patches_per_side ** 2 if reducer == "vispruner" else self.tokens_per_crop
        return split_budget_over_crops(budget, self.num_crops(image_size), most)

    def visual_token_count(self, image_size: ImageSize, budget: int, reducer: str = "visionzip") -> int:
        if not self.reduced(image_size, budget):
            return self.full_token_count(image_size)
        if reducer == "divprune":
            return budget
        return self.num_crops(image_size) * self.tokens_per_crop_at(image_size, budget, reducer)

    def reduction_settings(self, image_size: ImageSize, budget: int, reducer: str = "visionzip") -> tuple:
        if not self.reduced(image_size, budget):
            return ("none", self.feature_layer, self.select_strategy)
        kept = budget if reducer == "divprune" else self.tokens_per_crop_at(image_size, budget, reducer)
        return (reducer, self.feature_layer, kept, self.reducer_options(reducer))

    def preprocess(self, images: list[np.ndarray]) -> dict:
        inputs = self.image_processor(images=images, return_tensors="pt", input_data_format="channels_last")
        # pixel_values: [batch, max_crops, 3, H, W], padded after each image's real crops.
        return {"pixel_values": inputs["pixel_values"].to(self.model.device, self.model.dtype),
                "image_sizes": inputs["image_sizes"]}

    def encode_pixels(self, pixels: dict, image_sizes: list[ImageSize], budget: int, reducer: str = "visionzip", *,
                      encoder: Encoder = encode_for_visionzip) -> tuple[torch.Tensor, list[int], list[str], float]:
        """One tower forward per image over its crops."""
        features, reductions, reduction_ms = [], [], 0.0
        for index, image_size in enumerate(image_sizes):
            reduction = self.reduction_name(image_size, budget, reducer)
            if reduction in ("visionzip", "vispruner"):
                grid_shape = self.grid_shape(image_size)
                crops = pixels["pixel_values"][index, :self.num_crops(image_size)]  # [num_crops, 3, H, W]
                per_crop = self.tokens_per_crop_at(image_size, budget, reducer)
                compressed = self.compress_crops(crops, per_crop, encoder, reducer)
                if reduction == "vispruner":
                    features.append(anyres_vispruner_layout(compressed.tokens, compressed.kept_indices, grid_shape,
                                                            self.patches_per_side))
                else:
                    features.append(anyres_visionzip_layout(compressed.tokens, compressed.kept_indices,
                                                            compressed.contextual, grid_shape, self.patches_per_side))
                reduction_ms += compressed.reduction_ms
            elif reduction == "divprune":
                # the stock sequence (base, unpadded grid, newlines) from the tower run to the feature layer
                # only, then one selection over all of it, as the official NeXT code does
                crops = pixels["pixel_values"][index, :self.num_crops(image_size)]  # [num_crops, 3, H, W]
                packed, _ = self.model.model.pack_image_features(
                    [self.projected_features(crops)], pixels["image_sizes"][index:index + 1], self.select_strategy,
                    image_newline=self.model.model.image_newline)
                reduced, divprune_ms = self.divprune_tokens(packed[0], budget)  # packed[0]: [full, hidden]
                reduction_ms += divprune_ms
                features.append(reduced.tokens)
            else:
                image_outputs = self.model.model.get_image_features(
                    pixel_values=pixels["pixel_values"][index:index + 1],
                    image_sizes=pixels["image_sizes"][index:index + 1],
                    vision_feature_layer=self.feature_layer, vision_feature_select_strategy=self.select_strategy)
                features.append(image_outputs.pooler_output[0])  # [full count, text_hidden]
            reductions.append(reduction)
        return torch.cat(features), [len(image_features) for image_features in features], reductions, reduction_ms

    def encode_base(self, image: np.ndarray, budget: int, reducer: str = "visionzip") -> VisualTokens:
        """The base crop only (the whole image resized to the tower's input, crop 0 of the processor's
        output): `reducer` to `budget` tokens, or its stock patch features (``base_tokens_full``)."""
        start = self.clock()
        base = self.preprocess([image])["pixel_values"][:, 0]  # [1, 3, crop, crop]
        reduction, reduction_ms = (reducer if budget < self.base_tokens_full else "none"), 0.0
        if reduction in ("visionzip", "vispruner"):
            compressed = self.compress_crops(base, budget, reducer=reducer)
            features, reduction_ms = compressed.tokens[0], compressed.reduction_ms
        else:
            llava = self.model.model
            hidden = llava.vision_tower(base, output_hidden_states=True).hidden_states[self.feature_layer]
            # [1, 1 + N, vision_hidden]; the "default" strategy (checked at load) drops CLS, as stock NeXT does
            features = llava.multi_modal_projector(hidden[:, 1:])[0]  # [N, text_hidden]
            if reduction == "divprune":
                reduced, reduction_ms = self.divprune_tokens(features, budget)
                features = reduced.tokens
        vision_ms = (self.clock() - start) * 1000.0 - reduction_ms
        return VisualTokens(features, [len(features)], [reduction], vision_ms, reduction_ms)
