"""LLaVA-Mini (ICTNLP, arXiv 2501.03895): one compressed visual token per image (C x C in general),
with the image's content fused into the prompt's text tokens before the LLM reads them.

Per image: CLIP patch features (``hidden_states[mm_vision_select_layer]``, CLS dropped) -> the
compressor -> C^2 tokens; the projector maps both the patch features and the compressed tokens to the
LLM's width. Per prompt: the pre-fusion layers run causally over ``[patch tokens, compressed tokens,
the prompt's text tokens]`` (``llava_mini_modules.PreFusion``); the LLM reads the prompt's tokens as
their fused states, the pre-fusion outputs at the compressed positions standing in for the image (its
C^2 placeholders), and the prompt tokens pre-fusion does not read (token id 0, as the reference masks
it) as plain embeddings. Generated tokens are plain embeddings, as in the reference.

Caching: everything before the question - CLIP, the compressor, the pre-fusion key/values of the
patches, compressed tokens and prompt prefix, and the LLM's key/values of the prefix - is the frame's
prefix; a later question runs only its own tokens through pre-fusion and the LLM, on forks of both
caches. ``token_budget`` does not apply: C^2 is fixed by training, so every budget gives the same
tokens and results report ``reduction: llava-mini`` with the C^2 tokens the LLM read.

Several images (``VlmEngine.generate_images``: surround cameras, a camera's history) follow the
reference's video mode (``LlavaMiniMetaForCausalLM.prepare_inputs_labels_for_multimodal`` with 6-D images,
frame by frame through ``encode_images_mini``): each frame is stretched to the tower's square input with
nearest-neighbour interpolation (its video loader's resize to 336 x 336; no padding), encoded as one
image, and run through pre-fusion on its own as ``[its patches, its C^2 tokens, the whole prompt]``. The
LLM reads every frame's fused C^2 tokens concatenated, in frame order, at the prompt's one image position,
and the prompt's text tokens as their fused states averaged over the frames (summed in float32, divided by
the frame count); positions are simply 0..L-1. The per-image labels go in the text: the user turn is
``<frame tokens>\nImages in order: rear; front.\n{question}`` (``video_block``; no label line when every
label is empty, which is exactly the reference's ``<image>\n{question}``). A multi-image prompt therefore
feeds C^2 tokens per image (one for the released model) whatever ``token_budget`` says. The prefix state
is one pre-fusion cache per frame; a later question runs through pre-fusion on a fork of each and its
fused states are averaged the same way. Deviation: a token pre-fusion does not read (token id 0) keeps
its plain embedding, where the reference averages T copies of it (equal up to float rounding).

Prompt: the checkpoint tokenizer's chat template (Llama-3.1's for the released model) with
LLaVA-Mini's system prompt and the user turn ``<image>\\n{question}``, as the reference's
``llava_llama_3_1`` conversation, and with the assistant header after it (the reference's training
format; its inference scripts leave the header for the model to write), and with one BOS (the
reference's ``tokenizer_image_token`` yields two, which its training code removes). ``<image>`` is added to the
tokenizer as a special token that is never embedded: like the reference's ``IMAGE_TOKEN_INDEX`` it only
marks where the image goes. Stop tokens: the checkpoint's EOS plus ``<|eot_id|>``, ``<|eom_id|>`` and
``<|end_of_text|>`` (128009, 128008, 128001 in Llama-3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from zip_vlm_ros.errors import ModelLoadError
from zip_vlm_ros.models.base import EncodedPixels, Encoder, FamilyAdapter, ImageSize, PromptEmbeddings, VisualTokens
from zip_vlm_ros.models.llava_mini_checkpoint import (MODEL_TYPE, LlavaMiniConfig, LlavaMiniParts, load_llava_mini,
                                                      read_llava_mini_config)
from zip_vlm_ros.models.llava_mini_modules import COMPRESSOR_HEADS
from zip_vlm_ros.models.kv_cache import cache_nbytes, fork_cache
from zip_vlm_ros.models.clip_features import encode_for_visionzip
from zip_vlm_ros.models.provenance import CropBox, TokenProvenance, provenance_of_query_grid

__all__ = ["IMAGE_PLACEHOLDER", "LlavaMiniAdapter", "LlavaMiniProcessor", "STOP_TOKENS", "SYSTEM_PROMPT",
           "average_over_frames", "pad_to_square", "stretch_frame", "video_block"]

IMAGE_PLACEHOLDER = "<image>"
# The system message of LLaVA-Mini's llava_llama_3_1 conversation.
SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
STOP_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


class LlavaMiniProcessor:
    """What the engine uses of a transformers LLaVA processor (``tokenizer``, ``image_processor``,
    ``image_token``, ``chat_template``, ``apply_chat_template``) for LLaVA-Mini's prompt format."""

    image_token = IMAGE_PLACEHOLDER

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False):
        """LLaVA-style `conversation` (content items ``{"type": "image"}`` / ``{"type": "text"}``) rendered
        with the system prompt, each turn's images as ``<image>`` before a newline and its text."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for message in conversation:
            content = message["content"]
            if not isinstance(content, str):
                images = sum(item["type"] == "image" for item in content)
                text = " ".join(item["text"] for item in content if item["type"] == "text")
                content = f"{IMAGE_PLACEHOLDER * images}\n{text}" if images else text
            messages.append({"role": message["role"], "content": content})
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if tokenize else text


def pad_to_square(image: np.ndarray, fill: Sequence[int]) -> np.ndarray:
    """``HxWx3 uint8`` -> ``SxSx3`` with S = max(H, W): the image centred on `fill` (the reference's
    ``expand2square`` for ``image_aspect_ratio: pad``)."""
    height, width = image.shape[:2]
    side = max(height, width)
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[:] = np.asarray(fill, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = image
    return square


class LlavaMiniAdapter(FamilyAdapter):
    model_type = MODEL_TYPE
    label = "LLaVA-Mini"
    token_budget_applies = False
    traces_visual_tokens = True

    def __init__(self, name: str, config: LlavaMiniConfig, parts: LlavaMiniParts, clock: Callable[[], float]):
        # Not FamilyAdapter.__init__: LLaVA-Mini's config is a Llama config plus its own fields.
        self.name, self.mini_config, self.hf_config, self.clock = name, config, config.llm, clock
        self.model, self.vision_tower, self.projector = parts.llm, parts.vision_tower, parts.projector
        self.compressor, self.prefusion = parts.compressor, parts.prefusion
        self.contextual_ratio = 0.0  # no VisionZip
        self.feature_layer = config.feature_layer
        vision_config = self.vision_tower.config
        self.patches_per_side = vision_config.image_size // vision_config.patch_size
        self.tokens_per_crop = 1 + self.patches_per_side ** 2
        self.tokens_per_image = config.tokens_per_image
        self.vision_source = parts.vision_source
        self.processor = LlavaMiniProcessor(_with_image_placeholder(name, parts.tokenizer), parts.image_processor)
        self.image_processor = parts.image_processor
        self._image_token_id = self.processor.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        self.model.generation_config.eos_token_id = sorted(_stop_token_ids(self.model, self.processor.tokenizer))

    # ------------------------------------------------------------------ loading

    def torch_modules(self) -> list[torch.nn.Module]:
        return [self.model, self.vision_tower, self.projector, self.compressor, self.prefusion]

    @classmethod
    def read_config(cls, name: str) -> LlavaMiniConfig:
        return read_llava_mini_config(name)

    @classmethod
    def check_config(cls, name: str, hf_config: LlavaMiniConfig) -> None:
        if hf_config.vision_hidden % (4 * COMPRESSOR_HEADS) or hf_config.compressor_size < 1:
            raise ModelLoadError(f"{name}: the compressor needs mm_hidden_size divisible by {4 * COMPRESSOR_HEADS} "
                                 f"and compressor_size >= 1; got {hf_config.vision_hidden}, "
                                 f"{hf_config.compressor_size}")

    @classmethod
    def load(cls, name: str, hf_config: LlavaMiniConfig, dtype: torch.dtype, device: torch.device,
             contextual_ratio: float, clock: Callable[[], float], vision_tower: str = "") -> "LlavaMiniAdapter":
        return cls(name, hf_config, load_llava_mini(name, hf_config, dtype, device, vision_tower), clock)

    # ------------------------------------------------------------------ token counts

    @property
    def image_token_id(self) -> int:
        return self._image_token_id

    @property
    def context_tokens(self) -> int:
        return self.hf_config.max_position_embeddings

    @property
    def visual_tokens_full(self) -> int:
        return self.tokens_per_image

    def full_token_count(self, image_size: ImageSize) -> int:
        return self.tokens_per_image

    def visual_token_count(self, image_size: ImageSize, budget: int, reducer: str = "visionzip") -> int:
        return self.tokens_per_image

    def reduction_settings(self, image_size: ImageSize, budget: int, reducer: str = "visionzip") -> tuple:
        return ("llava-mini", self.mini_config.compressor_size)

    def reduction_name(self, image_size: ImageSize, budget: int, reducer: str = "visionzip") -> str:
        return "llava-mini"

    # ------------------------------------------------------------------ images

    def preprocess(self, images: list[np.ndarray]) -> dict:
        if self.mini_config.pad_to_square:
            fill = [int(mean * 255) for mean in self.image_processor.image_mean]
            images = [pad_to_square(image, fill) for image in images]
        pixel_values = self.image_processor(images=images, return_tensors="pt",
                                            input_data_format="channels_last")["pixel_values"]
        return {"pixel_values": pixel_values.to(self.model.device, self.model.dtype)}  # [images, 3, H, W]

    def encode_pixels(self, pixels: dict, image_sizes: list[ImageSize], budget: int, reducer: str = "visionzip", *,
                      encoder: Encoder = encode_for_visionzip) -> EncodedPixels:
        """The compressed tokens ``[images * C^2, text_hidden]`` (`budget`, `reducer` and `encoder` do not apply)."""
        compressed, _, reduction_ms = self.encode_images(pixels["pixel_values"])
        return EncodedPixels(compressed.flatten(0, 1), [self.tokens_per_image] * len(image_sizes),
                             ["llava-mini"] * len(image_sizes), reduction_ms, self._provenance(image_sizes))

    def encode(self, images: list[np.ndarray], budget: int, reducer: str = "visionzip") -> VisualTokens:
        """Compressed tokens as ``features`` and every image's projected patches as ``patch_features``."""
        return self._visual_tokens(self.preprocess(images)["pixel_values"], self.clock(),
                                   self._provenance([image.shape[:2] for image in images]))

    def _provenance(self, image_sizes: list[ImageSize]) -> list[TokenProvenance]:
        """Each image's C^2 tokens over the part of the frame the tower saw: the whole frame padded to a
        square (``pad_to_square``, the released model's setting), else the CLIP processor's centred square.
        Pre-fusion also carries every patch into the prompt's text tokens; those are not visual tokens."""
        crops = []
        for height, width in image_sizes:
            side = max(height, width)
            crops.append(CropBox(-float((side - height) // 2), -float((side - width) // 2), float(side), float(side),
                                 self.patches_per_side) if self.mini_config.pad_to_square
                         else self.frame_crop((height, width)))
        return [provenance_of_query_grid(crop, self.mini_config.compressor_size) for crop in crops]

    def encode_base(self, image: np.ndarray, budget: int, reducer: str = "visionzip") -> VisualTokens:
        """One frame of a multi-image request, as the reference's video mode reads a frame: stretched to
        the tower's square input (nearest neighbour, no padding), then ``encode``'s steps (C^2 tokens)."""
        start = self.clock()
        crop = self.image_processor.crop_size
        frame = stretch_frame(image, crop["height"], crop["width"])
        pixel_values = self.image_processor(images=[frame], return_tensors="pt",
                                            input_data_format="channels_last")["pixel_values"]
        whole_frame = CropBox(0.0, 0.0, float(image.shape[0]), float(image.shape[1]), self.patches_per_side)
        return self._visual_tokens(pixel_values.to(self.model.device, self.model.dtype), start,
                                   [provenance_of_query_grid(whole_frame, self.mini_config.compressor_size)])

    @property
    def base_tokens_full(self) -> int:
        return self.tokens_per_image

    def multi_image_settings(self, count: int, reducer: str = "visionzip") -> tuple:
        return ("video-frame", count, self.feature_layer, self.mini_config.compressor_size)

    def multi_image_text(self, labels: Sequence[str], counts: Sequence[int], image_token: str) -> str:
        return video_block(labels, counts, image_token)

    def _visual_tokens(self, pixel_values: torch.Tensor, start: float,
                       provenance: list[TokenProvenance]) -> VisualTokens:
        """``VisualTokens`` of pixel_values ``[images, 3, H, W]``; vision time counted from `start`."""
        compressed, patches, reduction_ms = self.encode_images(pixel_values)
        vision_ms = (self.clock() - start) * 1000.0 - reduction_ms
        images = len(patches)
        return VisualTokens(compressed.flatten(0, 1), [self.tokens_per_image] * images,
                            ["llava-mini"] * images, vision_ms, reduction_ms, patch_features=list(patches),
                            provenance=provenance)

    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """pixel_values ``[images, 3, H, W]`` -> ``(projected compressed tokens [images, C^2, text_hidden],
        projected patch features [images, patches, text_hidden], compressor ms)``."""
        hidden_states = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        patches = hidden_states[self.feature_layer][:, 1:]  # [images, patches, vision_hidden]: CLS dropped
        start = self.clock()
        compressed = self.compressor(patches)  # [images, C^2, vision_hidden]
        reduction_ms = (self.clock() - start) * 1000.0
        return self.projector(compressed), self.projector(patches), reduction_ms

    # ------------------------------------------------------------------ the LLM's input embeddings

    def embed_prompt(self, prompt_ids: Sequence[int], prefix_length: int, visual: VisualTokens) -> PromptEmbeddings:
        """Pre-fusion over each image (video frame) and the whole prompt; the prefix state is, per frame,
        the pre-fusion cache's views up to the prompt's first `prefix_length` tokens."""
        if not visual.patch_features:
            raise ValueError("LLaVA-Mini prompts take the encode() or encode_base() output of their images")
        ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=self.model.device)
        kv_caches = [self.prefusion.new_cache() for _ in visual.patch_features]
        inputs_embeds, visual_positions, read = self._fuse_prompt(ids, self._frames(visual), kv_caches)
        prefix_positions = visual_positions + int(read[:prefix_length].sum())
        return PromptEmbeddings(inputs_embeds[None], tuple(fork_cache(cache, prefix_positions) for cache in kv_caches),
                                sum(cache_nbytes(cache) for cache in kv_caches))

    def embed_suffix(self, suffix_ids: Sequence[int], prefix_state) -> torch.Tensor:
        """The question's tokens through pre-fusion on a fork of each frame's pre-fusion cache, averaged
        over the frames (one frame: its fused states unchanged)."""
        ids = torch.tensor(list(suffix_ids), dtype=torch.long, device=self.model.device)
        placeholders, read = self._token_roles(ids)
        if placeholders.any():
            raise ValueError("a suffix on a cached LLaVA-Mini prefix must not hold image placeholders")
        embeddings = self.model.get_input_embeddings()(ids)  # [length, text_hidden]
        if read.any():
            text = embeddings[read][None]
            embeddings[read] = average_over_frames([self.prefusion(text, fork_cache(cache))[0]
                                                    for cache in prefix_state])
        return embeddings[None]

    def embed_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: VisualTokens) -> torch.Tensor:
        """Each row fused on its own (its real tokens only), then left-padded with plain embeddings."""
        placeholders, _ = self._token_roles(input_ids)
        inputs_embeds = self.model.get_input_embeddings()(input_ids.masked_fill(placeholders, 0))
        for row, frame in enumerate(self._frames(visual)):
            real = attention_mask[row].bool()
            fused, _, _ = self._fuse_prompt(input_ids[row][real], [frame], [self.prefusion.new_cache()])
            inputs_embeds[row, real] = fused
        return inputs_embeds

    def _frames(self, visual: VisualTokens) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: ``(projected patches [patches, text_hidden], compressed tokens [C^2, text_hidden])``."""
        compressed = visual.features.view(len(visual.patch_features), self.tokens_per_image, -1)
        return list(zip(visual.patch_features, compressed))

    def _token_roles(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image placeholders, tokens pre-fusion reads)`` boolean masks shaped like `ids`: the reference
        masks the image and token id 0 out of pre-fusion."""
        placeholders = ids == self.image_token_id
        return placeholders, ~placeholders & (ids != 0)

    def _fuse_prompt(self, ids: torch.Tensor, frames: list[tuple[torch.Tensor, torch.Tensor]], kv_caches: list):
        """One prompt's LLM inputs after pre-fusion, for one image or the frames of a video-mode prompt.

        ids ``[length]`` with ``len(frames) * C^2`` image placeholders; `frames` from ``_frames``; one empty
        pre-fusion cache per frame in `kv_caches`, which receive that frame's keys/values. Each frame runs
        pre-fusion over ``[its patches, its C^2 tokens, the prompt's read tokens]``; the placeholders get
        every frame's fused C^2 tokens in frame order, the read tokens their fused states averaged over the
        frames. Returns ``(inputs_embeds [length, text_hidden], visual positions of a frame in its
        pre-fusion sequence (patches + C^2), tokens pre-fusion read [length] bool)``.
        """
        placeholders, read = self._token_roles(ids)
        expected = len(frames) * self.tokens_per_image
        if int(placeholders.sum()) != expected:
            raise ValueError(f"a LLaVA-Mini prompt about {len(frames)} image(s) needs {expected} image placeholders; "
                             f"got {int(placeholders.sum())}")
        embeddings = self.model.get_input_embeddings()(ids.masked_fill(placeholders, 0))  # [length, text_hidden]
        text = embeddings[read]
        fused_text, frame_tokens = [], []
        for (patch_tokens, compressed_tokens), kv_cache in zip(frames, kv_caches):
            visual_inputs = torch.cat([patch_tokens, compressed_tokens]).to(embeddings.dtype)  # [patches + C^2, hidden]
            fused = self.prefusion(torch.cat([visual_inputs, text])[None], kv_cache)[0]
            visual_positions = visual_inputs.shape[0]
            fused_text.append(fused[visual_positions:])
            frame_tokens.append(fused[visual_positions - self.tokens_per_image:visual_positions])
        embeddings[read] = average_over_frames(fused_text)
        embeddings[placeholders] = torch.cat(frame_tokens)
        return embeddings, visual_positions, read


def average_over_frames(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """``frames x [n, hidden]`` -> ``[n, hidden]``: summed in float32 in frame order, divided by the frame
    count, back in the inputs' dtype (the reference's order of operations; one frame: unchanged)."""
    total = states[0].float()
    for state in states[1:]:
        total = total + state.float()
    return (total / len(states)).to(states[0].dtype)


def stretch_frame(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``HxWx3 uint8`` -> ``height x width x 3 uint8`` by torch's nearest-neighbour interpolation, as the
    reference's video loader resizes every frame (to 336 x 336) before the image processor."""
    if image.shape[:2] == (height, width):
        return image
    frame = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    resized = torch.nn.functional.interpolate(frame, size=(height, width))
    return resized[0].permute(1, 2, 0).to(torch.uint8).numpy()


def video_block(labels: Sequence[str], counts: Sequence[int], image_token: str) -> str:
    """The text that replaces the template's image placeholder in a video-mode prompt: every image's
    placeholders in one run (where the reference puts a video's frame tokens), then, if any image has a
    label, one line naming them in order.

    ``video_block(["rear", "front"], [1, 1], "<image>") == "<image><image>\\nImages in order: rear; front."``
    """
    block = image_token * sum(counts)
    if any(labels):
        block += "\nImages in order: " + "; ".join(label or "(unlabelled)" for label in labels) + "."
    return block


def _with_image_placeholder(name: str, tokenizer):
    """`tokenizer` with ``<image>`` as a special token (id = vocabulary size, never embedded), so the text on
    either side is tokenized apart, as the reference's ``tokenizer_image_token`` does."""
    from tokenizers import AddedToken

    if IMAGE_PLACEHOLDER in tokenizer.get_vocab():
        raise ModelLoadError(f"{name}: the tokenizer already has a {IMAGE_PLACEHOLDER!r} token; LLaVA-Mini's "
                             f"Llama-3 tokenizer has none")
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{name}: the tokenizer has no chat template; LLaVA-Mini prompts use the checkpoint's "
                             f"Llama-3 template (tokenizer_config.json or chat_template.jinja)")
    tokenizer.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def _stop_token_ids(model, tokenizer) -> set[int]:
    """The checkpoint's EOS ids plus the Llama-3 end-of-turn tokens the tokenizer has."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, (list, tuple)) else [] if configured is None else [configured])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in STOP_TOKENS if token in vocab)
    if not ids:
        raise ModelLoadError("the LLaVA-Mini checkpoint defines no EOS and its tokenizer has no <|eot_id|>")
    return ids
