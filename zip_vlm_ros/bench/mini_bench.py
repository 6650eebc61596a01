"""``vlm_bench --mini``: LLaVA-Mini against LLaVA-1.5 at its full 576 and at 64 visual tokens, side by side.

``vlm_bench --mini [--mini-model DIR] [--llava-model DIR] [--repeats 3] [--quick] [--json FILE]``

Without models given, the ``bench-mini`` and ``bench`` presets of ``vlm_tiny_model`` are built (once)
next to ``vlm_bench``'s own bench checkpoint: the same Llama (8 layers, 2048 wide) and CLIP geometry
(336 px, 576 patches), LLaVA-Mini adding its compressor (C = 1) and 4 pre-fusion layers. Both engines
are loaded in one process and every row is measured interleaved with the others (``measure_interleaved``:
one warm-up, then ``--repeats`` rounds, minimum reported), on the same photo and questions.

Rows (LLaVA-1.5 full, LLaVA-1.5 at 64, LLaVA-Mini):

* a frame's first question: time to first token and the LLM prefill (LLaVA-Mini's includes pre-fusion);
* a later question on a cached frame: time to first token and total time (``generate`` with the frame's
  prefix reused: for LLaVA-Mini the question's own pre-fusion and LLM prefill only);
* memory per cached frame: the LLM key/value bytes of the frame's visual tokens, of its whole prompt
  prefix (template text included), and everything the prefix cache holds for the frame (LLaVA-Mini: its
  pre-fusion cache as well);
* LLaVA-Mini's pre-fusion share of a first question's prefill (pre-fusion over the image and prompt,
  against the LLM's forward over the fused prompt).

Ratios against the issue's target (visual-token KV of LLaVA-Mini <= 1 % of LLaVA-1.5's at 576) and the
speed-ups follow the tables.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

from zip_vlm_ros.bench.inputs import FRAME_QUESTIONS, bench_image, default_model_dir
from zip_vlm_ros.bench.harness import (Target, add_run_arguments, measure_interleaved, resolve_run_arguments,
                                      run_and_report)
from zip_vlm_ros.engine import EngineConfig, EngineError, VlmEngine
from zip_vlm_ros.tools.tiny_model import build_checkpoint

LLAVA_BUDGETS = (("LLaVA-1.5 full", None), ("LLaVA-1.5 64", 64))
MINI_ROW = "LLaVA-Mini"
KV_TARGET = Target("LLaVA-Mini visual-token KV / LLaVA-1.5 full", maximum=0.01)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure_first_question(engine: VlmEngine, image, question: str, budget: int, max_new_tokens: int) -> dict:
    """A frame's first question, no prefix reuse."""
    output = engine.generate(image, question, token_budget=budget, max_new_tokens=max_new_tokens)
    return {"visual_tokens": output.visual_tokens, "reduction": output.reduction, "vision_ms": output.vision_ms,
            "prefill_ms": output.prefill_ms, "ttft_ms": output.ttft_ms, "total_ms": output.total_ms}


def measure_cached_question(engine: VlmEngine, image, question: str, budget: int, max_new_tokens: int,
                            frame_key) -> dict:
    """A question on a frame whose prefix another question left in the cache."""
    output = engine.generate(image, question, token_budget=budget, max_new_tokens=max_new_tokens, frame_key=frame_key)
    if not output.prefix_reused:
        raise RuntimeError(f"{engine.model_name}: the frame's prefix was not reused; raise prefix_cache_entries")
    return {"ttft_ms": output.ttft_ms, "prefill_ms": output.prefill_ms, "total_ms": output.total_ms}


def frame_memory(engine: VlmEngine, image, question: str, budget: int) -> dict:
    """Bytes one cached frame costs: LLM KV of its visual tokens and of its prompt prefix, and all the
    prefix cache holds for it."""
    engine.clear_prefix_cache()
    output = engine.generate(image, question, token_budget=budget, max_new_tokens=1, frame_key=("bench_mini", "mem"))
    prefix_length = len(engine.prompts.tokenize(question, output.visual_tokens)[0])
    held = engine.prefix_cache_bytes
    engine.clear_prefix_cache()
    # Every position of a layer's cache has the same size, so the visual tokens' share is proportional.
    return {"visual_tokens": output.visual_tokens, "prefix_tokens": prefix_length,
            "visual_kv_bytes": output.kv_cache_bytes * output.visual_tokens // prefix_length,
            "prefix_kv_bytes": output.kv_cache_bytes, "held_bytes": held}


@torch.inference_mode()
def measure_prefusion_share(engine: VlmEngine, image, question: str) -> dict:
    """LLaVA-Mini's first-question prefill split: pre-fusion (``embed_prompt``) and the LLM forward."""
    family = engine.family
    prefix_ids, suffix_ids = engine.prompts.tokenize(question, family.visual_tokens_full)
    visual = family.encode([image], 1)
    start = _clock(engine.device)
    embedded = family.embed_prompt(prefix_ids + suffix_ids, len(prefix_ids), visual)
    fused = _clock(engine.device)
    engine.model(inputs_embeds=embedded.inputs_embeds, use_cache=True, logits_to_keep=1)
    end = _clock(engine.device)
    prefusion_ms, llm_ms = (fused - start) * 1000.0, (end - fused) * 1000.0
    return {"prefusion_ms": prefusion_ms, "llm_prefill_ms": llm_ms, "share": prefusion_ms / (prefusion_ms + llm_ms)}


def run_mini_benchmark(args) -> dict:
    """Load both engines, measure every row interleaved, return the results dict (JSON-ready)."""
    cache = default_model_dir().parent
    mini_dir = args.mini_model or str(build_checkpoint(cache / "bench-mini", preset="bench-mini"))
    llava_dir = args.llava_model or str(build_checkpoint(cache / "bench", preset="bench"))
    engines = {}
    try:
        for name, model in ((MINI_ROW, mini_dir), ("LLaVA-1.5", llava_dir)):
            engines[name] = VlmEngine(EngineConfig(model=model, device=args.device, dtype=args.dtype,
                                                   max_new_tokens=args.max_new_tokens))
        mini, llava = engines[MINI_ROW], engines["LLaVA-1.5"]
        if mini.token_budget_applies or not llava.token_budget_applies:
            raise EngineError(f"--mini-model must be a LLaVA-Mini checkpoint and --llava-model a LLaVA-1.5 one; got "
                              f"{mini.family.label} and {llava.family.label}")
        rows = {label: (llava, llava.check_budget(budget or llava.visual_tokens_full)) for label, budget in LLAVA_BUDGETS}
        rows[MINI_ROW] = (mini, mini.visual_tokens_full)
        image = bench_image(args.image)
        first, later = FRAME_QUESTIONS[0], FRAME_QUESTIONS[1]
        for index, (engine, budget) in enumerate(rows.values()):  # the cached frames the later questions use
            engine.generate(image, first, token_budget=budget, max_new_tokens=1, frame_key=("bench_mini", index))
        measured_first = measure_interleaved({label: functools.partial(
            measure_first_question, engine, image, first, budget, args.max_new_tokens)
            for label, (engine, budget) in rows.items()}, args.repeats, track_memory=False)
        measured_later = measure_interleaved({label: functools.partial(
            measure_cached_question, engine, image, later, budget, args.max_new_tokens, ("bench_mini", index))
            for index, (label, (engine, budget)) in enumerate(rows.items())}, args.repeats, track_memory=False)
        share = measure_interleaved({MINI_ROW: functools.partial(measure_prefusion_share, mini, image, first)},
                                    args.repeats, track_memory=False)[MINI_ROW]
        memory = {label: frame_memory(engine, image, first, budget) for label, (engine, budget) in rows.items()}
        results = {
            "mini_model": mini_dir, "llava_model": llava_dir, "device": str(mini.device),
            "dtype": str(mini.dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
            "image": args.image, "repeats": args.repeats, "max_new_tokens": args.max_new_tokens,
            "rows": [{"row": label, "first": measured_first[label], "later": measured_later[label],
                      "memory": memory[label]} for label in rows],
            "prefusion": share, "load_average_1min": os.getloadavg()[0],
        }
        results["ratios"] = mini_ratios(results)
        return results
    finally:
        for engine in engines.values():
            engine.close()


def mini_ratios(results: dict) -> list[dict]:
    """The KV target and LLaVA-1.5's times over LLaVA-Mini's (> 1: LLaVA-Mini is faster)."""
    rows = {row["row"]: row for row in results["rows"]}
    mini = rows[MINI_ROW]
    full_kv = rows["LLaVA-1.5 full"]["memory"]["visual_kv_bytes"]
    ratios = [KV_TARGET.check(mini["memory"]["visual_kv_bytes"] / full_kv if full_kv else None)]
    for label, _ in LLAVA_BUDGETS:
        for stage, field in (("first", "ttft_ms"), ("later", "ttft_ms"), ("later", "total_ms")):
            value = mini[stage][field]
            ratios.append({"name": f"{label} / LLaVA-Mini, {stage} question {field}", "target": "-",
                           "ratio": rows[label][stage][field] / value if value else None, "result": "-"})
    return ratios


def format_mini_report(results: dict) -> str:
    def ms(value):
        return "-" if value is None else f"{value:.1f}"

    def kib(value):
        return f"{value / 1024:.1f}"

    lines = [f"vlm_bench --mini  LLaVA-Mini={results['mini_model']}  LLaVA-1.5={results['llava_model']}",
             f"device={results['device']}  dtype={results['dtype']}  threads={results['torch_threads']}  "
             f"image={results['image']}  minimum of {results['repeats']} runs after 1 warm-up; "
             f"max_new_tokens={results['max_new_tokens']}", "",
             f"{'row':<16} {'visual':>6} {'1st TTFT':>9} {'1st prefill':>11} {'later TTFT':>10} {'later total':>11} "
             f"{'visual KV KiB':>13} {'prefix KV KiB':>13} {'held KiB':>9}"]
    for row in results["rows"]:
        first, later, memory = row["first"], row["later"], row["memory"]
        lines.append(f"{row['row']:<16} {memory['visual_tokens']:>6} {ms(first['ttft_ms']):>9} "
                     f"{ms(first['prefill_ms']):>11} {ms(later['ttft_ms']):>10} {ms(later['total_ms']):>11} "
                     f"{kib(memory['visual_kv_bytes']):>13} {kib(memory['prefix_kv_bytes']):>13} "
                     f"{kib(memory['held_bytes']):>9}")
    share = results["prefusion"]
    lines += ["", f"LLaVA-Mini first-question prefill: pre-fusion {ms(share['prefusion_ms'])} ms + LLM "
                  f"{ms(share['llm_prefill_ms'])} ms (pre-fusion share {share['share']:.0%})", ""]
    for ratio in results["ratios"]:
        value = "-" if ratio["ratio"] is None else f"{ratio['ratio']:.4g}"
        lines.append(f"{ratio['name']:<62} {value:>10}  {ratio['target']:>8}  {ratio['result']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm_bench --mini", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mini-model", help="LLaVA-Mini checkpoint directory (default: the bench-mini preset)")
    parser.add_argument("--llava-model", help="LLaVA-1.5 checkpoint directory or hub id (default: the bench preset)")
    parser.add_argument("--image", default="astronaut", help="skimage photo (default: %(default)s)")
    add_run_arguments(parser, quick_new_tokens=2)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_run_arguments(args, quick_new_tokens=2)
    if args.repeats < 1 or args.max_new_tokens < 1:
        parser.error("--repeats and --max-new-tokens must be >= 1")
    return run_and_report("vlm_bench --mini", run_mini_benchmark, format_mini_report, args)


if __name__ == "__main__":
    sys.exit(main())
