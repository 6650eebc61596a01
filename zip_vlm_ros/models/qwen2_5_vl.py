"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): dynamic resolution, a 2x2 patch merger and M-RoPE.

An image is resized by the processor to a multiple of 28 px within ``min_pixels``/``max_pixels``; every
2x2 block of 14 px patches becomes one LLM token, so the full count depends on the frame (``smart_resize``).

Full path: the model's own ``get_image_features`` (merged tokens in raster order of the merged grid).
Reduced paths, on those stock merged tokens:

* DivPrune (no attention needed), kept tokens in raster order;
* VisionZip without CLS (``visionzip_scored_reduce``): each merged token is scored by the attention it
  receives at the tower's last full-attention layer, averaged over queries and heads and then over the
  four patches the merger joins (``qwen_tower_scores``, in query chunks, window order undone). The
  ``dominant`` top-scored tokens are kept (in raster order), the rest merge into ``contextual`` tokens by
  the cosine similarity of that layer's keys pooled over the four patches; a contextual token is its
  target token plus the mean of the tokens that joined it, and sits at its target's stock position.
  ``split_budget`` splits the budget as for LLaVA (no CLS among the dominant tokens here).

Provenance: the processor resizes the whole frame (no crop), so one ``CropBox`` covers the frame with the
``rows x columns`` grid of merged tokens; a cell is the 2x2 patches one LLM token joins.

Positions (M-RoPE): every LLM token has a (t, h, w) position. For the full image they are
``get_rope_index``'s: text counts up by one per token, an image at text position ``p`` gives its token at
grid row ``i``, column ``j`` the position ``(p, p + i, p + j)`` and the text after it continues at
``p + max(rows, columns)``. A reduced image keeps its kept tokens' stock positions and the text after it
continues exactly where it would after the full image, so nothing after the image moves (as vLLM's
video-token pruning keeps each kept token's position). The difference between a token's sequence index
and its text position after the last image (``rope_delta``) is the family's prefix state: a later
question and every decode step add it to their sequence indices.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch

from zip_vlm_ros.errors import ModelLoadError, RequestError
from zip_vlm_ros.errors import first_line
from zip_vlm_ros.models.base import (EncodedPixels, Encoder, FamilyAdapter, ImageSize, PromptEmbeddings,
                                     VisualTokens, load_weights_and_processor)
from zip_vlm_ros.models.clip_features import encode_for_visionzip
from zip_vlm_ros.models.provenance import CropBox, provenance_of_all_patches, provenance_of_crops
from zip_vlm_ros.models.qwen_tower_scores import encode_with_received_attention
from zip_vlm_ros.reducers import divprune_reduce, split_budget, visionzip_scored_reduce

__all__ = ["QwenVLAdapter", "mrope_positions"]

# The reducers this family serves below the full count (VisPruner reads a CLS token's attention, which
# Qwen2.5-VL's tower does not have; VisionZip here scores by the attention each token receives).
QWEN_REDUCERS = ("divprune", "visionzip")


class QwenVLAdapter(FamilyAdapter):
    model_type = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    batches_prompts = False
    traces_visual_tokens = True
    image_slot = "<|vision_start|>{image}<|vision_end|>"

    def read_tower_geometry(self, hf_config) -> None:
        # no CLIP feature layer or square crops: merged 2x2 patches of a dynamically resized image
        vision_config = hf_config.vision_config
        self.merge_size = vision_config.spatial_merge_size
        self.factor = vision_config.patch_size * self.merge_size  # pixels per side of one LLM token
        self.min_pixels = self.image_processor.size["shortest_edge"]
        self.max_pixels = self.image_processor.size["longest_edge"]

    @staticmethod
    def model_class():
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    @classmethod
    def check_config(cls, name: str, hf_config) -> None:
        if hf_config.vision_config.model_type != "qwen2_5_vl_vision":
            raise ModelLoadError(f"{name}: a Qwen2.5-VL checkpoint needs its own vision tower; this one has "
                                 f"{hf_config.vision_config.model_type!r}")

    @classmethod
    def load(cls, name: str, hf_config, dtype: torch.dtype, device: torch.device, contextual_ratio: float,
             clock, vision_tower: str = "") -> "QwenVLAdapter":
        processor = load_still_image_processor(name)
        model, _ = load_weights_and_processor(name, cls.model_class(), dtype, device, processor=processor)
        return cls(name, hf_config, model, processor, contextual_ratio, clock)

    def limit_pixels(self, max_pixels: int) -> None:
        if max_pixels < self.min_pixels:
            raise ModelLoadError(f"{self.name}: max_pixels={max_pixels} is below the processor's min_pixels="
                                 f"{self.min_pixels}; give max_pixels >= {self.min_pixels} (0: the processor's "
                                 f"{self.image_processor.size['longest_edge']})")
        self.max_pixels = max_pixels

    @property
    def context_tokens(self) -> int:
        return self.hf_config.text_config.max_position_embeddings

    @property
    def visual_tokens_full(self) -> int:
        return self.max_pixels // (self.factor * self.factor)

    @property
    def base_tokens_full(self) -> int:
        return self.visual_tokens_full

    def resized(self, image_size: ImageSize) -> tuple[int, int]:
        """``(height, width)`` pixels the processor resizes an image of this size to (multiples of 28)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        height, width = image_size
        return smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def token_grid(self, image_size: ImageSize) -> tuple[int, int]:
        """``(rows, columns)`` of the merged tokens the LLM reads for an image of this size."""
        height, width = self.resized(image_size)
        return height // self.factor, width // self.factor

    def base_token_count(self, image_size: ImageSize) -> int:
        return self.full_token_count(image_size)

    def multi_image_text(self, labels, counts, image_token: str) -> str:
        """Qwen's own multi-image layout: each image in its <|vision_start|> ... <|vision_end|> slot, one
        after the other as the chat template writes several images; a non-empty label introduces its image
        on a line of its own (``"rear: <slot>\\n"``)."""
        slots = [self.image_slot.format(image=image_token * count) for count in counts]
        return "".join(f"{label}: {slot}\n" if label else slot for label, slot in zip(labels, slots))

    def full_token_count(self, image_size: ImageSize) -> int:
        rows, columns = self.token_grid(image_size)
        return rows * columns

    def visual_token_count(self, image_size: ImageSize, budget: int, reducer: str = "divprune") -> int:
        """Also the request's check (the engine asks it before any work): RequestError when the image
        would be reduced by a reducer this family cannot run."""
        full = self.full_token_count(image_size)
        if budget < full:
            self.check_reducer(reducer)
        return min(budget, full)

    def check_reducer(self, reducer: str) -> None:
        """RequestError when `reducer` cannot run on this family's tokens."""
        if reducer not in QWEN_REDUCERS:
            raise RequestError(f"reducer {reducer!r} needs a CLIP tower's CLS attention, which {self.label} does not "
                               f"have; use one of {', '.join(QWEN_REDUCERS)} (or a budget at or above the full count)")

    def reduction_settings(self, image_size: ImageSize, budget: int, reducer: str = "divprune") -> tuple:
        if not self.reduced(image_size, budget):
            return ("none", self.max_pixels)
        return (reducer, budget, self.max_pixels, self.reducer_options(reducer))

    def multi_image_settings(self, count: int, reducer: str = "divprune") -> tuple:
        return ("qwen", count, self.max_pixels, reducer, self.reducer_options(reducer))

    def preprocess(self, images: list[np.ndarray]) -> dict:
        size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        outputs = self.image_processor(images=images, return_tensors="pt", input_data_format="channels_last",
                                       size=size)
        return {"pixel_values": outputs["pixel_values"].to(self.model.device, self.model.dtype),  # [patches, C*T*P*P]
                "image_grid_thw": outputs["image_grid_thw"].to(self.model.device)}               # [images, 3]

    def encode(self, images: list[np.ndarray], budget: int, reducer: str = "divprune") -> VisualTokens:
        start = self.clock()
        pixels = self.preprocess(images)
        image_sizes = [image.shape[:2] for image in images]
        encoded, anchors = self.encode_with_anchors(pixels, image_sizes, budget, reducer)
        vision_ms = (self.clock() - start) * 1000.0 - encoded.reduction_ms
        grids = [tuple(int(value) for value in row) for row in pixels["image_grid_thw"].tolist()]
        llm_grids = [(t, h // self.merge_size, w // self.merge_size) for t, h, w in grids]
        return VisualTokens(encoded.features, encoded.counts, encoded.reductions, vision_ms, encoded.reduction_ms,
                            grids=llm_grids, kept=anchors, provenance=encoded.provenance)

    def encode_pixels(self, pixels: dict, image_sizes: list[ImageSize], budget: int, reducer: str = "divprune", *,
                      encoder: Encoder = encode_for_visionzip) -> EncodedPixels:
        return self.encode_with_anchors(pixels, image_sizes, budget, reducer)[0]

    def encode_with_anchors(self, pixels: dict, image_sizes: list[ImageSize], budget: int,
                            reducer: str) -> tuple[EncodedPixels, list[torch.Tensor | None]]:
        """``(EncodedPixels, anchors)``: features ``[sum(counts), text_hidden]`` with their provenance, and
        per image the stock (raster) index whose M-RoPE position each token takes (None: all tokens, in
        order). A kept token takes its own; a VisionZip contextual token its target's."""
        reduced_any = any(self.reduced(image_size, budget) for image_size in image_sizes)
        if reduced_any:
            self.check_reducer(reducer)
        if reduced_any and reducer == "visionzip":
            tower = encode_with_received_attention(self.model.model, pixels["pixel_values"], pixels["image_grid_thw"])
            per_image, scores, keys = tower
        else:
            per_image = list(self.model.model.get_image_features(
                pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"]).pooler_output)
            scores = keys = [None] * len(per_image)  # each [rows * columns, text_hidden], raster order
        features, counts, reductions, anchors, provenance, reduction_ms = [], [], [], [], [], 0.0
        for image_features, image_scores, image_keys, image_size in zip(per_image, scores, keys, image_sizes):
            frame = self.frame_box(image_size)
            if not self.reduced(image_size, budget):
                features.append(image_features)
                anchors.append(None)
                reductions.append("none")
                provenance.append(provenance_of_all_patches([frame]))
            else:
                reduction_start = self.clock()
                tokens, sources, kept = self.reduce_image(image_features, image_scores, image_keys, budget, reducer)
                reduction_ms += (self.clock() - reduction_start) * 1000.0
                features.append(tokens)
                anchors.append(kept)
                reductions.append(reducer)
                provenance.append(provenance_of_crops(sources[None], [frame], 0))
            counts.append(features[-1].shape[0])
        return EncodedPixels(torch.cat(features), counts, reductions, reduction_ms, provenance), anchors

    def reduce_image(self, features: torch.Tensor, scores: torch.Tensor | None, keys: torch.Tensor | None,
                     budget: int, reducer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image's ``features [merged, text_hidden]`` (raster order) reduced to `budget` tokens:
        ``(tokens [budget, text_hidden], sources [budget, merged] bool, anchors [budget])``."""
        if reducer == "divprune":
            reduced = divprune_reduce(features[None], budget)
            sources = reduced.sources[0]
            return reduced.tokens[0], sources, sources.float().argmax(dim=1)  # ascending stock indices
        dominant, contextual = split_budget(budget, self.contextual_ratio)
        reduced = visionzip_scored_reduce(features[None], scores[None], keys[None], dominant, contextual)
        return reduced.tokens[0], reduced.sources[0], reduced.anchors[0]

    def frame_box(self, image_size: ImageSize) -> CropBox:
        """The whole frame (the processor resizes it, never crops) with its ``rows x columns`` merged-token
        grid: each cell is the 2x2 patches one LLM token joins."""
        rows, columns = self.token_grid(image_size)
        return CropBox(0.0, 0.0, float(image_size[0]), float(image_size[1]), rows, columns)

    # ------------------------------------------------------------------ M-RoPE positions

    def embed_prompt(self, prompt_ids, prefix_length: int, visual: VisualTokens) -> PromptEmbeddings:
        input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.model.device)
        positions = mrope_positions(list(prompt_ids), self.image_token_id, visual.counts, visual.grids, visual.kept)
        positions = positions.to(self.model.device)
        rope_delta = int(positions.max()) + 1 - len(prompt_ids)
        return PromptEmbeddings(self.embed_with_image(input_ids, visual.features), prefix_state=rope_delta,
                                position_ids=positions[:, None, :])

    def text_positions(self, prefix_state, start: int, length: int) -> torch.Tensor:
        """``[3, 1, length]`` positions of `length` text tokens at sequence index `start` after the prompt's
        images: the index plus the prompt's ``rope_delta`` (`prefix_state`), on all three axes."""
        positions = torch.arange(start, start + length, device=self.model.device) + int(prefix_state)
        return positions.view(1, 1, -1).expand(3, 1, -1)


def load_still_image_processor(name: str):
    """The checkpoint's ``Qwen2_5_VLProcessor`` (image processor, tokenizer, chat template) without its video
    processor: transformers builds that on torchvision, which this package does not need, and
    ``AutoProcessor`` fails without it. Images and text go through the stock processor code."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.utils import cached_file

    class StillImageProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        image_processor = AutoImageProcessor.from_pretrained(name, backend="pil")
        template_file = cached_file(name, "chat_template.json", _raise_exceptions_for_missing_entries=False)
        chat_template = json.loads(pathlib.Path(template_file).read_text())["chat_template"] if template_file \
            else tokenizer.chat_template
    except Exception as error:
        raise ModelLoadError(f"cannot load the processor of {name!r}: {first_line(error)}") from error
    return StillImageProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                               chat_template=chat_template)


def mrope_positions(prompt_ids: list[int], image_token_id: int, counts: list[int],
                    grids: list[tuple[int, int, int]], kept: list[torch.Tensor | None]) -> torch.Tensor:
    """``[3, len(prompt_ids)]`` (t, h, w) positions of a prompt whose image tokens are `counts` runs, in order.

    Image ``k`` has the LLM-side grid ``grids[k] = (t, rows, columns)`` and feeds the stock tokens
    ``kept[k]`` (per token the raster index whose position it takes; None: all, in order). Each token gets
    the position ``get_rope_index`` gives that stock token in the prompt with every image at full size, and
    text continues as it would after the full image.
    """
    positions = torch.empty((3, len(prompt_ids)), dtype=torch.long)
    index = current = image = 0
    while index < len(prompt_ids):
        if prompt_ids[index] != image_token_id:
            positions[:, index] = current
            index += 1
            current += 1
            continue
        frames, rows, columns = grids[image]
        time = torch.arange(frames).repeat_interleave(rows * columns)
        row = torch.arange(rows).repeat_interleave(columns).repeat(frames)
        column = torch.arange(columns).repeat(rows * frames)
        stock = torch.stack([time, row, column]) + current  # [3, frames * rows * columns]
        chosen = stock if kept[image] is None else stock[:, kept[image].cpu()]
        if chosen.shape[1] != counts[image]:
            raise ValueError(f"image {image} feeds {chosen.shape[1]} tokens but its run holds {counts[image]}")
        positions[:, index:index + counts[image]] = chosen
        index += counts[image]
        current += max(rows, columns)
        image += 1
    return positions
