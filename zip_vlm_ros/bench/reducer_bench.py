"""``vlm_bench --reducers``: the reducers side by side at one budget (64 tokens by default).

``vlm_bench --reducers visionzip,divprune,vispruner [--model DIR] [--budget 64] [--repeats 3] [--quick]
[--json FILE]``

Per reducer, each section measured interleaved (``harness.measure_interleaved``: one warm-up, then the rows
in turn; tables show the minimum over the runs):

* **vision stage**: preprocessed pixels to the LLM's visual tokens (encoder + reduction + projector, and
  for LLaVA-NeXT the layout), against stock feature extraction (``get_image_features``, every token), with
  the extra peak memory of each;
* **TTFT**: a frame's first question, nothing cached (``VlmEngine.generate``);
* **later-question floor**: the time to first token of a later question on the frame's cached prefix,
  against one bare ``model(input_ids=question, past_key_values=prefix)`` forward over the same prefix.

Targets (the reducer issue's): vision stage <= 1.1x stock (DivPrune <= 1.0x: it reads the stock features
and only selects); a later question <= 1.25x its bare forward, whatever the reducer.
Without ``--model`` the ``bench`` preset of ``vlm_tiny_model`` is used, as by ``vlm_bench``.
"""
from __future__ import annotations

import argparse
import functools

from zip_vlm_ros.bench.engine_bench import (measure_bare_suffix, measure_engine_later_question, measure_vision_stage,
                                            prepare_floor_inputs)
from zip_vlm_ros.bench.harness import (Target, add_run_arguments, measure_interleaved, memory_method,
                                      resolve_run_arguments, run_and_report)
from zip_vlm_ros.bench.inputs import FRAME_QUESTIONS, bench_image, open_bench_engine
from zip_vlm_ros.reducers import REDUCERS

STOCK = "stock features"
LATER_TARGET = Target("later question TTFT / bare forward on the cached prefix", maximum=1.25)


def vision_target(reducer: str) -> Target:
    """The vision-stage bound of `reducer` against stock feature extraction."""
    return Target(f"vision stage, {reducer} / stock features", maximum=1.0 if reducer == "divprune" else 1.1)


def measure_first_question(engine, image, question: str, budget: int, reducer: str,
                           track_memory: bool = False) -> dict:
    """A frame's first question, nothing cached: what the engine reports."""
    output = engine.generate(image, question, token_budget=budget, reducer=reducer, max_new_tokens=1)
    return {"visual_tokens": output.visual_tokens, "vision_ms": output.vision_ms,
            "reduction_ms": output.reduction_ms, "prefill_ms": output.prefill_ms, "ttft_ms": output.ttft_ms}


def run(args) -> dict:
    engine = open_bench_engine(args)
    try:
        image = bench_image("astronaut")
        size = image.shape[:2]
        pixels = engine.family.preprocess([image])
        vision_rows = {STOCK: functools.partial(measure_vision_stage, engine, pixels, size, "stock", args.budget)}
        for reducer in args.reducers:
            vision_rows[reducer] = functools.partial(measure_vision_stage, engine, pixels, size, "visionzip",
                                                     args.budget, reducer=reducer)
        vision = measure_interleaved(vision_rows, args.repeats, track_memory=True)
        first = measure_interleaved({reducer: functools.partial(
            measure_first_question, engine, image, FRAME_QUESTIONS[0], args.budget, reducer)
            for reducer in args.reducers}, args.repeats, track_memory=False)
        later = measure_later_floors(engine, image, args.budget, args.reducers, args.repeats)
        return {"model": args.model, "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
                "family": engine.family.label, "budget": args.budget, "repeats": args.repeats,
                "memory_method": memory_method(engine.device), "reducers": list(args.reducers),
                "vision": vision, "first_question": first, "later_question": later,
                "targets": evaluate_targets(vision, later, args.reducers)}
    finally:
        engine.close()


def measure_later_floors(engine, image, budget: int, reducers, repeats: int) -> dict:
    """Per reducer: the engine's later-question TTFT and the bare forward over the same cached prefix."""
    first_question, later_question = FRAME_QUESTIONS[0], FRAME_QUESTIONS[2]
    rows = {}
    for reducer in reducers:
        frame_key = ("vlm_bench reducers", reducer)
        engine.generate(image, first_question, token_budget=budget, max_new_tokens=1, frame_key=frame_key,
                        reducer=reducer)
        inputs = prepare_floor_inputs(engine, image, later_question, budget, reducer)
        rows[reducer, "engine"] = functools.partial(measure_engine_later_question, engine, image, later_question,
                                                    budget, frame_key, reducer)
        rows[reducer, "bare"] = functools.partial(measure_bare_suffix, engine, inputs)
    measured = measure_interleaved(rows, repeats, track_memory=False)
    return {reducer: {"engine_ms": measured[reducer, "engine"]["ms"], "bare_ms": measured[reducer, "bare"]["ms"]}
            for reducer in reducers}


def evaluate_targets(vision: dict, later: dict, reducers) -> list[dict]:
    stock_ms = vision[STOCK]["ms"]
    checks = []
    for reducer in reducers:
        checks.append({"reducer": reducer, **vision_target(reducer).check(_ratio(vision[reducer]["ms"], stock_ms))})
        checks.append({"reducer": reducer, **LATER_TARGET.check(
            _ratio(later[reducer]["engine_ms"], later[reducer]["bare_ms"]))})
    return checks


def _ratio(numerator, denominator) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def format_report(results: dict) -> str:
    lines = [f"vlm_bench --reducers: {results['model']} ({results['family']}) on {results['device']} "
             f"({results['dtype']}), {results['budget']} tokens, min of {results['repeats']} run(s); memory: "
             f"{results['memory_method']}", "",
             "| reducer | vision stage ms | x stock | extra peak MiB | visual tokens | reduction ms | TTFT ms "
             "| later TTFT ms | bare forward ms | x bare |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    stock = results["vision"][STOCK]
    lines.append(f"| {STOCK} | {stock['ms']:.1f} | 1.00 | {_mib(stock['peak_extra_bytes'])} | | | | | | |")
    for reducer in results["reducers"]:
        vision, first, later = (results[section][reducer] for section in ("vision", "first_question",
                                                                           "later_question"))
        lines.append(
            f"| {reducer} | {vision['ms']:.1f} | {_ratio(vision['ms'], stock['ms']):.2f} "
            f"| {_mib(vision['peak_extra_bytes'])} | {first['visual_tokens']} | {first['reduction_ms']:.2f} "
            f"| {first['ttft_ms']:.1f} | {later['engine_ms']:.1f} | {later['bare_ms']:.1f} "
            f"| {_ratio(later['engine_ms'], later['bare_ms']):.2f} |")
    lines += ["", "| target | ratio | bound | result |", "|---|---|---|---|"]
    for check in results["targets"]:
        ratio = "n/a" if check["ratio"] is None else f"{check['ratio']:.2f}"
        lines.append(f"| {check['name']} | {ratio} | {check['target']} | {check['result']} |")
    return "\n".join(lines)


def parse_reducers(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in REDUCERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown reducer(s) {', '.join(unknown) or '(none given)'}: choose from "
                                         f"{', '.join(REDUCERS)}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm_bench --reducers",
                                     description="The visual-token reducers side by side at one budget.")
    parser.add_argument("reducers", type=parse_reducers, nargs="?", default=list(REDUCERS),
                        help=f"comma-separated reducers (default: {','.join(REDUCERS)})")
    parser.add_argument("--model", help="LLaVA checkpoint directory (default: the vlm_tiny_model 'bench' preset)")
    parser.add_argument("--budget", type=int, default=64, help="visual tokens per image (default: %(default)s)")
    add_run_arguments(parser, quick_new_tokens=4)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_run_arguments(args, quick_new_tokens=4)
    if min(args.repeats, args.max_new_tokens, args.budget) < 1:
        parser.error("--repeats, --max-new-tokens and --budget must be >= 1")
    return run_and_report("vlm_bench --reducers", run, format_report, args)
