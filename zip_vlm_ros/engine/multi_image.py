"""One question over several images: the latest frame of each surround camera, or a camera's recent frames.

No ROS here. ``VlmEngine.generate_images`` hands its requests to ``MultiImageAnswerer``, which shares the
engine's tokenizer, prefill, decode, sampling and prefix cache; only what differs with several images
lives here:

- **The budget** is the request's total. ``split_total_budget`` gives every image ``total // n`` visual
  tokens and the first ``total % n`` images (in prompt order) one more: 64 over 6 images is
  ``[11, 11, 11, 11, 10, 10]``. An image whose share is at least its full count reads its stock tokens, so
  the LLM reads ``sum(min(share, full))`` visual tokens: the budget, or every image's full count when the
  budget is larger.
- **The prompt** introduces each image by its label (a camera name, or e.g. ``"front 3.0 s ago"``) in
  place of the chat template's one image placeholder: ``"rear: <image>...\\nfront: <image>...\\n"``, then
  the question (the family's ``multi_image_text``; LLaVA-Mini's differs, below).
- **LLaVA-Mini answers in its video mode** (``models.llava_mini``): C^2 tokens per image (one for the
  released model), fixed by training, so the budget does not apply (any total >= 1 is accepted, each
  image reports C^2 as its share and count); all images' tokens sit in one run where the template's
  image goes and the labels follow in one line (``"Images in order: rear; front."``). The family's
  ``multi_image_text`` and ``multi_image_settings`` say so; its per-image cache entries also hold the
  projected patch features its pre-fusion reads.
- **AnyRes (LLaVA-NeXT) reads the base image only** in a multi-image request: the whole frame resized to
  the tower's square input, as LLaVA-1.5 reads it (576 full tokens on LLaVA-NeXT-7B). The grid crops
  would multiply each image's encoder work by up to five and divide its small share of the budget over
  those crops (a 64-token share over a base and a 2x2 grid is 12 tokens per crop), so that the vision
  stage of a six-camera question would cost thirty tower passes to keep a dozen tokens of each crop. The
  base image keeps the whole field of view at the share the budget allows.
- **Visual tokens are cached per image**, keyed by (image key, the image's visual-token count, the
  reduction settings), in an LRU bounded by entries and bytes: a history question re-encodes only the
  frames it has not seen. Each image is encoded alone (batch of one), so a cached image's tokens equal
  the ones a from-scratch request computes, bit for bit.
- **The LLM prefix** (the prompt up to the last image's tokens) is cached as for one image, keyed by
  every image's key and share and the prefix's token ids: more questions about the same set of images
  cost only their own tokens. Exactness is the engine's: in float32 a reused prefix gives the answer a
  from-scratch request gives, token for token.

A request whose prompt, visual tokens and ``max_new_tokens`` exceed the model's context is refused with
the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from zip_vlm_ros.engine.outputs import ImageTokens, OnToken, ShouldStop, VlmOutput
from zip_vlm_ros.engine.prefix_cache import Prefix, PrefixCache
from zip_vlm_ros.engine.requests import ImageInput, check_context, check_image, check_prompts
from zip_vlm_ros.engine.sampling import SamplingOptions, check_sampling
from zip_vlm_ros.errors import RequestError
from zip_vlm_ros.models import VisualTokens

__all__ = ["SINGLE_IMAGE_ONLY", "MultiImageAnswerer", "split_total_budget"]

# In the refusal of a family that answers about one image per prompt (``several_images = False``).
SINGLE_IMAGE_ONLY = "answer about one image at a time"


@dataclass
class CachedImage:
    """One image's projected visual tokens, as the per-image cache holds them."""

    features: torch.Tensor              # [visual_tokens, text_hidden]
    reduction: str
    held_bytes: int                     # what PrefixCache's byte bound counts
    patch_features: torch.Tensor | None = None  # LLaVA-Mini: [patches, text_hidden] its pre-fusion reads
    grid: tuple[int, int, int] | None = None    # M-RoPE families: the image's stock token grid (VisualTokens.grids)
    kept: torch.Tensor | None = None            # M-RoPE families: stock indices of the tokens kept (None: all)


@dataclass
class _Request:
    """A checked multi-image request: its images, shares of the budget and tokenized prompts."""

    images: list[ImageInput]
    prompts: list[str]
    shares: list[int]                   # each image's share of the total budget (its count for LLaVA-Mini)
    reducer: str                        # the reducer the images below their full count go through
    counts: list[int]                   # visual tokens each image feeds: min(share, full); C^2 for LLaVA-Mini
    tokenized: list[tuple[tuple[int, ...], tuple[int, ...]]]  # (prefix, suffix) ids per prompt
    max_new_tokens: int
    sampling: SamplingOptions
    prefix_key_base: tuple | None       # None when an image has no key: nothing is cached


@dataclass
class _EncodedImages:
    visual: VisualTokens                # every image's tokens, image 0's first (what embed_prompt places)
    images: list[ImageTokens]
    vision_ms: float
    reduction_ms: float


def split_total_budget(total: int, count: int) -> list[int]:
    """Even shares of `total` visual tokens over `count` images, the first ``total % count`` one larger.

    ``split_total_budget(64, 6) == [11, 11, 11, 11, 10, 10]``; the shares always sum to `total`.
    Raises ValueError when an image would get no token (``total < count``).
    """
    if count < 1 or total < count:
        raise ValueError(f"a total of {total} visual tokens cannot give each of {count} images at least one")
    share, remainder = divmod(total, count)
    return [share + 1 if index < remainder else share for index in range(count)]


class MultiImageAnswerer:
    """Multi-image requests of one engine (see the module docstring); its per-image visual-token cache.

    Thread-compatible like the engine: called from the engine's thread only.
    """

    def __init__(self, engine, max_entries: int, max_bytes: int):
        """`engine`: the ``VlmEngine`` whose family, prompts, generator and clock this uses."""
        self.engine = engine
        # An LRU bounded by entries and bytes: the prefix cache's, holding CachedImage records.
        self.visual_cache = PrefixCache(max_entries, max_bytes)

    # ------------------------------------------------------------------ checks

    def check_images(self, images) -> list[ImageInput]:
        """RequestError unless `images` is a non-empty list of ImageInput with valid pixels and labels."""
        if isinstance(images, (str, np.ndarray)) or not isinstance(images, Sequence) or not images:
            raise RequestError(f"images must be a non-empty list of ImageInput; got {type(images).__name__}")
        for index, item in enumerate(images):
            if not isinstance(item, ImageInput):
                raise RequestError(f"images[{index}] must be an ImageInput(image, label, key); "
                                   f"got {type(item).__name__}")
            check_image(item.image, f"images[{index}].image")
            if not isinstance(item.label, str) or self.engine.image_token in item.label or "\n" in item.label:
                raise RequestError(f"images[{index}].label must be one line of text without "
                                   f"{self.engine.image_token!r}; got {item.label!r}")
            if item.key is not None:
                try:
                    hash(item.key)
                except TypeError:
                    raise RequestError(f"images[{index}].key must be hashable, e.g. ('front', 17); "
                                       f"got {item.key!r}") from None
        return list(images)

    def check_total_budget(self, token_budget: int | None, count: int) -> int:
        """The request's total budget: None means the engine's default budget per image, times `count`."""
        engine = self.engine
        total = engine.config.token_budget * count if token_budget is None else token_budget
        least = count if engine.token_budget_applies else 1  # LLaVA-Mini: accepted and ignored
        if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total < least:
            meaning = (f"one visual token per image; {count * self.base_tokens_full} or more means no reduction"
                       if engine.token_budget_applies else f"ignored: {engine.family.label} reads "
                       f"{self.base_tokens_full} per image")
            raise RequestError(f"token_budget is the request's total over its {count} images: give a whole number "
                               f">= {least} ({meaning}); got {total!r}")
        return int(total)

    @property
    def base_tokens_full(self) -> int:
        return self.engine.family.base_tokens_full

    # ------------------------------------------------------------------ generation

    def _request(self, images, prompts, token_budget, max_new_tokens, sampling, reducer=None) -> _Request:
        """Check a request and tokenize its prompts (RequestError on bad input or a context overflow)."""
        engine = self.engine
        if not engine.family.several_images:
            raise RequestError(f"{engine.family.label} checkpoints {SINGLE_IMAGE_ONLY} here: ask each camera or "
                               f"frame separately")
        images = self.check_images(images)
        prompts = check_prompts(prompts, engine.image_token)
        total = self.check_total_budget(token_budget, len(images))
        reducer = engine.check_reducer(reducer)
        max_new = engine.check_max_new_tokens(max_new_tokens)
        if engine.token_budget_applies:
            shares = split_total_budget(total, len(images))
            # each image's own full count caps its share (Qwen2.5-VL's depends on the image's size)
            counts = [min(share, engine.family.base_token_count(item.image.shape[:2]))
                      for item, share in zip(images, shares)]
        else:  # C^2 tokens per image, fixed by training (LLaVA-Mini)
            shares = counts = [self.base_tokens_full] * len(images)
        block = engine.family.multi_image_text([item.label for item in images], counts, engine.image_token)
        tokenized = [engine.prompts.tokenize(prompt, sum(counts), image_text=block) for prompt in prompts]
        for prefix_ids, suffix_ids in tokenized:
            check_context(len(prefix_ids) + len(suffix_ids), sum(counts), max_new, engine.context_tokens, len(images))
        keyed = all(item.key is not None for item in images)
        prefix_key_base = (engine.model_name, "images", tuple(
            (item.key, count, self._settings(count, reducer)) for item, count in zip(images, counts))) if keyed else None
        return _Request(images, prompts, shares, reducer, counts, tokenized, max_new, check_sampling(sampling),
                        prefix_key_base)

    @torch.inference_mode()
    def generate(self, images: Sequence[ImageInput], prompts: Sequence[str], *, token_budget: int | None = None,
                 max_new_tokens: int | None = None, sampling: SamplingOptions | None = None,
                 should_stop: ShouldStop | None = None, on_token: OnToken | None = None,
                 reducer: str | None = None) -> list[VlmOutput]:
        """Answer each of `prompts` about all of `images` together (``VlmEngine.generate_images``)."""
        engine = self.engine
        engine.check_open()
        request = self._request(images, prompts, token_budget, max_new_tokens, sampling, reducer)
        images, shares, counts, reducer = request.images, request.shares, request.counts, request.reducer
        encoded: list[_EncodedImages] = []

        def encode() -> tuple[VisualTokens, float, float]:
            if encoded:
                return encoded[0].visual, 0.0, 0.0
            encoded.append(self._encode(images, shares, counts, check_stop, reducer))
            return encoded[0].visual, encoded[0].vision_ms, encoded[0].reduction_ms

        prefixes_this_call: dict[tuple[int, ...], Prefix] = {}
        outputs: list[VlmOutput] = []
        check_stop = engine.generator.stop_checker(should_stop, completed=outputs)
        for prompt_index, (prompt, (prefix_ids, suffix_ids)) in enumerate(zip(request.prompts, request.tokenized)):
            check_stop()
            start = engine.clock.now()
            cache_key = None if request.prefix_key_base is None else request.prefix_key_base + (prefix_ids,)
            step = engine.generator.prefill_step(prefix_ids, suffix_ids, cache_key, prefixes_this_call, encode,
                                                 check_stop)
            tokens, first_token_time, end_time = engine.generator.decode(
                step.logits, step.kv_cache, request.max_new_tokens, request.sampling, check_stop,
                on_step=engine.generator.text_stream(on_token, prompt_index, start),
                family_state=step.prefix.family_state)
            image_tokens = encoded[0].images if encoded else self._described(images, shares, counts, reducer)
            outputs.append(self._output(prompt, tokens[0], image_tokens, start=start, vision_ms=step.vision_ms,
                                        reduction_ms=step.reduction_ms, prefill_ms=step.prefill_ms,
                                        first_token_time=first_token_time, end_time=end_time,
                                        prefix_reused=step.reused, kv_cache_bytes=step.prefix.nbytes))
        return outputs

    # ------------------------------------------------------------------ visual tokens

    def _settings(self, count: int, reducer: str) -> tuple:
        """Everything besides the pixels that decides one image's visual tokens at `count` tokens."""
        return self.engine.family.multi_image_settings(count, reducer)

    def _reduction(self, count: int, reducer: str, full: int) -> str:
        """What an image of `full` visual tokens read at `count` reports as its reduction."""
        family = self.engine.family
        if not family.token_budget_applies:
            return family.reduction_name((0, 0), count)
        return reducer if count < full else "none"

    def _encode(self, images: list[ImageInput], shares: list[int], counts: list[int], check_stop,
                reducer: str = "visionzip") -> _EncodedImages:
        """Every image's visual tokens, from the per-image cache or encoded alone (and then cached)."""
        engine = self.engine
        features, patch_features, described, vision_ms, reduction_ms = [], [], [], 0.0, 0.0
        grids, kept = [], []
        for item, share, count in zip(images, shares, counts):
            key = None if item.key is None else (engine.model_name, item.key, self._settings(count, reducer))
            cached = self.visual_cache.get(key) if key is not None else None
            if cached is None:
                check_stop()
                visual = engine.family.encode_base(item.image, count, reducer)
                if visual.counts != [count]:
                    raise RequestError(f"{engine.family.label} encoded {visual.counts} visual tokens for an image "
                                       f"of a multi-image request instead of {count}")
                vision_ms += visual.vision_ms
                reduction_ms += visual.reduction_ms
                patches = visual.patch_features[0] if visual.patch_features else None
                held = sum(tensor.numel() * tensor.element_size() for tensor in (visual.features, patches)
                           if tensor is not None)
                entry = CachedImage(visual.features, visual.reductions[0], held, patches,
                                    visual.grids[0] if visual.grids else None, visual.kept[0] if visual.kept else None)
                if key is not None:
                    self.visual_cache.put(key, entry)
            else:
                entry = cached
            features.append(entry.features)
            patch_features.append(entry.patch_features)
            grids.append(entry.grid)
            kept.append(entry.kept)
            full = engine.family.base_token_count(item.image.shape[:2])
            described.append(ImageTokens(item.label, share, count, full, entry.reduction,
                                         cached=cached is not None))
        visual = VisualTokens(torch.cat(features), [image.visual_tokens for image in described],
                              [image.reduction for image in described], vision_ms, reduction_ms,
                              patch_features=patch_features if all(p is not None for p in patch_features) else None,
                              grids=grids if all(grid is not None for grid in grids) else None, kept=kept)
        return _EncodedImages(visual, described, vision_ms, reduction_ms)

    def _described(self, images: list[ImageInput], shares: list[int], counts: list[int],
                   reducer: str) -> list[ImageTokens]:
        """ImageTokens of images whose prefix came from the cache (nothing was encoded for them)."""
        family = self.engine.family
        return [ImageTokens(item.label, share, count, family.base_token_count(item.image.shape[:2]),
                            self._reduction(count, reducer, family.base_token_count(item.image.shape[:2])),
                            cached=True)
                for item, share, count in zip(images, shares, counts)]

    def _output(self, prompt: str, tokens: list[int], images: list[ImageTokens], *, start: float,
                vision_ms: float, reduction_ms: float, prefill_ms: float, first_token_time: float,
                end_time: float, prefix_reused: bool, kv_cache_bytes: int) -> VlmOutput:
        engine = self.engine
        visual_tokens = sum(image.visual_tokens for image in images)
        reductions = [image.reduction for image in images]
        # the request's reducer if any image went through it ("llava-mini" for LLaVA-Mini), else "none"
        reduction = next((name for name in reductions if name != "none"), "none")
        text = engine.generator.decode_text(tokens)
        return VlmOutput(
            prompt=prompt, text=text, model=engine.model_name, reduction=reduction,
            token_budget=visual_tokens, visual_tokens=visual_tokens,
            visual_tokens_full=sum(image.visual_tokens_full for image in images), generated_tokens=len(tokens),
            vision_ms=vision_ms, reduction_ms=reduction_ms, prefill_ms=prefill_ms,
            ttft_ms=(first_token_time - start) * 1000.0, decode_ms=(end_time - first_token_time) * 1000.0,
            total_ms=engine.clock.ms_since(start), prefix_reused=prefix_reused, kv_cache_bytes=kv_cache_bytes,
            images=list(images))

    def clear(self) -> None:
        self.visual_cache.clear()
