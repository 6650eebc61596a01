"""``vlm_bench --multi-image``: what questions over several images cost, side by side with one frame.

``vlm_bench --multi-image [--model DIR] [--total-budget 384] [--cameras 6] [--history-frames 4] [--repeats 3]
[--quick] [--json FILE]``

Two comparisons, each measured interleaved (``bench.measure_interleaved``: one warm-up, then the rows in
turn; tables show the minimum over the runs):

* **Surround view**: one question over ``--cameras`` different photos at ``--total-budget`` visual tokens
  in all (384 = 6 x 64), against one question over one photo at the model's full token count (576 for
  LLaVA-1.5). Time to first token and the KV-cache bytes of the prompt prefix, and their ratios.
* **History**: a question over ``--history-frames`` frames of which all but the newest were seen by an
  earlier question (their visual tokens come from the per-image cache), against the same question over
  the newest frame alone at the same per-image budget. The vision stage (encoder + projector +
  VisionZip) of the history question over that of the one frame; the target is at most 1.3x.

Without ``--model`` the ``bench`` preset of ``vlm_tiny_model`` is used, as by ``vlm_bench``.
"""
from __future__ import annotations

import argparse
import functools
import itertools

import numpy as np
import skimage.data

from zip_vlm_ros.bench.inputs import open_bench_engine
from zip_vlm_ros.bench.harness import add_run_arguments, measure_interleaved, resolve_run_arguments, run_and_report
from zip_vlm_ros.engine import ImageInput, VlmEngine

PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'retina', 'hubble_deep_field', 'motorcycle_left',
          'motorcycle_right')
SURROUND_QUESTION = 'What is around the vehicle?'
HISTORY_QUESTION = 'What changed between the frames?'
HISTORY_VISION_TARGET = 1.3


def photos(count: int) -> list[np.ndarray]:
    """`count` different HxWx3 uint8 photographs from skimage.data (cycled when more are asked)."""
    return [np.ascontiguousarray(getattr(skimage.data, PHOTOS[index % len(PHOTOS)])()[..., :3])
            for index in range(count)]


def _record(output) -> dict:
    return {"visual_tokens": output.visual_tokens, "vision_ms": output.vision_ms + output.reduction_ms,
            "prefill_ms": output.prefill_ms, "ttft_ms": output.ttft_ms, "total_ms": output.total_ms,
            "kv_cache_bytes": output.kv_cache_bytes, "images": max(1, len(output.images))}


def measure_surround(engine: VlmEngine, frames: list[np.ndarray], total_budget: int, max_new_tokens: int,
                     track_memory: bool = False) -> dict:
    """One question over every frame at `total_budget` in all, nothing cached."""
    inputs = [ImageInput(frame, f"camera_{index}") for index, frame in enumerate(frames)]
    return _record(engine.generate_images(inputs, [SURROUND_QUESTION], token_budget=total_budget,
                                          max_new_tokens=max_new_tokens)[0])


def measure_one_full_frame(engine: VlmEngine, frame: np.ndarray, max_new_tokens: int,
                           track_memory: bool = False) -> dict:
    """One question over one frame at the model's full token count (stock features, no reduction)."""
    return _record(engine.generate(frame, SURROUND_QUESTION, token_budget=engine.visual_tokens_full,
                                   max_new_tokens=max_new_tokens))


def measure_history(engine: VlmEngine, seen: list[np.ndarray], new: np.ndarray, per_image: int,
                    max_new_tokens: int, new_keys, track_memory: bool = False) -> dict:
    """A question over the seen frames (cached under fixed keys) and a new frame (a key never used)."""
    inputs = [ImageInput(frame, f"front {len(seen) - index:.1f} s ago", key=("bench_seen", index))
              for index, frame in enumerate(seen)] + [ImageInput(new, "front now", key=("bench_new", next(new_keys)))]
    output = engine.generate_images(inputs, [HISTORY_QUESTION], token_budget=per_image * len(inputs),
                                    max_new_tokens=max_new_tokens)[0]
    cached = sum(image.cached for image in output.images)
    if cached != len(seen):
        raise RuntimeError(f"{cached} of the {len(seen)} seen frames came from the visual-token cache; "
                           f"raise visual_cache_entries")
    return _record(output)


def measure_one_frame(engine: VlmEngine, frame: np.ndarray, per_image: int, max_new_tokens: int,
                      track_memory: bool = False) -> dict:
    """The history question over the new frame alone at the same per-image budget, nothing cached."""
    return _record(engine.generate_images([ImageInput(frame, "front now")], [HISTORY_QUESTION],
                                          token_budget=per_image, max_new_tokens=max_new_tokens)[0])


def run(args) -> dict:
    engine = open_bench_engine(args)
    try:
        frames = photos(max(args.cameras, args.history_frames))
        per_image = max(1, args.total_budget // args.cameras)
        surround = measure_interleaved({
            "surround": functools.partial(measure_surround, engine, frames[:args.cameras], args.total_budget,
                                          args.max_new_tokens),
            "one full frame": functools.partial(measure_one_full_frame, engine, frames[0], args.max_new_tokens),
        }, args.repeats, track_memory=False)
        seen, new = frames[:args.history_frames - 1], frames[args.history_frames - 1]
        engine.generate_images([ImageInput(frame, "warm-up", key=("bench_seen", index))
                                for index, frame in enumerate(seen)], [HISTORY_QUESTION],
                               token_budget=per_image * len(seen), max_new_tokens=1)
        history = measure_interleaved({
            "history": functools.partial(measure_history, engine, seen, new, per_image, args.max_new_tokens,
                                         itertools.count()),
            "one frame": functools.partial(measure_one_frame, engine, new, per_image, args.max_new_tokens),
        }, args.repeats, track_memory=False)
        return {
            "model": args.model, "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
            "family": engine.family.label, "visual_tokens_full": engine.visual_tokens_full,
            "cameras": args.cameras, "total_budget": args.total_budget, "history_frames": args.history_frames,
            "per_image_budget": per_image, "repeats": args.repeats, "max_new_tokens": args.max_new_tokens,
            "surround": surround, "history": history,
            "ratios": {
                "surround_ttft_vs_one_full_frame": _ratio(surround["surround"]["ttft_ms"],
                                                          surround["one full frame"]["ttft_ms"]),
                "surround_kv_bytes_vs_one_full_frame": _ratio(surround["surround"]["kv_cache_bytes"],
                                                              surround["one full frame"]["kv_cache_bytes"]),
                "history_vision_vs_one_frame": _ratio(history["history"]["vision_ms"],
                                                      history["one frame"]["vision_ms"]),
            },
        }
    finally:
        engine.close()


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def format_report(results: dict) -> str:
    lines = [f"vlm_bench --multi-image: {results['model']} ({results['family']}) on {results['device']} "
             f"({results['dtype']}), min of {results['repeats']} run(s), {results['max_new_tokens']} new tokens", "",
             "| row | images | visual tokens | vision ms | prefill ms | TTFT ms | total ms | KV MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for section in ("surround", "history"):
        for name, row in results[section].items():
            lines.append(f"| {name} | {row['images']} | {row['visual_tokens']} | {row['vision_ms']:.1f} "
                         f"| {row['prefill_ms']:.1f} | {row['ttft_ms']:.1f} | {row['total_ms']:.1f} "
                         f"| {row['kv_cache_bytes'] / 2**20:.2f} |")
    ratios = results["ratios"]
    history = ratios["history_vision_vs_one_frame"]
    verdict = "N/A" if history is None else ("PASS" if history <= HISTORY_VISION_TARGET else "MISS")
    lines += ["",
              f"- {results['cameras']} cameras at {results['total_budget']} tokens vs one frame at "
              f"{results['visual_tokens_full']}: TTFT x{_fmt(ratios['surround_ttft_vs_one_full_frame'])}, "
              f"KV bytes x{_fmt(ratios['surround_kv_bytes_vs_one_full_frame'])}",
              f"- {results['history_frames']}-frame history with {results['history_frames'] - 1} frames seen "
              f"before vs one frame at {results['per_image_budget']} tokens: vision stage x{_fmt(history)} "
              f"(target <= {HISTORY_VISION_TARGET}: {verdict})"]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "N/A" if value is None else f"{value:.2f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm_bench --multi-image",
                                     description="Surround-view and history questions against one frame.")
    parser.add_argument("--model", help="LLaVA checkpoint directory (default: the vlm_tiny_model 'bench' preset)")
    parser.add_argument("--total-budget", type=int, default=384, help="surround view: visual tokens in all "
                                                                      "(default: %(default)s)")
    parser.add_argument("--cameras", type=int, default=6, help="surround view: images (default: %(default)s)")
    parser.add_argument("--history-frames", type=int, default=4, help="history: frames (default: %(default)s)")
    add_run_arguments(parser, quick_new_tokens=4)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_run_arguments(args, quick_new_tokens=4)
    if min(args.repeats, args.max_new_tokens, args.total_budget) < 1 or args.cameras < 1 or args.history_frames < 2:
        parser.error("--repeats, --max-new-tokens, --total-budget, --cameras must be >= 1; --history-frames >= 2")
    return run_and_report("vlm_bench --multi-image", run, format_report, args)
