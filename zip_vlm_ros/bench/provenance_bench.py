"""``vlm_bench --provenance``: what tracing the visual tokens to frame patches costs, beside the reduction.

``vlm_bench --provenance [--budget 640] [--repeats 30] [--threads 2]``

Provenance is always on, so it must be cheap. On LLaVA-NeXT-7B's geometry (a 1280x720 frame: a base image
and a 2x2 grid of 336 px crops, 24x24 patches each, 1948 stock tokens) every reducer runs on random features
of the real shapes (what the provenance costs depends on the shapes only), then the provenance the adapter
computes from its output: the crops in frame pixels, the layout order (VisionZip, VisPruner) or the stock
sequence's positions (DivPrune, full budget), and the patch owners. Both are timed side by side
(``harness.measure_interleaved``); target: provenance <= 0.1x the reduction it follows. No model is loaded.
"""
from __future__ import annotations

import argparse
import functools
import time

import torch

from zip_vlm_ros.bench.harness import Target, measure_interleaved
from zip_vlm_ros.models.anyres import (anyres_crop_boxes, anyres_full_token_count, anyres_grid_shape,
                                       anyres_stock_positions, anyres_vispruner_layout, anyres_visionzip_layout,
                                       split_budget_over_crops)
from zip_vlm_ros.models.provenance import provenance_from_sequence, provenance_of_crops, token_of_kept_positions
from zip_vlm_ros.reducers import (DEFAULT_CONTEXTUAL_RATIO, DEFAULT_IMPORTANT_RATIO, VisionZipFeatures,
                                  divprune_reduce, split_budget, vispruner_reduce, visionzip_reduce)
from zip_vlm_ros.tools.tiny_model import NEXT_GRID_PINPOINTS

FRAME = (720, 1280)
CROP, SIDE = 336, 24
VISION_HIDDEN, VISION_HEADS, HEAD_DIM, TEXT_HIDDEN = 1024, 16, 64, 4096
TARGET = Target("provenance / reduction", maximum=0.1)


def _timed(function) -> tuple[object, float]:
    started = time.perf_counter()
    result = function()
    return result, (time.perf_counter() - started) * 1e3


def _reducer_measure(reducer: str, budget: int, inputs: dict, track_memory: bool = False) -> dict:
    """One run of `reducer` at `budget` on the frame's inputs, then its provenance: both times."""
    grid = anyres_grid_shape(FRAME, NEXT_GRID_PINPOINTS, CROP)
    crops = 1 + grid[0] * grid[1]
    if reducer == "divprune":
        reduced, reduce_ms = _timed(lambda: divprune_reduce(inputs["stock"], budget))

        def trace():
            positions, _ = anyres_stock_positions(FRAME, grid, SIDE)
            return provenance_from_sequence(token_of_kept_positions(reduced.sources[0]),
                                            anyres_crop_boxes(FRAME, NEXT_GRID_PINPOINTS, CROP, SIDE), positions, budget)
    else:
        per_crop = split_budget_over_crops(budget, crops, SIDE * SIDE if reducer == "vispruner" else 1 + SIDE * SIDE)
        if reducer == "vispruner":
            reduced, reduce_ms = _timed(lambda: vispruner_reduce(inputs["crops"].hidden_states[:, 1:],
                                                                 inputs["crops"].cls_attention, per_crop,
                                                                 DEFAULT_IMPORTANT_RATIO))
            kept, first_patch = reduced.sources.float().argmax(dim=2), 0
            layout = functools.partial(anyres_vispruner_layout, kept_indices=kept, grid_shape=grid,
                                       patches_per_side=SIDE)
        else:
            dominant, contextual = split_budget(per_crop, DEFAULT_CONTEXTUAL_RATIO)
            reduced, reduce_ms = _timed(lambda: visionzip_reduce(inputs["crops"], dominant, contextual))
            kept, first_patch = reduced.sources[:, :dominant].float().argmax(dim=2), 1
            layout = functools.partial(anyres_visionzip_layout, dominant_indices=kept, contextual=contextual,
                                       grid_shape=grid, patches_per_side=SIDE)

        def trace():
            order = layout(torch.arange(crops * per_crop).view(crops, per_crop, 1))[:, 0]
            return provenance_of_crops(reduced.sources, anyres_crop_boxes(FRAME, NEXT_GRID_PINPOINTS, CROP, SIDE),
                                       first_patch, order)
    provenance, provenance_ms = _timed(trace)
    return {"visual_tokens": provenance.visual_tokens, "reduce_ms": reduce_ms, "provenance_ms": provenance_ms}


def run_provenance_bench(budget: int = 640, repeats: int = 30, seed: int = 0) -> dict:
    """Per reducer: ``{visual_tokens, reduce_ms, provenance_ms, median: {...}, ratio, check}`` (minimum of
    `repeats` interleaved runs; the ratio is provenance over reduction, on the minimum)."""
    generator = torch.Generator().manual_seed(seed)
    full = anyres_full_token_count(FRAME, NEXT_GRID_PINPOINTS, CROP, SIDE)
    grid_height, grid_width = anyres_grid_shape(FRAME, NEXT_GRID_PINPOINTS, CROP)
    crops = 1 + grid_height * grid_width
    tokens = 1 + SIDE * SIDE
    inputs = {"crops": VisionZipFeatures(
        torch.randn(crops, tokens, VISION_HIDDEN, generator=generator),
        torch.softmax(torch.randn(crops, VISION_HEADS, tokens - 1, generator=generator), dim=-1),
        torch.randn(crops, tokens, HEAD_DIM, generator=generator)),
        "stock": torch.randn(1, full, TEXT_HIDDEN, generator=generator)}
    with torch.inference_mode():
        results = measure_interleaved({reducer: functools.partial(_reducer_measure, reducer, budget, inputs)
                                       for reducer in ("visionzip", "divprune", "vispruner")}, repeats,
                                      track_memory=False)
    for row in results.values():
        row["ratio"] = row["provenance_ms"] / row["reduce_ms"]
        row["check"] = TARGET.check(row["ratio"])
    return results


def format_report(results: dict, budget: int, threads: int) -> str:
    lines = [f"vlm_bench --provenance: LLaVA-NeXT-7B geometry, {FRAME[1]}x{FRAME[0]} frame, budget {budget}, "
             f"{threads} thread(s); ms, minimum (median) of the runs", "",
             "reducer     tokens  reduction ms         provenance ms      provenance / reduction"]
    for reducer, row in results.items():
        median = row["median"]
        lines.append(f"{reducer:<10}  {row['visual_tokens']:>6}  {row['reduce_ms']:>8.2f} ({median['reduce_ms']:.2f})"
                     f"  {row['provenance_ms']:>7.3f} ({median['provenance_ms']:.3f})   {row['ratio']:.4f}x  "
                     f"{row['check']['result']} ({row['check']['target']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlm_bench --provenance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=640, help="visual tokens per image (default: 640)")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved runs (default: 30)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(format_report(run_provenance_bench(args.budget, args.repeats), args.budget, args.threads))
    return 0
