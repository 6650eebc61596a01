"""The LLaVA engine: prompts, VisionZip-reduced generation and a per-frame prefix cache, for every model family.

No ROS here: the node, replay and bench tools hand it ``HxWx3 uint8 RGB`` numpy images and prompts
and get ``VlmOutput`` records back.

One request runs in four stages, each timed:

1. vision     the checkpoint's image processor and vision tower (+ multimodal projector);
2. reduction  the request's reducer (``reducer=``, default ``EngineConfig.reducer``: visionzip, divprune
              or vispruner, ``zip_vlm_ros.reducers``) keeps ``token_budget`` of the visual tokens when the
              budget is below the image's full count (576 for LLaVA-1.5; for LLaVA-NeXT it depends on
              the aspect ratio, 1948 for 1280x720); otherwise the stock features are used unchanged;
3. prefill    the language model reads the prompt: the *prefix* (the prompt up to and including the
              visual tokens) and the question's own tokens (the *suffix*);
4. decode     greedy or sampled tokens until EOS or ``max_new_tokens``.

No reducer's selection depends on the question, so the prefix - vision, reduction, projection
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
(``zip_vlm_ros.models``: LLaVA-1.5, LLaVA-NeXT, LLaVA-Mini, Qwen2.5-VL): the adapter turns a tokenized
prompt and the image's visual tokens into input embeddings (``embed_prompt``; ``embed_suffix`` for a later question on a
cached prefix, from the state the adapter kept for that prefix), so prefill, decode, sampling and the
cache never learn the family. For LLaVA-1.5 and LLaVA-NeXT that is the token embeddings with the visual
tokens at the image placeholders; LLaVA-Mini first runs its pre-fusion layers over the prompt, and its
prefix state is their key/value cache; Qwen2.5-VL's prompt carries its own M-RoPE positions, and its prefix
state is the position offset that later questions and decode steps add (``family.text_positions``).
``token_budget`` means the same for every family that applies it: the visual tokens the LLM reads per image. LLaVA-Mini's count is fixed by training
(``family.token_budget_applies`` is False): budgets are accepted and ignored.

Several images, one question (surround cameras, a camera's recent frames): ``generate_images``, in
``zip_vlm_ros.engine.multi_image``, splits the request's total budget evenly over labelled images, keeps each
image's visual tokens in a per-image cache and the prompt prefix in the same prefix cache (LLaVA-Mini:
its video mode, C^2 tokens per image).

Where the parts live: request checks (``requests``), prompt text and ids (``prompts``), prefill and decode
(``generation``), sampling, streaming, the prefix cache, devices; ``VlmEngine`` wires them to the family.

The engine is thread-compatible, not thread-safe: call it from one thread (the node's worker).
"""

from __future__ import annotations

import gc
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from zip_vlm_ros.engine.config import EngineConfig, check_engine_config
from zip_vlm_ros.engine.cpu_linear import route_cpu_linears
from zip_vlm_ros.engine.devices import DeviceClock, resolve_device, resolve_dtype
from zip_vlm_ros.engine.batching import BatchRequest, DecodeBatch
from zip_vlm_ros.engine.generation import Generator, PrefillStep
from zip_vlm_ros.engine.multi_image import MultiImageAnswerer
from zip_vlm_ros.engine.outputs import OnToken, ShouldStop, VlmOutput
from zip_vlm_ros.engine.prefix_cache import Prefix, PrefixCache
from zip_vlm_ros.models.kv_cache import cache_nbytes
from zip_vlm_ros.engine.prompts import PromptFormat
from zip_vlm_ros.engine.requests import (ImageInput, check_budget, check_context, check_frame_key, check_image,
                                         check_max_new_tokens, check_prompts, check_reducer)
from zip_vlm_ros.engine.sampling import SamplingOptions, check_sampling
from zip_vlm_ros.errors import EngineError, RequestError
from zip_vlm_ros.models import VisualTokens, load_family

__all__ = ["VlmEngine"]


class VlmEngine:
    """LLaVA + VisionZip inference. See the module docstring for the stages and the prefix cache.

    Attributes: ``config``, ``model_name``, ``device``, ``dtype``, ``family`` (the model-family
    adapter), ``visual_tokens_full`` (the most visual tokens the stock model feeds for one image: 576
    for LLaVA-1.5, 2928 for LLaVA-NeXT-7B; the largest useful budget), ``context_tokens`` (the language
    model's context length: prompt plus answer), ``model`` and ``processor`` (the loaded transformers
    objects), ``prompts`` (its ``PromptFormat``), ``generator`` (prefill and decode, with the prefix cache)
    and ``clock`` (the device-synchronised clock every stage is timed with).
    """

    def __init__(self, config: EngineConfig):
        """Load the checkpoint and its processor. Raises ModelLoadError (one line) on any problem."""
        check_engine_config(config)
        self.config = config
        self.model_name = config.model.rstrip("/") or config.model
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.clock = DeviceClock(self.device)
        self.family = load_family(config.model, self.dtype, self.device, config.contextual_ratio, self.clock.now,
                                  config.vision_tower, config.max_pixels)
        self.model, self.processor = self.family.model, self.family.processor
        for module in self.family.torch_modules():
            route_cpu_linears(module)  # decode steps on CPU in float32: oneDNN, not MKL (cpu_linear.py: why)
        self.tokenizer = self.processor.tokenizer
        self.image_processor = self.processor.image_processor
        self.visual_tokens_full = self.family.visual_tokens_full
        self.token_budget_applies = self.family.token_budget_applies
        self.context_tokens = self.family.context_tokens
        self.image_token_id = self.family.image_token_id
        self.prompts = PromptFormat(self.processor, self.image_token_id, self.model_name, self.family.image_slot)
        self.image_token = self.prompts.image_token
        self.generator = Generator(self.family, self.tokenizer, self.clock,
                                   PrefixCache(config.prefix_cache_entries, config.prefix_cache_bytes))
        self.eos_token_ids = self.generator.eos_token_ids
        self.pad_token_id = self.generator.pad_token_id
        self._multi_image = MultiImageAnswerer(self, config.visual_cache_entries, config.visual_cache_bytes)
        self._closed = False

    # ------------------------------------------------------------------ validation

    def check_budget(self, token_budget: int | None) -> int:
        """The effective visual-token budget for a request.

        None means ``config.token_budget``. Budgets at or above ``visual_tokens_full`` mean no
        reduction and return ``visual_tokens_full``. Raises RequestError for a budget below 1.
        """
        return check_budget(token_budget, self.config.token_budget, self.visual_tokens_full)

    def check_reducer(self, reducer: str | None) -> str:
        """The request's reducer (None or "": ``config.reducer``), or RequestError listing the choices."""
        return check_reducer(reducer, self.config.reducer)

    def check_max_new_tokens(self, max_new_tokens: int | None) -> int:
        """`max_new_tokens` (None: ``config.max_new_tokens``), or RequestError."""
        return check_max_new_tokens(max_new_tokens, self.config.max_new_tokens)

    def check_open(self) -> None:
        """EngineError once ``close`` has run."""
        if self._closed:
            raise EngineError(f"the engine for {self.model_name} was closed; create a new VlmEngine")

    # ------------------------------------------------------------------ public inference API

    def generate(self, image: np.ndarray, prompt: str, *, token_budget: int | None = None,
                 max_new_tokens: int | None = None, frame_key: Hashable | None = None,
                 sampling: SamplingOptions | None = None, should_stop: ShouldStop | None = None,
                 on_token: OnToken | None = None, reducer: str | None = None) -> VlmOutput:
        """Answer `prompt` about `image` (``HxWx3 uint8 RGB``).

        `reducer` picks the visual-token reducer (``zip_vlm_ros.reducers.REDUCERS``; None: ``config.reducer``).
        `frame_key` names the image's pixels (same key => same pixels) so that later prompts on the
        frame reuse its prefix; None disables reuse. `should_stop` is asked between stages and before
        each decode step; a reason it returns raises GenerationStopped. `on_token(StreamedText)` is
        called after every generated token, in this thread, with the text that token completes (the
        deltas concatenate to the output's text). Raises RequestError for bad arguments.
        """
        return self.generate_many(image, [prompt], token_budget=token_budget, max_new_tokens=max_new_tokens,
                                  frame_key=frame_key, sampling=sampling, should_stop=should_stop,
                                  on_token=on_token, reducer=reducer)[0]

    @torch.inference_mode()
    def generate_many(self, image: np.ndarray, prompts: Sequence[str], *, token_budget: int | None = None,
                      max_new_tokens: int | None = None, frame_key: Hashable | None = None,
                      sampling: SamplingOptions | None = None,
                      should_stop: ShouldStop | None = None, on_token: OnToken | None = None,
                      reducer: str | None = None) -> list[VlmOutput]:
        """Answer several prompts about one image, in order, computing the image prefix once.

        The first prompt pays for vision, reduction and one forward over the prefix and its own tokens
        (unless `frame_key` finds the prefix cached); the others run one forward over their own tokens,
        report ``prefix_reused=True`` and only their own work in the timings.
        With a seed, each prompt samples from a generator seeded afresh, as separate calls would.
        `should_stop` and `on_token` as in ``generate``; GenerationStopped.completed holds the prompts
        answered before; StreamedText.prompt_index says which prompt a step belongs to.
        """
        request = self.open_request(image, prompts, token_budget=token_budget, max_new_tokens=max_new_tokens,
                                    frame_key=frame_key, sampling=sampling, should_stop=should_stop,
                                    on_token=on_token, reducer=reducer)
        check_stop = self.generator.stop_checker(should_stop, completed=request.outputs)
        for prompt_index in range(len(request.prompts)):
            check_stop()
            step, start = request.prefill(prompt_index, check_stop)
            stream = self.generator.text_stream(on_token, prompt_index, start)
            tokens, first_token_time, end_time = self.generator.decode(step.logits, step.kv_cache,
                                                                       request.max_new_tokens, request.sampling,
                                                                       check_stop, on_step=stream,
                                                                       family_state=step.prefix.family_state)
            request.outputs.append(request.make_output(prompt_index, tokens[0], step, start, first_token_time,
                                                       end_time))
        return request.outputs

    def open_request(self, image: np.ndarray, prompts: Sequence[str], *, token_budget: int | None = None,
                     max_new_tokens: int | None = None, frame_key: Hashable | None = None,
                     sampling: SamplingOptions | None = None, should_stop: ShouldStop | None = None,
                     on_token: OnToken | None = None, reducer: str | None = None) -> BatchRequest:
        """Check a ``generate_many`` request and prepare it for a ``DecodeBatch`` (no model work yet).

        The arguments mean what they mean for ``generate_many``; RequestError for bad ones. The batch
        prefills its prompts one at a time (on the frame's cached prefix when `frame_key` finds it) and
        decodes them beside other requests; see ``zip_vlm_ros.engine.batching``.
        """
        self.check_open()
        check_image(image)
        prompts = check_prompts(prompts, self.image_token)
        budget = self.check_budget(token_budget)
        reducer = self.check_reducer(reducer)
        max_new = self.check_max_new_tokens(max_new_tokens)
        plan = _ImagePrompts(self, image, prompts, budget, reducer, frame_key)
        for prefix_ids, suffix_ids in plan.tokenized:  # refuse before any prompt runs
            check_context(len(prefix_ids) + len(suffix_ids), plan.visual_tokens, max_new, self.context_tokens)
        return BatchRequest(prompts, prefill=plan.prefill, make_output=plan.output, max_new_tokens=max_new,
                            sampling=check_sampling(sampling), should_stop=should_stop, on_token=on_token)

    def decode_batch(self, max_rows: int) -> DecodeBatch:
        """A DecodeBatch on this engine's model, for requests from ``open_request``."""
        self.check_open()
        return DecodeBatch(self.generator, max_rows)

    def generate_images(self, images: Sequence[ImageInput], prompts: Sequence[str], *,
                        token_budget: int | None = None, max_new_tokens: int | None = None,
                        sampling: SamplingOptions | None = None, should_stop: ShouldStop | None = None,
                        on_token: OnToken | None = None, reducer: str | None = None) -> list[VlmOutput]:
        """Answer each of `prompts` about all of `images` (surround cameras, a camera's recent frames) at once.

        `token_budget` is the request's total, split evenly over the images (None: ``config.token_budget``
        per image); each image is introduced in the prompt by its ``label``; AnyRes checkpoints read each
        image's base image only. Images with a ``key`` keep their visual tokens in a per-image cache and
        the prompt prefix in the prefix cache. See ``zip_vlm_ros.engine.multi_image``. Outputs list each image's
        share and tokens in ``VlmOutput.images``. `should_stop`, `on_token`, `reducer` as in ``generate_many``.
        """
        return self._multi_image.generate(images, prompts, token_budget=token_budget, max_new_tokens=max_new_tokens,
                                          sampling=sampling, should_stop=should_stop, on_token=on_token,
                                          reducer=reducer)

    @torch.inference_mode()
    def generate_batch(self, images: Sequence[np.ndarray], prompts: Sequence[str], *,
                       token_budget: int | None = None, max_new_tokens: int | None = None,
                       sampling: SamplingOptions | None = None,
                       should_stop: ShouldStop | None = None, reducer: str | None = None) -> list[VlmOutput]:
        """Answer ``prompts[i]`` about ``images[i]`` for several cameras in one batched forward.

        As a frame's first question in ``generate_many``, each row's prefix and question are read in
        that one forward. Prompts are left-padded with an attention mask; each row stops at its own EOS. Vision,
        reduction, prefill and decode times are the batch's (the same in every output); token counts
        are per row and ``kv_cache_bytes`` is the row's share of the batch's prompt cache. The
        prefix cache is not used. `should_stop` as in ``generate``.
        """
        self.check_open()
        if not self.family.batches_prompts:
            raise RequestError(f"{self.family.label} checkpoints do not answer a batch of cameras in one forward "
                               f"(their prompts carry M-RoPE positions); ask each camera with generate, or all "
                               f"of them together with generate_images")
        if not isinstance(images, Sequence) or isinstance(images, np.ndarray):
            raise RequestError(f"images must be a list of HxWx3 uint8 arrays; got {type(images).__name__}")
        prompts = check_prompts(prompts, self.image_token)
        if len(images) != len(prompts):
            raise RequestError(f"generate_batch needs one prompt per image; got {len(images)} images and "
                               f"{len(prompts)} prompts")
        for index, image in enumerate(images):
            check_image(image, f"images[{index}]")
        budget = self.check_budget(token_budget)
        reducer = self.check_reducer(reducer)
        max_new = self.check_max_new_tokens(max_new_tokens)
        sampling = check_sampling(sampling)

        check_stop = self.generator.stop_checker(should_stop)
        check_stop()
        start = self.clock.now()
        counts = [self.family.visual_token_count(image.shape[:2], budget, reducer) for image in images]
        rows = [prefix + suffix for prefix, suffix in (self.prompts.tokenize(prompt, count)
                                                       for prompt, count in zip(prompts, counts))]
        for row, count in zip(rows, counts):
            check_context(len(row), count, max_new, self.context_tokens)
        visual = self.family.encode(list(images), budget, reducer)
        check_stop()
        prefill_start = self.clock.now()
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
        prefill_ms = self.clock.ms_since(prefill_start)
        tokens, first_token_time, end_time = self.generator.decode(logits, kv_cache, max_new, sampling, check_stop,
                                                          attention_mask=attention_mask, position_ids=position_ids)
        return [
            self.output(prompt, row_tokens, budget, reducer, image.shape[:2], count, vision_ms=visual.vision_ms,
                         reduction_ms=visual.reduction_ms, prefill_ms=prefill_ms, start=start,
                         first_token_time=first_token_time, end_time=end_time, prefix_reused=False,
                         kv_cache_bytes=kv_bytes_per_row,
                         provenance=visual.provenance[index] if visual.provenance else None)
            for index, (prompt, row_tokens, image, count) in enumerate(zip(prompts, tokens, images, counts))
        ]

    @property
    def prefix_cache_bytes(self) -> int:
        """Memory the cached frame prefixes hold now (what ``EngineConfig.prefix_cache_bytes`` bounds).

        A prefix is a view of its frame's first prompt cache, so this counts that whole prompt.
        """
        return self.generator.prefix_cache.nbytes

    def clear_prefix_cache(self) -> None:
        """Drop every cached frame prefix and per-image visual tokens (and the device memory they hold)."""
        self.generator.prefix_cache.clear()
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
        self.generator.prefix_cache.clear()
        self._multi_image.clear()
        del self._multi_image, self.generator, self.prompts
        del self.model, self.processor, self.tokenizer, self.image_processor, self.family
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ outputs
    # output(): one prompt's VlmOutput from its tokens and stage times (also used by _ImagePrompts).

    def output(self, prompt: str, tokens: list[int], budget: int, reducer: str, image_size: tuple[int, int],
               visual_tokens: int,
                *, vision_ms: float, reduction_ms: float, prefill_ms: float, start: float, first_token_time: float,
                end_time: float, prefix_reused: bool, kv_cache_bytes: int, provenance=None) -> VlmOutput:
        text = self.generator.decode_text(tokens)
        total_ms = self.clock.ms_since(start)
        full = self.family.full_token_count(image_size)
        reduced = self.family.reduced(image_size, budget)
        return VlmOutput(
            prompt=prompt, text=text, model=self.model_name,
            reduction=self.family.reduction_name(image_size, budget, reducer),
            token_budget=budget if reduced else full, visual_tokens=visual_tokens, visual_tokens_full=full,
            generated_tokens=len(tokens),
            vision_ms=vision_ms, reduction_ms=reduction_ms, prefill_ms=prefill_ms,
            ttft_ms=(first_token_time - start) * 1000.0, decode_ms=(end_time - first_token_time) * 1000.0,
            total_ms=total_ms, prefix_reused=prefix_reused, kv_cache_bytes=kv_cache_bytes, provenance=provenance)



class _ImagePrompts:
    """Prompts about one image, prefilled one at a time on a prefix computed once (``generate_many``,
    ``open_request``): encodes the image on the first prompt that misses the prefix cache."""

    def __init__(self, engine: VlmEngine, image: np.ndarray, prompts: list[str], budget: int, reducer: str,
                 frame_key: Hashable | None):
        self.engine, self.image, self.prompts, self.budget, self.reducer = engine, image, prompts, budget, reducer
        self.cache_key_base = None
        if frame_key is not None:
            check_frame_key(frame_key)
            self.cache_key_base = (engine.model_name, frame_key, budget,
                                   engine.family.reduction_settings(image.shape[:2], budget, reducer))
        self.visual_tokens = engine.family.visual_token_count(image.shape[:2], budget, reducer)
        self.tokenized = [engine.prompts.tokenize(prompt, self.visual_tokens) for prompt in prompts]
        self.encoded: list[VisualTokens] = []
        self.prefixes_this_call: dict[tuple[int, ...], Prefix] = {}

    def encode(self) -> tuple[VisualTokens, float, float]:
        if self.encoded:
            return self.encoded[0], 0.0, 0.0
        self.encoded.append(self.engine.family.encode([self.image], self.budget, self.reducer))
        return self.encoded[0], self.encoded[0].vision_ms, self.encoded[0].reduction_ms

    @torch.inference_mode()
    def prefill(self, prompt_index: int, check_stop) -> tuple[PrefillStep, float]:
        """Prompt `prompt_index`'s prefill and its start time (the origin of its ttft_ms)."""
        engine = self.engine
        start = engine.clock.now()
        prefix_ids, suffix_ids = self.tokenized[prompt_index]
        cache_key = None if self.cache_key_base is None else self.cache_key_base + (prefix_ids,)
        step = engine.generator.prefill_step(prefix_ids, suffix_ids, cache_key, self.prefixes_this_call,
                                             self.encode, check_stop)
        return step, start

    def output(self, prompt_index: int, tokens: list[int], step: PrefillStep, start: float,
               first_token_time: float, end_time: float) -> VlmOutput:
        return self.engine.output(
            self.prompts[prompt_index], tokens, self.budget, self.reducer, self.image.shape[:2], self.visual_tokens,
            vision_ms=step.vision_ms, reduction_ms=step.reduction_ms, prefill_ms=step.prefill_ms, start=start,
            first_token_time=first_token_time, end_time=end_time, prefix_reused=step.reused,
            kv_cache_bytes=step.prefix.nbytes,
            provenance=step.prefix.provenance[0] if step.prefix.provenance else None)
