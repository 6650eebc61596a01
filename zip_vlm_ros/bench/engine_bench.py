"""vlm_bench: VisionZip token budgets against stock LLaVA, side by side in one run.

``vlm_bench [--model DIR] [--budgets full,192,128,64,32] [--json FILE] [--repeats 3] [--quick]``
``vlm_bench --model DIR_OF_LLAVA_NEXT``: defaults to budgets full,640,320,160 at target 160 on a
1280x720 frame (``coffee-720p``), with LLaVA-NeXT's targets.
``vlm_bench --model DIR_OF_QWEN2_5_VL``: defaults to budgets full,25%,10% of the frame's full count (Qwen2.5-VL's
depends on the frame) at target 25% on ``coffee-720p``, with Qwen2.5-VL's targets; VisionZip there scores by
received attention (no reference-style row: the VisionZip reference code is CLIP's).
``vlm_bench --node [...]``: the node's own overhead instead (``zip_vlm_ros.bench.node_bench``).
``vlm_bench --multi-image [...]``: surround-view and history questions (``zip_vlm_ros.bench.multi_image_bench``).
``vlm_bench --mini [...]``: LLaVA-Mini against LLaVA-1.5 at 576 and 64 tokens (``zip_vlm_ros.bench.mini_bench``).

Every measurement is taken ``--repeats`` times after one warm-up run, on one real photo from
``skimage.data``; the tables show the minimum of the runs (and the median where marked) and the ratios
use the minimum, the run least disturbed by other processes. The sections are:

* per budget, ``VlmEngine.generate`` without prefix reuse: visual tokens, vision / reduction / LLM
  prefill / time-to-first-token / decode-per-token times as the engine reports them, the extra peak
  memory of the request and the KV-cache bytes held for the frame's prompt prefix;
* stock: ``model.generate`` on the processor's full-token inputs (vision and prefill timed with
  forward hooks, the first token with a streamer);
* the vision stage at the target budget: stock feature extraction (``get_image_features``: for
  LLaVA-NeXT every crop, unpadding and newlines), VisionZip through ``encode_for_visionzip`` and
  reference-style VisionZip through ``encode_reference_style`` (eager attention, every layer's attention
  map), each followed by the projector (and for LLaVA-NeXT the per-crop layout);
* five questions on one frame with and without prefix reuse, at full budget and the target budget
  (``--no-questions`` skips them);
* floors: the engine against the least any implementation can do, one bare model call over the same
  tokens: a frame's first question (prefill vs one ``model(inputs_embeds=prompt)`` forward), a later
  question on a cached prefix (time to first token vs one ``model(input_ids=question,
  past_key_values=prefix)`` forward) and decoding (ms per token vs ``model(input_ids=token,
  past_key_values=cache)`` steps from the same length);
* ratios against the project's targets, each PASS or MISS, computed from the numbers above.

Without ``--model`` the ``bench`` preset of ``vlm_tiny_model`` is built (once) under
``$XDG_CACHE_HOME/zip_vlm_ros/bench`` and used.

Memory: see ``zip_vlm_ros.bench.harness.PeakMemory``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import time
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from zip_vlm_ros.bench.harness import (PeakMemory, Target, add_run_arguments, device_clock, measure_interleaved,
                                      memory_method, resolve_run_arguments, run_and_report)
from zip_vlm_ros.bench.inputs import FRAME_QUESTIONS, IMAGES, bench_image, default_model_dir, open_bench_engine
from zip_vlm_ros.models.clip_features import encode_for_visionzip, encode_reference_style
from zip_vlm_ros.models.kv_cache import cache_nbytes, fork_cache

FULL = "full"
STOCK = "stock generate"
DEFAULT_BUDGETS = "full,192,128,64,32"
# Per model family: budgets, target budget and image when the command line gives none. LLaVA-NeXT's are
# the VisionZip paper's (640/320/160 = 128/64/32 tokens per crop at 5 crops) on a 1280x720 frame.
# Qwen2.5-VL's full count depends on the frame, so its budgets are shares of it (issue 23).
FAMILY_DEFAULTS = {
    "llava": {"budgets": DEFAULT_BUDGETS, "target_budget": "64", "image": "astronaut"},
    "llava_next": {"budgets": "full,640,320,160", "target_budget": "160", "image": "coffee-720p"},
    "qwen2_5_vl": {"budgets": "full,25%,10%", "target_budget": "25%", "image": "coffee-720p"},
}
# The vision-stage variants each family has: the reference-style row runs VisionZip's CLIP code.
VISION_VARIANTS = ("stock", "visionzip", "reference")
FAMILY_VISION_VARIANTS = {"qwen2_5_vl": ("stock", "visionzip")}
DEFAULT_PROMPT = "Describe the scene."
# ---------------------------------------------------------------------------------------------- stages

def measure_budget(engine, image, prompt: str, budget: int, max_new_tokens: int, *,
                   track_memory: bool = False) -> dict:
    """One ``engine.generate`` request without prefix reuse (and its extra peak memory if tracked)."""
    with PeakMemory(engine.device, track_memory) as peak:
        output = engine.generate(image, prompt, token_budget=budget, max_new_tokens=max_new_tokens)
    return {
        "visual_tokens": output.visual_tokens,
        "reduction": output.reduction,
        "vision_ms": output.vision_ms,
        "reduction_ms": output.reduction_ms,
        "prefill_ms": output.prefill_ms,
        "ttft_ms": output.ttft_ms,
        "decode_ms_per_token": _per_token(output.decode_ms, output.generated_tokens),
        "total_ms": output.total_ms,
        "generated_tokens": output.generated_tokens,
        "kv_cache_bytes": output.kv_cache_bytes,
        "peak_extra_bytes": peak.extra_bytes,
        "text": output.text,
    }


@torch.inference_mode()
def measure_stock_generate(engine, image, prompt: str, max_new_tokens: int, *,
                           track_memory: bool = False) -> dict:
    """Stock LLaVA: the processor's full-token inputs into ``model.generate`` (greedy).

    Forward hooks time the vision tower + projector and the language model's first call (the prompt
    prefill) and read the prompt's KV-cache size; a streamer stamps the first generated token.
    """
    device = engine.device
    marks: dict[str, float] = {}
    prompt_kv_bytes: list[int] = []
    handles = _stock_stage_hooks(engine, marks, prompt_kv_bytes)
    try:
        with PeakMemory(device, track_memory) as peak:
            start = device_clock(device)
            inputs = engine.processor(images=image, text=engine.prompts.render(prompt), return_tensors="pt")
            preprocess_end = device_clock(device)
            inputs = inputs.to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(engine.dtype)
            sequences = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                              streamer=_FirstTokenClock(marks, device))
            end = device_clock(device)
    finally:
        for handle in handles:
            handle.remove()
    prompt_length = inputs["input_ids"].shape[1]
    new_tokens = sequences[0, prompt_length:]
    return {
        "visual_tokens": int((inputs["input_ids"] == engine.image_token_id).sum()),
        "reduction": "none",
        "vision_ms": (preprocess_end - start + marks["vision_end"] - marks["vision_start"]) * 1000.0,
        "reduction_ms": 0.0,
        "prefill_ms": (marks["prefill_end"] - marks["prefill_start"]) * 1000.0,
        "ttft_ms": (marks["first_token"] - start) * 1000.0,
        "decode_ms_per_token": _per_token((end - marks["first_token"]) * 1000.0, len(new_tokens)),
        "total_ms": (end - start) * 1000.0,
        "generated_tokens": len(new_tokens),
        "kv_cache_bytes": prompt_kv_bytes[0],
        "prompt_tokens": prompt_length,
        "peak_extra_bytes": peak.extra_bytes,
        "text": engine.tokenizer.decode(new_tokens, skip_special_tokens=True).strip(),
    }


class _FirstTokenClock(BaseStreamer):
    """generate() puts the prompt ids first, then each new token: the second put is the first token."""

    def __init__(self, marks: dict[str, float], device):
        self.marks, self.device, self.puts = marks, device, 0

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.marks["first_token"] = device_clock(self.device)

    def end(self):
        pass


def _stock_stage_hooks(engine, marks: dict[str, float], prompt_kv_bytes: list[int]) -> list:
    """Forward hooks on the stock model that stamp `marks` (vision and prefill start/end) and keep the
    prompt's KV-cache bytes; the caller removes the returned handles."""
    device, llava = engine.device, engine.model.model
    # LLaVA: the CLIP tower, then the projector; Qwen2.5-VL: one module (tower and patch merger)
    vision_start = getattr(llava, "vision_tower", None) or llava.visual
    vision_end = getattr(llava, "multi_modal_projector", None) or llava.visual

    def mark(name):
        def hook(*_):
            marks.setdefault(name, device_clock(device))
        return hook

    def keep_prompt_kv(module, args, output):
        if not prompt_kv_bytes:
            prompt_kv_bytes.append(cache_nbytes(output.past_key_values))

    return [
        vision_start.register_forward_pre_hook(mark("vision_start")),
        vision_end.register_forward_hook(mark("vision_end")),
        llava.language_model.register_forward_pre_hook(mark("prefill_start")),
        llava.language_model.register_forward_hook(mark("prefill_end")),
        llava.language_model.register_forward_hook(keep_prompt_kv),
    ]


@torch.inference_mode()
def measure_vision_stage(engine, pixels: dict, image_size: tuple[int, int], variant: str, token_budget: int, *,
                         track_memory: bool = False, reducer: str = "visionzip") -> dict:
    """Image features for the LLM from one image's preprocessed `pixels` (``family.preprocess``), one way.

    variant "stock": the model's ``get_image_features`` (all encoder layers, every feature token,
    projector; LLaVA-NeXT: every crop, unpadding and newlines); "visionzip": ``encode_for_visionzip`` +
    `reducer` (``visionzip_compress`` by default) + projector (+ per-crop layout); "reference": the same
    with ``encode_reference_style``.
    """
    family = engine.family
    with PeakMemory(engine.device, track_memory) as peak:
        start = device_clock(engine.device)
        if variant == "stock":
            features = family.encode_pixels(pixels, [image_size], family.full_token_count(image_size))[0]
        else:
            encoder = encode_for_visionzip if variant == "visionzip" else encode_reference_style
            features = family.encode_pixels(pixels, [image_size], token_budget, reducer, encoder=encoder)[0]
        elapsed_ms = (device_clock(engine.device) - start) * 1000.0
        del features
    return {"ms": elapsed_ms, "peak_extra_bytes": peak.extra_bytes}


def measure_frame_questions(engine, image, questions, budget: int, reuse: bool, max_new_tokens: int,
                            frame_numbers) -> dict:
    """Several questions on one frame: one ``generate_many`` with a fresh prefix cache (reuse), or one
    ``generate`` per question with no frame key (no reuse). Per question TTFT = vision + reduction +
    prefill (whatever of it the question itself ran) up to its first token. `frame_numbers` yields a
    fresh frame key number per call."""
    start = time.perf_counter()
    if reuse:
        engine.clear_prefix_cache()
        outputs = engine.generate_many(image, list(questions), token_budget=budget,
                                       max_new_tokens=max_new_tokens, frame_key=("vlm_bench", next(frame_numbers)))
    else:
        outputs = [engine.generate(image, question, token_budget=budget, max_new_tokens=max_new_tokens)
                   for question in questions]
    total_ms = (time.perf_counter() - start) * 1000.0
    record = {"total_ms": total_ms, "ttft_sum_ms": sum(output.ttft_ms for output in outputs)}
    for index, output in enumerate(outputs, start=1):
        record[f"q{index}_ttft_ms"] = output.ttft_ms
        record[f"q{index}_prefix_reused"] = output.prefix_reused
    return record


# ---------------------------------------------------------------------------------------------- floors

# What each floor row compares: the engine's time against the least any implementation can do.
FLOOR_LABELS = {
    "first": "first question: prefill / one bare forward",
    "later": "later question: TTFT / bare forward on prefix",
    "decode": "decode: ms per token / bare step",
}

@dataclass
class FloorInputs:
    """A prompt's pieces for the bare model calls, built once with the engine's own helpers."""

    budget: int
    prompt_embeds: torch.Tensor         # [1, prefix + suffix, text_hidden], image features in place
    prefix_cache: object                # the prefix's key/value cache from a bare forward over it
    suffix_ids: torch.Tensor            # [1, suffix] the question's own tokens
    # M-RoPE families (Qwen2.5-VL): the prompt's [3, 1, length] positions and the state later positions
    # continue from (``family.text_positions``); None and unused for families that count positions.
    position_ids: torch.Tensor | None = None
    prefix_state: object = None

    def text_positions(self, engine, start: int, length: int) -> torch.Tensor | None:
        return engine.family.text_positions(self.prefix_state, start, length)


@torch.inference_mode()
def prepare_floor_inputs(engine, image, question: str, budget: int, reducer: str = "visionzip") -> FloorInputs:
    visual_tokens = engine.family.visual_token_count(image.shape[:2], budget, reducer)
    prefix_ids, suffix_ids = engine.prompts.tokenize(question, visual_tokens)
    visual = engine.family.encode([image], budget, reducer)
    embedded = engine.family.embed_prompt(list(prefix_ids + suffix_ids), len(prefix_ids), visual)
    positions = embedded.position_ids
    prefix_cache = engine.model(inputs_embeds=embedded.inputs_embeds[:, :len(prefix_ids)], use_cache=True,
                                position_ids=None if positions is None else positions[..., :len(prefix_ids)],
                                logits_to_keep=1).past_key_values
    return FloorInputs(budget, embedded.inputs_embeds, prefix_cache,
                       torch.tensor([suffix_ids], dtype=torch.long, device=engine.device), positions,
                       embedded.prefix_state)


def measure_engine_first_question(engine, image, question: str, budget: int) -> dict:
    """A frame's first question: the engine's prefill (prefix + question) in ms."""
    output = engine.generate(image, question, token_budget=budget, max_new_tokens=1)
    return {"ms": output.prefill_ms}


def measure_engine_later_question(engine, image, question: str, budget: int, frame_key,
                                  reducer: str = "visionzip") -> dict:
    """A later question on a frame whose prefix is cached: the engine's time to first token in ms."""
    output = engine.generate(image, question, token_budget=budget, max_new_tokens=1, frame_key=frame_key,
                             reducer=reducer)
    if not output.prefix_reused:
        raise RuntimeError(f"vlm_bench: the prefix of frame {frame_key} was not cached; the later-question row "
                           f"would time a first question")
    return {"ms": output.ttft_ms}


def measure_engine_decode(engine, image, question: str, budget: int, max_new_tokens: int) -> dict:
    """The engine's decode time per token after the first, in ms."""
    output = engine.generate(image, question, token_budget=budget, max_new_tokens=max_new_tokens)
    return {"ms": _per_token(output.decode_ms, output.generated_tokens), "steps": output.generated_tokens - 1}


@torch.inference_mode()
def measure_bare_forward(engine, inputs: FloorInputs) -> dict:
    """One bare ``model(inputs_embeds=prompt)`` forward and the argmax of its last position, in ms."""
    start = device_clock(engine.device)
    logits = engine.model(inputs_embeds=inputs.prompt_embeds, position_ids=inputs.position_ids, use_cache=True,
                          logits_to_keep=1).logits
    logits[:, -1].argmax(dim=-1)
    return {"ms": (device_clock(engine.device) - start) * 1000.0}


@torch.inference_mode()
def measure_bare_suffix(engine, inputs: FloorInputs) -> dict:
    """One bare ``model(input_ids=question, past_key_values=prefix)`` forward on a fork of the same
    cached prefix and the argmax of its last position, in ms."""
    prefix_length, suffix_length = inputs.prompt_embeds.shape[1] - inputs.suffix_ids.shape[1], inputs.suffix_ids.shape[1]
    positions = inputs.text_positions(engine, prefix_length, suffix_length)
    start = device_clock(engine.device)
    logits = engine.model(input_ids=inputs.suffix_ids, past_key_values=fork_cache(inputs.prefix_cache),
                          position_ids=positions, use_cache=True, logits_to_keep=1).logits
    logits[:, -1].argmax(dim=-1)
    return {"ms": (device_clock(engine.device) - start) * 1000.0}


@torch.inference_mode()
def measure_bare_decode(engine, inputs: FloorInputs, steps: int) -> dict:
    """`steps` bare ``model(input_ids=token, past_key_values=cache)`` steps (greedy) after an untimed
    prefill of the prompt, from the same cache length as the engine's decode: ms per step."""
    output = engine.model(inputs_embeds=inputs.prompt_embeds, position_ids=inputs.position_ids, use_cache=True,
                          logits_to_keep=1)
    cache, token = output.past_key_values, output.logits[:, -1].argmax(dim=-1)
    start = device_clock(engine.device)
    for _ in range(steps):
        positions = inputs.text_positions(engine, cache.get_seq_length(), 1)
        logits = engine.model(input_ids=token[:, None], past_key_values=cache, position_ids=positions,
                              use_cache=True).logits
        token = logits[:, -1].argmax(dim=-1)
    return {"ms": (device_clock(engine.device) - start) * 1000.0 / steps, "steps": steps}


def measure_floors(engine, image, budgets: dict, target_budget: int, max_new_tokens: int, repeats: int) -> list[dict]:
    """The engine against the bare model call doing the same work, side by side (FLOOR_LABELS).

    `budgets` maps row labels ("full", "64") to token budgets; the first question and decode rows use
    `target_budget`'s label, the later-question rows every label.
    """
    first_question, later_question = FRAME_QUESTIONS[0], FRAME_QUESTIONS[2]
    target = str(target_budget)
    inputs = {label: prepare_floor_inputs(engine, image, later_question, budget) for label, budget in budgets.items()}
    first_inputs = prepare_floor_inputs(engine, image, first_question, budgets[target])
    decode_steps = measure_engine_decode(engine, image, first_question, budgets[target], max_new_tokens)["steps"]
    rows = {("first", target): (
        functools.partial(measure_engine_first_question, engine, image, first_question, budgets[target]),
        functools.partial(measure_bare_forward, engine, first_inputs), first_inputs.prompt_embeds.shape[1])}
    for label, budget in budgets.items():
        frame_key = ("vlm_bench floors", label)
        engine.generate(image, first_question, token_budget=budget, max_new_tokens=1, frame_key=frame_key)
        rows["later", label] = (
            functools.partial(measure_engine_later_question, engine, image, later_question, budget, frame_key),
            functools.partial(measure_bare_suffix, engine, inputs[label]), inputs[label].suffix_ids.shape[1])
    if decode_steps > 0:
        rows["decode", target] = (
            functools.partial(measure_engine_decode, engine, image, first_question, budgets[target], max_new_tokens),
            functools.partial(measure_bare_decode, engine, first_inputs, decode_steps), decode_steps)
    measured = measure_interleaved({(kind, label, side): measure for (kind, label), pair in rows.items()
                                    for side, measure in zip(("engine", "bare"), pair[:2])},
                                   repeats, track_memory=False)
    return [{"kind": kind, "budget": label, "tokens": tokens,
             "engine_ms": measured[kind, label, "engine"]["ms"], "bare_ms": measured[kind, label, "bare"]["ms"],
             "engine_median_ms": measured[kind, label, "engine"]["median"]["ms"],
             "bare_median_ms": measured[kind, label, "bare"]["median"]["ms"]}
            for (kind, label), (_, _, tokens) in rows.items()]


def _per_token(decode_ms: float, generated_tokens: int) -> float | None:
    """Decode time per token after the first (the first comes with the prefill); None if only one."""
    return decode_ms / (generated_tokens - 1) if generated_tokens > 1 else None


# ---------------------------------------------------------------------------------------------- targets

TARGETS = {
    "vision_vs_stock": Target("vision stage time, VisionZip / stock features", maximum=1.0),
    "vision_vs_reference": Target("vision stage speed-up, reference-style / VisionZip", minimum=1.1),
    "memory_vs_reference": Target("vision stage extra peak memory, reference-style / VisionZip", minimum=5.0),
    "ttft": Target("time to first token speed-up, stock generate / VisionZip", minimum=4.5),
    "prefill": Target("LLM prefill speed-up, stock generate / VisionZip", minimum=5.0),
    "kv": Target("frame KV-cache bytes, VisionZip / full tokens", maximum=0.12),
    "first_floor": Target("first question prefill, VisionZip / one bare forward over the same tokens", maximum=1.1),
    "later_full": Target("later question TTFT / bare forward of its tokens on the cached prefix, full tokens",
                         maximum=1.25),
    "later_budget": Target("later question TTFT / bare forward of its tokens on the cached prefix, VisionZip",
                           maximum=1.25),
    "decode_floor": Target("decode ms per token, engine / bare model step at the same length", maximum=1.05),
    "five_questions": Target("summed TTFT of 5 questions, full no reuse / VisionZip with reuse", minimum=8.0),
}


# LLaVA-NeXT's frames carry up to 5x the tokens, so VisionZip is held to more (issue 11).
FAMILY_TARGETS = {
    "llava_next": {
        "ttft": Target("time to first token speed-up, stock generate / VisionZip", minimum=5.0),
        "prefill": Target("LLM prefill speed-up, stock generate / VisionZip", minimum=8.0),
        "kv": Target("frame KV-cache bytes, VisionZip / full tokens", maximum=0.07),
    },
    # Qwen2.5-VL at 25% of the frame's full count (issue 23); its VisionZip runs the whole tower and
    # scores one layer's attention on top, so the vision stage may cost a little more than stock.
    "qwen2_5_vl": {
        "vision_vs_stock": Target("vision stage time, VisionZip / stock features", maximum=1.15),
        "ttft": Target("time to first token speed-up, stock generate / VisionZip", minimum=3.0),
        "prefill": Target("LLM prefill speed-up, stock generate / VisionZip", minimum=3.5),
        "kv": Target("frame KV-cache bytes, VisionZip / full tokens", maximum=0.3),
    },
}


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def evaluate_targets(results: dict) -> list[dict]:
    """PASS/MISS/N/A per target from the numbers in `results` (N/A: a needed row was not measured)."""
    target_budget = results["target_budget"]
    rows = {row["budget"]: row for row in results["budgets"]}
    reduced = rows.get(str(target_budget))
    full = rows.get(FULL)
    stock = results["stock_generate"]
    vision = {name: results["vision_stage"].get(name, {"ms": None, "peak_extra_bytes": None})
              for name in VISION_VARIANTS}
    questions = {(row["budget"], row["reuse"]): row for row in results["frame_questions"]}
    floors = {(row["kind"], row["budget"]): row for row in results["floors"]}

    def floor_ratio(kind, budget):
        row = floors.get((kind, budget))
        return row and _ratio(row["engine_ms"], row["bare_ms"])

    budget_reuse = questions.get((str(target_budget), True))
    full_no_reuse = questions.get((FULL, False))
    ratios = {
        "vision_vs_stock": _ratio(vision["visionzip"]["ms"], vision["stock"]["ms"]),
        "vision_vs_reference": _ratio(vision["reference"]["ms"], vision["visionzip"]["ms"]),
        "memory_vs_reference": _ratio(vision["reference"]["peak_extra_bytes"], vision["visionzip"]["peak_extra_bytes"]),
        "ttft": _ratio(stock["ttft_ms"], reduced and reduced["ttft_ms"]),
        "prefill": _ratio(stock["prefill_ms"], reduced and reduced["prefill_ms"]),
        "kv": _ratio(reduced and reduced["kv_cache_bytes"], full and full["kv_cache_bytes"]),
        "first_floor": floor_ratio("first", str(target_budget)),
        "later_full": floor_ratio("later", FULL),
        "later_budget": floor_ratio("later", str(target_budget)),
        "decode_floor": floor_ratio("decode", str(target_budget)),
        "five_questions": _ratio(full_no_reuse and full_no_reuse["ttft_sum_ms"],
                                 budget_reuse and budget_reuse["ttft_sum_ms"]),
    }
    targets = {**TARGETS, **FAMILY_TARGETS.get(results.get("family"), {})}
    return [targets[key].check(ratio) for key, ratio in ratios.items()]


# ---------------------------------------------------------------------------------------------- report

def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def format_report(results: dict) -> str:
    """The human-readable tables for `results` (as written to JSON)."""
    lines = [
        f"vlm_bench  model={results['model']}  device={results['device']}  dtype={results['dtype']}  "
        f"threads={results['torch_threads']}  image={results['image']}",
        f"{results['family_label']}: {results['crops']} crop(s), {results['visual_tokens_full']} full visual tokens "
        f"for this {results['image_size'][1]}x{results['image_size'][0]} image",
        f"minimum of {results['repeats']} runs after 1 warm-up (median where marked 'med'); ratios use the "
        f"minimum; max_new_tokens={results['max_new_tokens']}; memory: {results['memory_method']}",
        f"1-min load average {results['load_average_1min']['start']:.2f} at start, "
        f"{results['load_average_1min']['end']:.2f} at end (the machine's other processes share its cores)",
        "",
        f"{'budget':<15}{'tokens':>7}{'vision':>9}{'reduce':>8}{'prefill':>9}{'TTFT':>9}{'dec/tok':>9}"
        f"{'total':>9}{'peak+MiB':>10}{'KV MiB':>8}{'prefill med':>13}{'TTFT med':>10}",
    ]
    stock = dict(results["stock_generate"], budget=STOCK)
    for row in [*results["budgets"], stock]:
        lines.append(
            f"{row['budget']:<15}{row['visual_tokens']:>7}{_fmt(row['vision_ms']):>9}{_fmt(row['reduction_ms']):>8}"
            f"{_fmt(row['prefill_ms']):>9}{_fmt(row['ttft_ms']):>9}{_fmt(row['decode_ms_per_token']):>9}"
            f"{_fmt(row['total_ms']):>9}{_mib(row['peak_extra_bytes']):>10}{_mib(row['kv_cache_bytes']):>8}"
            f"{_fmt(row['median']['prefill_ms']):>13}{_fmt(row['median']['ttft_ms']):>10}")
    lines.append("(times in ms; KV: engine rows hold the frame prefix up to the last visual token, "
                 f"stock holds its whole {results['stock_generate']['prompt_tokens']}-token prompt)")

    vision = results["vision_stage"]
    lines += ["", f"vision stage, 1 image, VisionZip at {results['target_tokens']} tokens (encoder + selection/merge "
                  f"+ projector; preprocessing excluded):"]
    for name, label in (("stock", "stock get_image_features"), ("visionzip", "VisionZip encode_for_visionzip"),
                        ("reference", "reference-style (eager, all maps)")):
        if name not in vision:
            continue
        stage = vision[name]
        lines.append(f"  {label:<36}{_fmt(stage['ms']):>9} ms  peak+ {_mib(stage['peak_extra_bytes']):>7} MiB")

    if results["frame_questions"]:
        lines += ["", f"{results['questions']} questions on one frame (per-question TTFT in ms):",
                  f"  {'budget':<8}{'reuse':<7}{'total':>9}" + "".join(f"{'q' + str(i):>8}"
                                                                  for i in range(1, results["questions"] + 1))
                  + f"{'TTFT sum':>10}{'sum med':>9}"]
    for row in results["frame_questions"]:
        lines.append(f"  {row['budget']:<8}{'yes' if row['reuse'] else 'no':<7}{_fmt(row['total_ms']):>9}"
                     + "".join(f"{_fmt(row[f'q{i}_ttft_ms']):>8}" for i in range(1, results["questions"] + 1))
                     + f"{_fmt(row['ttft_sum_ms']):>10}{_fmt(row['median']['ttft_sum_ms']):>9}")

    lines += ["", f"floors: the engine against one bare model call doing the same work (ms; minimum of "
                  f"{results['floor_repeats']} interleaved runs):",
              f"  {'measure':<48}{'budget':>7}{'tokens':>7}{'engine':>9}{'bare':>9}{'ratio':>8}"
              f"{'engine med':>12}{'bare med':>10}"]
    for row in results["floors"]:
        tokens = f"{row['tokens']}{' st' if row['kind'] == 'decode' else ''}"
        lines.append(f"  {FLOOR_LABELS[row['kind']]:<48}{row['budget']:>7}{tokens:>7}{_fmt(row['engine_ms']):>9}"
                     f"{_fmt(row['bare_ms']):>9}{_fmt(_ratio(row['engine_ms'], row['bare_ms']), 3):>8}"
                     f"{_fmt(row['engine_median_ms']):>12}{_fmt(row['bare_median_ms']):>10}")
    lines.append("  (tokens: the forward's new tokens; for decode, the steps timed from the prompt's length)")

    lines += ["", "ratios vs targets:"]
    for target in results["targets"]:
        ratio = "-" if target["ratio"] is None else f"{target['ratio']:.3g}"
        lines.append(f"  {target['result']:<5} {target['name']}: {ratio}x "
                     f"(target {target['target']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI

def parse_budget(text: str) -> str:
    """'64' -> '64', '25%' -> '25%', 'full' -> 'full' (argparse type): an integer >= 1, a share of the
    frame's full count (1..100 %) or 'full'."""
    budget = text.strip().lower()
    number = budget.removesuffix("%")
    if budget != FULL and not (number.isdigit() and int(number) >= 1 and (number == budget or int(number) <= 100)):
        raise argparse.ArgumentTypeError(f"budget {text!r} is neither 'full', an integer >= 1 nor a share "
                                         f"1%..100% of the frame's full count")
    return budget if budget == FULL else f"{int(number)}{budget[len(number):]}"


def resolve_budget(label: str, full: int) -> int:
    """The token budget of a budget label for a frame of `full` visual tokens ('25%': a quarter, rounded)."""
    if label == FULL:
        return full
    if label.endswith("%"):
        return max(1, round(full * int(label[:-1]) / 100))
    return int(label)


def parse_budgets(text: str) -> list[str]:
    """'full,192,25%' -> ['full', '192', '25%'] (argparse type): ``parse_budget`` items, no repeats."""
    budgets = [item for item in text.split(",") if item.strip()]
    if not budgets:
        raise argparse.ArgumentTypeError("give at least one budget, e.g. full,192,128,64,32")
    normalized = [parse_budget(budget) for budget in budgets]
    if len(set(normalized)) != len(normalized):
        raise argparse.ArgumentTypeError(f"budgets repeat in {text!r}; list each once")
    return normalized


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm_bench",
        description="Benchmark VisionZip token budgets against stock LLaVA generate and reference-style "
                    "VisionZip, side by side in one run; prints tables and ratios vs targets.")
    parser.add_argument("--model", help="LLaVA checkpoint directory or hub id (default: the vlm_tiny_model "
                                        f"'bench' preset, built once under {default_model_dir()})")
    parser.add_argument("--budgets", type=parse_budgets,
                        help="comma-separated visual-token budgets per image; 'full' = no reduction, 'N%%' = N%% "
                             f"of the frame's full count (default: {DEFAULT_BUDGETS}; LLaVA-NeXT: "
                             f"{FAMILY_DEFAULTS['llava_next']['budgets']}; Qwen2.5-VL: "
                             f"{FAMILY_DEFAULTS['qwen2_5_vl']['budgets']})".replace("%", "%%"))
    parser.add_argument("--target-budget", type=parse_budget,
                        help="VisionZip budget the targets, vision-stage and multi-question rows use, tokens or "
                             "a share of the frame's full count (default: 64; LLaVA-NeXT: 160; Qwen2.5-VL: 25%%)")
    parser.add_argument("--floor-repeats", type=int,
                        help="measured runs per floor row (default: 10, --quick: 1); single forwards on a noisy "
                             "CPU need more runs than whole answers for their minimum to settle")
    parser.add_argument("--image", choices=IMAGES,
                        help="skimage.data photo, or NAME-720p: it as a 1280x720 frame (default: astronaut; "
                             "LLaVA-NeXT: coffee-720p)")
    parser.add_argument("--no-questions", action="store_true",
                        help="skip the several-questions section (its full-token rows prefill every question "
                             "from scratch: many minutes on a CPU for LLaVA-NeXT frames); its targets show N/A")
    add_run_arguments(parser, quick_new_tokens=4)
    return parser


def run_benchmark(args) -> dict:
    """Load the engine, run every section, and return the results dict (JSON-ready)."""
    engine = open_bench_engine(args)
    try:
        load_at_start = os.getloadavg()[0]
        family = engine.family
        defaults = FAMILY_DEFAULTS.get(family.model_type, FAMILY_DEFAULTS["llava"])
        args.budgets = args.budgets or parse_budgets(defaults["budgets"])
        args.target_budget = args.target_budget or defaults["target_budget"]
        args.image = args.image or defaults["image"]
        image = bench_image(args.image)
        image_size = image.shape[:2]
        full = family.full_token_count(image_size)
        budget_of = {label: full if label == FULL else engine.check_budget(resolve_budget(label, full))
                     for label in args.budgets}
        vision_budget = engine.check_budget(resolve_budget(args.target_budget, full))
        results = {
            "model": args.model, "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(), "image": args.image, "prompt": DEFAULT_PROMPT,
            "repeats": args.repeats, "floor_repeats": args.floor_repeats, "max_new_tokens": args.max_new_tokens,
            "visual_tokens_full": full,
            "family": family.model_type, "family_label": family.label, "image_size": list(image_size),
            "crops": family.num_crops(image_size),
            "target_budget": args.target_budget, "target_tokens": vision_budget, "questions": len(FRAME_QUESTIONS),
            "memory_method": memory_method(engine.device),
        }

        # Each group is measured interleaved; the groups share a warm model.
        rows = measure_interleaved({
            **{name: functools.partial(measure_budget, engine, image, DEFAULT_PROMPT, budget_of[name],
                                       args.max_new_tokens) for name in args.budgets},
            STOCK: functools.partial(measure_stock_generate, engine, image, DEFAULT_PROMPT, args.max_new_tokens),
        }, args.repeats)
        results["stock_generate"] = rows.pop(STOCK)
        results["budgets"] = [{"budget": name, "token_budget": budget_of[name], **rows[name]} for name in args.budgets]

        pixels = family.preprocess([image])
        results["vision_stage"] = measure_interleaved({
            variant: functools.partial(measure_vision_stage, engine, pixels, image_size, variant, vision_budget)
            for variant in FAMILY_VISION_VARIANTS.get(family.model_type, VISION_VARIANTS)
        }, args.repeats)

        frame_keys = itertools.count()
        question_rows = {
            (name, reuse): functools.partial(
                measure_frame_questions, engine, image, FRAME_QUESTIONS, full if name == FULL else vision_budget,
                reuse, args.max_new_tokens, frame_keys)
            for name in (FULL, str(args.target_budget)) for reuse in (False, True)
        } if not args.no_questions else {}
        measured = measure_interleaved(question_rows, args.repeats, track_memory=False)
        results["frame_questions"] = [{"budget": name, "reuse": reuse, **measured[name, reuse]}
                                      for name, reuse in question_rows]
        results["floors"] = measure_floors(engine, image, {FULL: full, str(args.target_budget): vision_budget},
                                           args.target_budget, args.max_new_tokens, args.floor_repeats)
        results["load_average_1min"] = {"start": load_at_start, "end": os.getloadavg()[0]}
        results["targets"] = evaluate_targets(results)
        return results
    finally:
        engine.close()


def main(argv=None) -> int:
    """``vlm_bench`` without --node, --multi-image or --mini (``zip_vlm_ros.bench.cli`` dispatches)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_run_arguments(args, quick_new_tokens=4)
    args.floor_repeats = args.floor_repeats if args.floor_repeats is not None else (1 if args.quick else 10)
    counts = [args.repeats, args.floor_repeats, args.max_new_tokens]
    if min(counts) < 1:
        parser.error("--repeats, --floor-repeats and --max-new-tokens must be >= 1")
    return run_and_report("vlm_bench", run_benchmark, format_report, args)


if __name__ == "__main__":
    sys.exit(main())
