"""The LLaVA engine: prompts, VisionZip-reduced generation and a per-frame prefix cache, for every model family.

No ROS here: the node, replay and bench tools hand it ``HxWx3 uint8 RGB`` numpy images and prompts
and get ``VlmOutput`` records back.

One request runs in four stages, each timed:

1. vision     the checkpoint's image processor and vision tower (+ multimodal projector);
2. reduction  VisionZip (``zip_vlm_ros.visionzip``) keeps ``token_budget`` of the visual tokens when the
              budget is below the image's full count (576 for LLaVA-1.5; for LLaVA-NeXT it depends on
              the aspect ratio, 1948 for 1280x720); otherwise the stock features are used unchanged;
3. prefill    the language model reads the prompt: the *prefix* (the prompt up to and including the
              visual tokens) and the question's own tokens (the *suffix*);
4. decode     greedy or sampled tokens until EOS or ``max_new_tokens``.

VisionZip's selection does not depend on the question, so the prefix - vision, reduction, projection
and its LLM key/value cache - is the same for every question about one frame. A frame's first question
runs prefix and suffix in ONE forward, the least work any prompt can cost; the first ``len(prefix)``
positions of that forward's key/value cache are kept for the frame (``frame_key``) in a small LRU cache
as views, not copies. Later questions on the frame run one forward over their own tokens on a fork of
those views. No tensor of a cached prefix is ever written: transformers' ``DynamicLayer`` grows a cache
by concatenating into new tensors.

Exactness: in float32 an answer computed on a reused prefix equals the from-scratch answer token for
token (the tests check frames, budgets, questions, greedy and seeded sampling). The two computations
differ only in how the prompt is split into forwards, so their logits differ by float rounding (a few
1e-6 in float32); in float16/bfloat16 that rounding is larger and an answer may differ, as it may with
any change of batch shape.

Stages 1-2 and the LLM's input embeddings belong to the checkpoint's model family
(``zip_vlm_ros.models``: LLaVA-1.5, LLaVA-NeXT, LLaVA-Mini): the adapter turns a tokenized prompt and the
image's visual tokens into input embeddings (``embed_prompt``; ``embed_suffix`` for a later question on a
cached prefix, from the state the adapter kept for that prefix), so prefill, decode, sampling and the
cache never learn the family. For LLaVA-1.5 and LLaVA-NeXT that is the token embeddings with the visual
tokens at the image placeholders; LLaVA-Mini first runs its pre-fusion layers over the prompt, and its
prefix state is their key/value cache. ``token_budget`` means the same for every family that applies
it: the visual tokens the LLM reads per image. LLaVA-Mini's count is fixed by training
(``family.token_budget_applies`` is False): budgets are accepted and ignored.

Several images, one question (surround cameras, a camera's recent frames): ``generate_images``, in
``zip_vlm_ros.multi_image``, splits the request's total budget evenly over labelled images, keeps each
image's visual tokens in a per-image cache and the prompt prefix in the same prefix cache (LLaVA-Mini:
its video mode, C^2 tokens per image).

The engine is thread-compatible, not thread-safe: call it from one thread (the node's worker).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from zip_vlm_ros.devices import resolve_device, resolve_dtype
from zip_vlm_ros.errors import EngineError, ModelLoadError, RequestError
from zip_vlm_ros.models import VisualTokens, load_family
from zip_vlm_ros.multi_image import ImageInput, ImageTokens, MultiImageAnswerer
from zip_vlm_ros.prefix_cache import Prefix, PrefixCache, cache_nbytes, fork_cache
from zip_vlm_ros.sampling import SamplingOptions, check_sampling, token_chooser
from zip_vlm_ros.streaming import IncrementalDetokenizer, StreamedText

__all__ = [
    "DEFAULT_DESCRIBE_PROMPT",
    "EngineConfig",
    "EngineError",
    "GenerationStopped",
    "ImageInput",
    "ModelLoadError",
    "RequestError",
    "SamplingOptions",
    "VlmEngine",
    "VlmOutput",
]

# Used when a checkpoint's processor has no chat template.
LLAVA_1_5_PROMPT = "USER: {image}\n{prompt} ASSISTANT:"
# The scene-description prompt: the node's `describe_prompt` default and vlm_replay's, so that offline
# replay reports describe exactly what the node answers.
DEFAULT_DESCRIBE_PROMPT = "Describe the scene in one sentence."


# Asked between stages and before every decode step; a non-empty string stops the generation and
# becomes GenerationStopped.reason (e.g. "timed out", "the node is shutting down").
ShouldStop = Callable[[], "str | None"]
# Called after every generated token with that step's text (see zip_vlm_ros.streaming).
OnToken = Callable[[StreamedText], None]


class GenerationStopped(EngineError):
    """A generation its caller stopped through ``should_stop``; the engine stays usable.

    Attributes: ``reason`` (what should_stop returned), ``tokens`` (ids generated so far for the prompt
    being decoded, one list per batch row; empty when it stopped before decoding), ``texts`` (those
    tokens decoded, on first access: the stop itself does not wait for the tokenizer) and
    ``completed`` (VlmOutputs of the prompts a generate_many call had finished).
    """

    def __init__(self, reason: str, tokens: Sequence[Sequence[int]] = (),
                 completed: Sequence["VlmOutput"] = (), decode: Callable[[list[int]], str] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.tokens = [list(row) for row in tokens]
        self.completed = list(completed)
        self._decode = decode

    @property
    def texts(self) -> list[str]:
        return [self._decode(row) for row in self.tokens] if self._decode else []


@dataclass
class EngineConfig:
    model: str                          # local checkpoint dir or hub id (LLaVA-1.5, LLaVA-NeXT; LLaVA-Mini: dir)
    device: str = "auto"                # auto|cpu|cuda|cuda:N   (auto: CUDA when available)
    dtype: str = "auto"                 # auto|float16|bfloat16|float32 (auto: fp16 on CUDA, fp32 on CPU)
    token_budget: int = 64              # default budget; >= visual_tokens_full means no reduction
    contextual_ratio: float = 10 / 64   # contextual = round(T * ratio), dominant = T - contextual
    max_new_tokens: int = 64
    prefix_cache_entries: int = 8       # 0 disables the per-frame prefix cache
    prefix_cache_bytes: int = 1 << 30
    visual_cache_entries: int = 64      # multi-image requests: per-image visual tokens kept (0 disables)
    visual_cache_bytes: int = 1 << 28
    vision_tower: str = ""              # LLaVA-Mini: local CLIP dir when the checkpoint names a hub id


@dataclass
class VlmOutput:
    """One answer with its token counts and timing breakdown (mirrors msg/VlmResult)."""

    prompt: str
    text: str
    model: str
    reduction: str                      # "visionzip", "none" or "llava-mini"
    token_budget: int                   # effective budget (visual_tokens_full when no reduction)
    visual_tokens: int                  # fed to the LLM (AnyRes: crops x the budget's share per crop)
    visual_tokens_full: int             # this image's count before reduction (576 for LLaVA-1.5)
    generated_tokens: int               # new tokens, counting the EOS token when generation stopped on it
    vision_ms: float                    # image preprocessing, vision encoder and projector
    reduction_ms: float                 # VisionZip selection + merge (0 for "none")
    prefill_ms: float                   # LLM forward over the prompt (prefix + question; question only if reused)
    ttft_ms: float                      # request start to the first generated token
    decode_ms: float                    # the remaining tokens
    total_ms: float
    prefix_reused: bool                 # the frame's prefix (vision + its KV cache) came from the cache
    kv_cache_bytes: int                 # KV cache bytes of the prompt prefix incl. visual tokens
    images: list[ImageTokens] = field(default_factory=list)  # multi-image requests: each image, prompt order


@dataclass
class PrefillStep:
    """A prompt after prefill (``VlmEngine._prefill_step``): what decoding and the output need."""

    logits: torch.Tensor                # [1, vocab] float32, the prompt's last position
    kv_cache: object                    # the prompt's key/value cache, to decode on
    prefix: Prefix                      # the image prefix it continued from or created
    reused: bool                        # the prefix came from this call or the prefix cache
    prefill_ms: float
    vision_ms: float                    # 0 unless this prompt encoded the image(s)
    reduction_ms: float


class VlmEngine:
    """LLaVA + VisionZip inference. See the module docstring for the stages and the prefix cache.

    Attributes: ``config``, ``model_name``, ``device``, ``dtype``, ``family`` (the model-family
    adapter), ``visual_tokens_full`` (the most visual tokens the stock model feeds for one image: 576
    for LLaVA-1.5, 2928 for LLaVA-NeXT-7B; the largest useful budget), ``context_tokens`` (the language
    model's context length: prompt plus answer), ``model`` and ``processor`` (the loaded transformers
    objects).
    """

    def __init__(self, config: EngineConfig):
        """Load the checkpoint and its processor. Raises ModelLoadError (one line) on any problem."""
        _check_engine_config(config)
        self.config = config
        self.model_name = config.model.rstrip("/") or config.model
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.family = load_family(config.model, self.dtype, self.device, config.contextual_ratio, self._clock,
                                  config.vision_tower)
        self.model, self.processor = self.family.model, self.family.processor
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor
        self.visual_tokens_full = self.family.visual_tokens_full
        self.token_budget_applies = self.family.token_budget_applies
        self.context_tokens = self.family.context_tokens
        self.image_token_id = self.family.image_token_id
        self.image_token = getattr(self.processor, "image_token", None) or "<image>"
        if self.tokenizer.convert_tokens_to_ids(self.image_token) != self.image_token_id:
            raise ModelLoadError(
                f"{self.model_name}: the tokenizer's {self.image_token!r} token is not the model's image token id "
                f"{self.image_token_id}; the processor and model files come from different checkpoints")
        self.eos_token_ids = _eos_token_ids(self.model, self.tokenizer)
        self.pad_token_id = _first_not_none(self.tokenizer.pad_token_id, self.model.generation_config.pad_token_id,
                                            min(self.eos_token_ids))
        self._check_prompt_template()
        self._prefix_cache = PrefixCache(config.prefix_cache_entries, config.prefix_cache_bytes)
        self._multi_image = MultiImageAnswerer(self, config.visual_cache_entries, config.visual_cache_bytes)
        self._closed = False

    # ------------------------------------------------------------------ validation

    def check_budget(self, token_budget: int | None) -> int:
        """The effective visual-token budget for a request.

        None means ``config.token_budget``. Budgets at or above ``visual_tokens_full`` mean no
        reduction and return ``visual_tokens_full``. Raises RequestError for a budget below 1.
        """
        budget = self.config.token_budget if token_budget is None else token_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
            raise RequestError(f"token_budget must be a whole number of visual tokens (>= 1; >= "
                               f"{self.visual_tokens_full} means no reduction); got {budget!r}")
        budget = int(budget)
        if budget < 1:
            raise RequestError(f"token_budget must be >= 1 (>= {self.visual_tokens_full} means no reduction); "
                               f"got {budget}")
        return min(budget, self.visual_tokens_full)

    def _check_max_new_tokens(self, max_new_tokens: int | None) -> int:
        value = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise RequestError(f"max_new_tokens must be a whole number >= 1 (e.g. 64); got {value!r}")
        return int(value)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(f"the engine for {self.model_name} was closed; create a new VlmEngine")

    def _check_prompt(self, prompt) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(f"prompt must be a non-empty question such as 'Describe the scene.'; got {prompt!r}")
        if self.image_token in prompt:
            raise RequestError(f"prompt must not contain the image placeholder {self.image_token!r}: the engine "
                               f"places the image itself; remove it from {prompt!r}")
        return prompt

    def _check_prompt_template(self) -> None:
        """Fail at load time if the chat template cannot hold one image followed by the question."""
        probe = "Describe the scene."
        text = self._render_prompt(probe)
        if text.count(self.image_token) != 1 or probe not in text.split(self.image_token, 1)[1]:
            raise ModelLoadError(
                f"{self.model_name}: its chat template renders {text!r}, which does not place one "
                f"{self.image_token!r} before the question; use a LLaVA-1.5 style template")

    # ------------------------------------------------------------------ public inference API

    def generate(self, image: np.ndarray, prompt: str, *, token_budget: int | None = None,
                 max_new_tokens: int | None = None, frame_key: Hashable | None = None,
                 sampling: SamplingOptions | None = None, should_stop: ShouldStop | None = None,
                 on_token: OnToken | None = None) -> VlmOutput:
        """Answer `prompt` about `image` (``HxWx3 uint8 RGB``).

        `frame_key` names the image's pixels (same key => same pixels) so that later prompts on the
        frame reuse its prefix; None disables reuse. `should_stop` is asked between stages and before
        each decode step; a reason it returns raises GenerationStopped. `on_token(StreamedText)` is
        called after every generated token, in this thread, with the text that token completes (the
        deltas concatenate to the output's text). Raises RequestError for bad arguments.
        """
        return self.generate_many(image, [prompt], token_budget=token_budget, max_new_tokens=max_new_tokens,
                                  frame_key=frame_key, sampling=sampling, should_stop=should_stop,
                                  on_token=on_token)[0]

    @torch.inference_mode()
    def generate_many(self, image: np.ndarray, prompts: Sequence[str], *, token_budget: int | None = None,
                      max_new_tokens: int | None = None, frame_key: Hashable | None = None,
                      sampling: SamplingOptions | None = None,
                      should_stop: ShouldStop | None = None, on_token: OnToken | None = None) -> list[VlmOutput]:
        """Answer several prompts about one image, in order, computing the image prefix once.

        The first prompt pays for vision, reduction and one forward over the prefix and its own tokens
        (unless `frame_key` finds the prefix cached); the others run one forward over their own tokens,
        report ``prefix_reused=True`` and only their own work in the timings.
        With a seed, each prompt samples from a generator seeded afresh, as separate calls would.
        `should_stop` and `on_token` as in ``generate``; GenerationStopped.completed holds the prompts
        answered before; StreamedText.prompt_index says which prompt a step belongs to.
        """
        self._check_open()
        _check_image(image)
        prompts = self._check_prompts(prompts)
        budget = self.check_budget(token_budget)
        max_new = self._check_max_new_tokens(max_new_tokens)
        sampling = check_sampling(sampling)
        cache_key_base = None
        if frame_key is not None:
            try:
                hash(frame_key)
            except TypeError:
                raise RequestError(f"frame_key must be hashable, e.g. ('front', 17); got {frame_key!r}") from None
            cache_key_base = (self.model_name, frame_key, budget,
                              self.family.reduction_settings(image.shape[:2], budget))

        visual_tokens = self.family.visual_token_count(image.shape[:2], budget)
        encoded: list[VisualTokens] = []

        def encode() -> tuple[VisualTokens, float, float]:
            if encoded:
                return encoded[0], 0.0, 0.0
            encoded.append(self.family.encode([image], budget))
            return encoded[0], encoded[0].vision_ms, encoded[0].reduction_ms

        prefixes_this_call: dict[tuple[int, ...], Prefix] = {}
        outputs = []
        check_stop = self._stop_checker(should_stop, completed=outputs)
        for prompt_index, prompt in enumerate(prompts):
            check_stop()
            start = self._clock()
            prefix_ids, suffix_ids = self._tokenize_prompt(prompt, visual_tokens)
            cache_key = None if cache_key_base is None else cache_key_base + (prefix_ids,)
            step = self._prefill_step(prefix_ids, suffix_ids, cache_key, prefixes_this_call, encode, check_stop)
            stream = self._text_stream(on_token, prompt_index, start)
            tokens, first_token_time, end_time = self._decode(step.logits, step.kv_cache, max_new, sampling,
                                                              check_stop, on_step=stream)
            outputs.append(self._output(
                prompt, tokens[0], budget, image.shape[:2], visual_tokens, vision_ms=step.vision_ms,
                reduction_ms=step.reduction_ms, prefill_ms=step.prefill_ms, start=start,
                first_token_time=first_token_time, end_time=end_time, prefix_reused=step.reused,
                kv_cache_bytes=step.prefix.nbytes))
        return outputs

    def generate_images(self, images: Sequence[ImageInput], prompts: Sequence[str], *,
                        token_budget: int | None = None, max_new_tokens: int | None = None,
                        sampling: SamplingOptions | None = None, should_stop: ShouldStop | None = None,
                        on_token: OnToken | None = None) -> list[VlmOutput]:
        """Answer each of `prompts` about all of `images` (surround cameras, a camera's recent frames) at once.

        `token_budget` is the request's total, split evenly over the images (None: ``config.token_budget``
        per image); each image is introduced in the prompt by its ``label``; AnyRes checkpoints read each
        image's base image only. Images with a ``key`` keep their visual tokens in a per-image cache and
        the prompt prefix in the prefix cache. See ``zip_vlm_ros.multi_image``. Outputs list each image's
        share and tokens in ``VlmOutput.images``. `should_stop`, `on_token` as in ``generate_many``.
        """
        return self._multi_image.generate(images, prompts, token_budget=token_budget, max_new_tokens=max_new_tokens,
                                          sampling=sampling, should_stop=should_stop, on_token=on_token)

    @torch.inference_mode()
    def generate_batch(self, images: Sequence[np.ndarray], prompts: Sequence[str], *,
                       token_budget: int | None = None, max_new_tokens: int | None = None,
                       sampling: SamplingOptions | None = None,
                       should_stop: ShouldStop | None = None) -> list[VlmOutput]:
        """Answer ``prompts[i]`` about ``images[i]`` for several cameras in one batched forward.

        As a frame's first question in ``generate_many``, each row's prefix and question are read in
        that one forward. Prompts are left-padded with an attention mask; each row stops at its own EOS. Vision,
        reduction, prefill and decode times are the batch's (the same in every output); token counts
        are per row and ``kv_cache_bytes`` is the row's share of the batch's prompt cache. The
        prefix cache is not used. `should_stop` as in ``generate``.
        """
        self._check_open()
        if not isinstance(images, Sequence) or isinstance(images, np.ndarray):
            raise RequestError(f"images must be a list of HxWx3 uint8 arrays; got {type(images).__name__}")
        prompts = self._check_prompts(prompts)
        if len(images) != len(prompts):
            raise RequestError(f"generate_batch needs one prompt per image; got {len(images)} images and "
                               f"{len(prompts)} prompts")
        for index, image in enumerate(images):
            _check_image(image, f"images[{index}]")
        budget = self.check_budget(token_budget)
        max_new = self._check_max_new_tokens(max_new_tokens)
        sampling = check_sampling(sampling)

        check_stop = self._stop_checker(should_stop)
        check_stop()
        start = self._clock()
        counts = [self.family.visual_token_count(image.shape[:2], budget) for image in images]
        rows = [prefix + suffix for prefix, suffix in (self._tokenize_prompt(prompt, count)
                                                       for prompt, count in zip(prompts, counts))]
        visual = self.family.encode(list(images), budget)
        check_stop()
        prefill_start = self._clock()
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, length - len(row):] = torch.tensor(row)
            attention_mask[index, length - len(row):] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        # As stock generate: positions count real tokens only, padding sits at position 0.
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        inputs_embeds = self.family.embed_batch(input_ids, attention_mask, visual)
        output = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, logits_to_keep=1)
        kv_cache = output.past_key_values
        kv_bytes_per_row = cache_nbytes(kv_cache) // len(rows)
        logits = output.logits[:, -1].float()
        prefill_ms = self._ms_since(prefill_start)
        tokens, first_token_time, end_time = self._decode(logits, kv_cache, max_new, sampling, check_stop,
                                                          attention_mask=attention_mask, position_ids=position_ids)
        return [
            self._output(prompt, row_tokens, budget, image.shape[:2], count, vision_ms=visual.vision_ms,
                         reduction_ms=visual.reduction_ms, prefill_ms=prefill_ms, start=start,
                         first_token_time=first_token_time, end_time=end_time, prefix_reused=False,
                         kv_cache_bytes=kv_bytes_per_row)
            for prompt, row_tokens, image, count in zip(prompts, tokens, images, counts)
        ]

    @property
    def prefix_cache_bytes(self) -> int:
        """Memory the cached frame prefixes hold now (what ``EngineConfig.prefix_cache_bytes`` bounds).

        A prefix is a view of its frame's first prompt cache, so this counts that whole prompt.
        """
        return self._prefix_cache.nbytes

    def clear_prefix_cache(self) -> None:
        """Drop every cached frame prefix and per-image visual tokens (and the device memory they hold)."""
        self._prefix_cache.clear()
        self._multi_image.clear()

    @property
    def visual_cache_bytes(self) -> int:
        """Memory the per-image visual tokens of multi-image requests hold now."""
        return self._multi_image.visual_cache.nbytes

    def close(self) -> None:
        """Free the model, the prefix cache and their CUDA memory. The engine cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        self._prefix_cache.clear()
        self._multi_image.clear()
        del self._multi_image, self.model, self.processor, self.tokenizer, self.image_processor, self.family
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ prompts

    def _check_prompts(self, prompts) -> list[str]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise RequestError(f"prompts must be a non-empty list of questions; got {prompts!r}")
        return [self._check_prompt(prompt) for prompt in prompts]

    def _render_prompt(self, prompt: str) -> str:
        """The model's prompt text for one image + `prompt`, with a single image placeholder."""
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return LLAVA_1_5_PROMPT.format(image=self.image_token, prompt=prompt)

    def _tokenize_prompt(self, prompt: str, visual_tokens: int,
                         image_text: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token ids of the prompt, split after the last visual token: ``(prefix, suffix)``.

        `image_text` replaces the template's image placeholder (several labelled images hold
        `visual_tokens` placeholders in all); None: `visual_tokens` placeholders.

        The text is tokenized in one piece with the placeholder repeated `visual_tokens` times, as the
        LLaVA processor does, so the ids equal the stock processor's; the image token is special, so
        the prefix ids do not depend on the question that follows.
        """
        image_text = self.image_token * visual_tokens if image_text is None else image_text
        text = self._render_prompt(prompt).replace(self.image_token, image_text)
        # A template that writes <s> itself must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        add_special_tokens = not (bos and text.startswith(bos))
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        image_positions = [index for index, token in enumerate(ids) if token == self.image_token_id]
        if len(image_positions) != visual_tokens:
            raise RequestError(f"the prompt produced {len(image_positions)} image tokens instead of {visual_tokens}; "
                               f"remove special tokens from {prompt!r}")
        split = image_positions[-1] + 1
        return tuple(ids[:split]), tuple(ids[split:])

    # ------------------------------------------------------------------ language model

    def _prefill_step(self, prefix_ids: tuple[int, ...], suffix_ids: tuple[int, ...], cache_key: Hashable | None,
                      prefixes_this_call: dict[tuple[int, ...], Prefix],
                      encode: Callable[[], tuple[VisualTokens, float, float]], check_stop) -> PrefillStep:
        """One prompt's prefill, by the rule of the module docstring: on its image prefix when this call or
        the prefix cache holds it (one forward over the question's tokens), else one forward over the
        whole prompt, whose first ``len(prefix_ids)`` positions are then kept as the prefix.

        `encode()` gives ``(visual tokens, vision ms, reduction ms)`` (zeros once this call has encoded).
        """
        prefix = prefixes_this_call.get(prefix_ids)
        if prefix is None and cache_key is not None:
            prefix = self._prefix_cache.get(cache_key)
        if prefix is not None:
            check_stop()
            start = self._clock()
            logits, kv_cache = self._prefill_suffix(suffix_ids, prefix)
            return PrefillStep(logits, kv_cache, prefix, True, self._ms_since(start), 0.0, 0.0)
        visual, vision_ms, reduction_ms = encode()
        check_stop()
        start = self._clock()
        logits, kv_cache, embedded = self._prefill_prompt(prefix_ids, suffix_ids, visual)
        prefill_ms = self._ms_since(start)
        prefix = Prefix(fork_cache(kv_cache, len(prefix_ids)), len(prefix_ids),
                        cache_nbytes(kv_cache, positions=len(prefix_ids)),
                        cache_nbytes(kv_cache) + embedded.prefix_state_bytes, embedded.prefix_state)
        prefixes_this_call[prefix_ids] = prefix
        if cache_key is not None:
            self._prefix_cache.put(cache_key, prefix)
        return PrefillStep(logits, kv_cache, prefix, False, prefill_ms, vision_ms, reduction_ms)

    def _prefill_prompt(self, prefix_ids: tuple[int, ...], suffix_ids: tuple[int, ...], visual: VisualTokens):
        """One LLM forward over a whole prompt about one image: the frame's first question.

        prefix_ids + suffix_ids: the prompt with the image's visual tokens; `visual` from ``family.encode``.
        Returns ``(last-position logits [1, vocab] float32, the prompt's key/value cache, the family's
        PromptEmbeddings with its state for the prefix)``.
        """
        embedded = self.family.embed_prompt(prefix_ids + suffix_ids, len(prefix_ids), visual)
        output = self.model(inputs_embeds=embedded.inputs_embeds, use_cache=True, logits_to_keep=1)
        return output.logits[:, -1].float(), output.past_key_values, embedded

    def _prefill_suffix(self, suffix_ids: tuple[int, ...], prefix: Prefix):
        """One LLM forward over a later question's own tokens on a fork of the frame's cached prefix.

        Returns ``(last-position logits [1, vocab] float32, the question's key/value cache)``.
        """
        kv_cache = fork_cache(prefix.kv_cache)
        inputs_embeds = self.family.embed_suffix(suffix_ids, prefix.family_state)
        logits = self.model(inputs_embeds=inputs_embeds, past_key_values=kv_cache, use_cache=True,
                            logits_to_keep=1).logits
        return logits[:, -1].float(), kv_cache

    def _decode(self, logits: torch.Tensor, kv_cache, max_new_tokens: int, sampling: SamplingOptions,
                check_stop: Callable[..., None],
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                on_step: Callable[[int, bool], None] | None = None):
        """Generate from the prefill's last-position `logits` ``[batch, vocab]`` (float32).

        Each row stops at its first EOS (later steps of a finished row are padding, as in stock
        generate). With `attention_mask` ``[batch, length]`` and `position_ids` (left padding) both
        grow by one per step. `check_stop(rows)` runs before each step, so a stop request waits for
        at most one step. `on_step(row 0's token id, last)` runs after each step (single-row streaming).
        Returns ``(tokens per row incl. EOS, first token time, end time)``.
        """
        batch_size = logits.shape[0]
        choose = token_chooser(sampling, self.device)
        eos = torch.tensor(sorted(self.eos_token_ids), device=self.device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        generated = torch.empty((batch_size, 0), dtype=torch.long, device=self.device)
        first_token_time = None
        for step in range(max_new_tokens):
            check_stop(generated)
            next_tokens = choose(generated, logits)
            next_tokens = torch.where(finished, torch.full_like(next_tokens, self.pad_token_id), next_tokens)
            generated = torch.cat([generated, next_tokens[:, None]], dim=1)
            if first_token_time is None:
                first_token_time = self._clock()
            finished |= torch.isin(next_tokens, eos)
            last = step == max_new_tokens - 1 or bool(finished.all())
            if on_step is not None:
                on_step(int(next_tokens[0]), last)
            if last:
                break
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch_size, 1))], dim=1)
                position_ids = position_ids[:, -1:] + 1
            logits = self.model(input_ids=next_tokens[:, None], attention_mask=attention_mask,
                                position_ids=position_ids, past_key_values=kv_cache,
                                use_cache=True).logits[:, -1].float()
        return self._rows_to_eos(generated), first_token_time, self._clock()

    def _rows_to_eos(self, generated: torch.Tensor) -> list[list[int]]:
        """Token ids per row of `generated` ``[batch, steps]``, each cut after its first EOS."""
        rows = []
        for row in generated.tolist():
            stop = next((index for index, token in enumerate(row) if token in self.eos_token_ids), None)
            rows.append(row if stop is None else row[:stop + 1])
        return rows

    def _stop_checker(self, should_stop: ShouldStop | None, completed: Sequence[VlmOutput] = ()):
        """``check_stop(generated [batch, steps] or None)``: raise GenerationStopped when should_stop gives a reason."""
        def check_stop(generated: torch.Tensor | None = None) -> None:
            reason = should_stop() if should_stop is not None else None
            if reason:
                rows = self._rows_to_eos(generated) if generated is not None else []
                raise GenerationStopped(str(reason), rows, completed, decode=self._decode_text)
        return check_stop

    def _text_stream(self, on_token: OnToken | None, prompt_index: int,
                     start: float) -> Callable[[int, bool], None] | None:
        """``on_step(token_id, last)`` for `_decode` that reports each step's text to `on_token`."""
        if on_token is None:
            return None
        detokenizer = IncrementalDetokenizer(self._decode_text)

        def on_step(token_id: int, last: bool) -> None:
            delta = detokenizer.push(token_id)
            if last:  # the final text: whatever was held back (trailing spaces are stripped by then)
                delta += detokenizer.finish()
            on_token(StreamedText(prompt_index=prompt_index, delta=delta, text=detokenizer.text,
                                  generated_tokens=detokenizer.generated_tokens,
                                  elapsed_ms=self._ms_since(start)))
        return on_step

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def _output(self, prompt: str, tokens: list[int], budget: int, image_size: tuple[int, int], visual_tokens: int,
                *, vision_ms: float, reduction_ms: float, prefill_ms: float, start: float, first_token_time: float,
                end_time: float, prefix_reused: bool, kv_cache_bytes: int) -> VlmOutput:
        text = self._decode_text(tokens)
        total_ms = self._ms_since(start)
        full = self.family.full_token_count(image_size)
        reduced = self.family.reduced(image_size, budget)
        return VlmOutput(
            prompt=prompt, text=text, model=self.model_name, reduction=self.family.reduction_name(image_size, budget),
            token_budget=budget if reduced else full, visual_tokens=visual_tokens, visual_tokens_full=full,
            generated_tokens=len(tokens),
            vision_ms=vision_ms, reduction_ms=reduction_ms, prefill_ms=prefill_ms,
            ttft_ms=(first_token_time - start) * 1000.0, decode_ms=(end_time - first_token_time) * 1000.0,
            total_ms=total_ms, prefix_reused=prefix_reused, kv_cache_bytes=kv_cache_bytes)

    # ------------------------------------------------------------------ timing

    def _clock(self) -> float:
        """perf_counter after the device's queued work has finished (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _ms_since(self, start: float) -> float:
        return (self._clock() - start) * 1000.0


# ---------------------------------------------------------------------- helpers (pure)

def _first_not_none(*values):
    return next(value for value in values if value is not None)


def _check_image(image, name: str = "image") -> None:
    """RequestError unless `image` is a non-empty ``HxWx3 uint8`` numpy array."""
    if not isinstance(image, np.ndarray):
        raise RequestError(f"{name} must be an HxWx3 uint8 RGB numpy array; got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or image.size == 0:
        raise RequestError(f"{name} must be an HxWx3 uint8 RGB array with H, W >= 1; got shape {image.shape} "
                           f"dtype {image.dtype}")


def _eos_token_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelLoadError("the checkpoint defines no EOS token (generation_config.eos_token_id); add one")
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _check_engine_config(config: EngineConfig) -> None:
    """ModelLoadError naming the first EngineConfig value out of range."""
    if not isinstance(config, EngineConfig):
        raise ModelLoadError(f"VlmEngine needs an EngineConfig; got {type(config).__name__}")
    if not isinstance(config.model, str) or not config.model.strip():
        raise ModelLoadError("model is empty; give a LLaVA checkpoint directory or a hub id such as "
                             "llava-hf/llava-1.5-7b-hf")
    checks = [
        ("token_budget", config.token_budget, 1, " (>= the model's visual token count means no reduction)"),
        ("max_new_tokens", config.max_new_tokens, 1, ""),
        ("prefix_cache_entries", config.prefix_cache_entries, 0, " (0 disables the prefix cache)"),
        ("prefix_cache_bytes", config.prefix_cache_bytes, 0, ""),
        ("visual_cache_entries", config.visual_cache_entries, 0, " (0 disables the per-image visual-token cache)"),
        ("visual_cache_bytes", config.visual_cache_bytes, 0, ""),
    ]
    for name, value, minimum, note in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ModelLoadError(f"{name} must be a whole number >= {minimum}{note}; got {value!r}")
    ratio = config.contextual_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ModelLoadError(f"contextual_ratio must be in [0, 1) (VisionZip uses 10/64); got {ratio!r}")
