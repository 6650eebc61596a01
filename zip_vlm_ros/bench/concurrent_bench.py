"""``vlm_bench --concurrent N``: N concurrent requests decoded together (``DecodeBatch``) against the same N
requests one at a time, side by side in one run.

Each request asks a different question about a different frame (the ``skimage`` photos and their 720p
camera frames, in turn) for ``--max-new-tokens`` new tokens (default 32), with no prefix cache. All N are
submitted at one instant: batched, every request is prefilled as it is admitted and joins the running
batch; serially, each waits for the answers before it (``VlmEngine.generate``, the path of
``max_batch_size`` 1). Reported per mode: aggregate generated tokens per second over the whole run, and
per-request time to first token and total time from the common submission instant (p50, p95). A
second pair of rows times one request alone both ways (decode ms per token), the cost batching adds
when there is nothing to batch.

Targets: N = 4 aggregate tokens/s >= 2.5x serial; one request's decode ms/token <= 1.05x generate's.
``--json`` keeps everything, with ``concurrent.tokens_per_s_batched`` and ``concurrent.tokens_per_s_serial``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np
import torch

from zip_vlm_ros.bench.harness import (Target, add_run_arguments, measure_interleaved, resolve_run_arguments,
                                      run_and_report)
from zip_vlm_ros.bench.inputs import FRAME_QUESTIONS, IMAGES, bench_image, open_bench_engine
from zip_vlm_ros.engine import VlmEngine
from zip_vlm_ros.engine.cpu_linear import cpu_linear

__all__ = ["main", "measure_batched", "measure_serial"]

DEFAULT_NEW_TOKENS = 32
DEFAULT_BUDGET = 64
# The targets, decided on the minimum of the repeats (see harness.measure_interleaved).
SPEEDUP_TARGET = Target("aggregate tokens/s, batched / serial (4 requests)", minimum=2.5)
SINGLE_TARGET = Target("one request's decode ms/token, batch of one / generate", maximum=1.05)


def workload(count: int) -> list[tuple[str, np.ndarray, str]]:
    """`count` requests: (image name, frame, question), each frame and question different from its neighbours'."""
    return [(IMAGES[index % len(IMAGES)], bench_image(IMAGES[index % len(IMAGES)]),
             FRAME_QUESTIONS[index % len(FRAME_QUESTIONS)]) for index in range(count)]


def _summary(clock_start: float, first_tokens: list[float], ends: list[float], generated: list[int]) -> dict:
    """Aggregate tokens/s and per-request TTFT / total percentiles, all from the common submission instant."""
    ttft = [(first - clock_start) * 1e3 for first in first_tokens]
    total = [(end - clock_start) * 1e3 for end in ends]
    wall_ms = max(total)
    return {"requests": len(ends), "generated_tokens": sum(generated), "wall_ms": wall_ms,
            "tokens_per_s": sum(generated) / (wall_ms / 1e3),
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p95_ms": float(np.percentile(ttft, 95)),
            "total_p50_ms": float(np.percentile(total, 50)), "total_p95_ms": float(np.percentile(total, 95))}


def measure_batched(engine: VlmEngine, requests: list, budget: int, max_new_tokens: int) -> dict:
    """All requests submitted at once and decoded together (one DecodeBatch with a row for each)."""
    clock = engine.clock
    first_tokens: dict[int, float] = {}
    ends: dict[int, float] = {}
    opened = []
    for index, (_, image, question) in enumerate(requests):
        def first_token(_piece, index=index):
            first_tokens.setdefault(index, clock.now())
        opened.append(engine.open_request(image, [question], token_budget=budget, max_new_tokens=max_new_tokens,
                                          on_token=first_token))
    batch = engine.decode_batch(len(opened))
    start = clock.now()
    for request in opened:
        batch.admit(request)
    while batch:
        for request in batch.step():
            ends[opened.index(request)] = clock.now()
    failed = [request.error for request in opened if request.error is not None]
    if failed:
        raise RuntimeError(f"a batched request failed: {failed[0]!r}")
    order = range(len(opened))
    return _summary(start, [first_tokens[i] for i in order], [ends[i] for i in order],
                    [opened[i].outputs[0].generated_tokens for i in order])


def measure_serial(engine: VlmEngine, requests: list, budget: int, max_new_tokens: int) -> dict:
    """The same requests submitted at once and answered one at a time (``generate``)."""
    clock = engine.clock
    start = clock.now()
    first_tokens, ends, generated = [], [], []
    for _, image, question in requests:
        seen = []
        output = engine.generate(image, question, token_budget=budget, max_new_tokens=max_new_tokens,
                                 on_token=lambda _piece: seen.append(clock.now()) if not seen else None)
        first_tokens.append(seen[0])
        ends.append(clock.now())
        generated.append(output.generated_tokens)
    return _summary(start, first_tokens, ends, generated)


def measure_single_decode(engine: VlmEngine, request: tuple, budget: int, max_new_tokens: int,
                          batched: bool) -> dict:
    """Decode ms per token of one request alone: a DecodeBatch of one row, or ``generate``."""
    _, image, question = request
    if batched:
        opened = engine.open_request(image, [question], token_budget=budget, max_new_tokens=max_new_tokens)
        batch = engine.decode_batch(1)
        batch.admit(opened)
        while batch:
            batch.step()
        output = opened.outputs[0]
    else:
        output = engine.generate(image, question, token_budget=budget, max_new_tokens=max_new_tokens)
    return {"generated_tokens": output.generated_tokens,
            "decode_ms_per_token": output.decode_ms / max(1, output.generated_tokens - 1)}


def measure_linear_rows(engine: VlmEngine, max_rows: int, repeats: int, calls: int = 10) -> dict[str, dict[int, float]]:
    """Milliseconds of one of the LLM's largest linear layers (its first MLP up-projection) on 1..`max_rows`
    rows, interleaved, minimum of `repeats`, as ``F.linear`` computes it and as the engine does
    (``cpu_linear``): what one decode step's matrix products cost per batch size.

    A decode step is mostly these products; when the per-call time grows with the rows, batching gains
    less than "read the weights once per step" suggests (on CPU the BLAS kernel changes with the rows).
    """
    weight = max((module.weight for module in engine.model.modules() if isinstance(module, torch.nn.Linear)),
                 key=lambda weight: weight.numel())                                     # [out, in]
    inputs = torch.randn(max_rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    kernels = {"F.linear": torch.nn.functional.linear, "engine": cpu_linear}
    times = {(kernel, rows): [] for rows in range(1, max_rows + 1) for kernel in kernels}
    clock = engine.clock
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up
            for (kernel, rows), samples in times.items():
                linear = kernels[kernel]
                start = clock.now()
                for _ in range(calls):
                    linear(inputs[:rows], weight, None)
                samples.append(clock.ms_since(start) / calls)
    return {kernel: {rows: min(samples[1:]) for (name, rows), samples in times.items() if name == kernel}
            for kernel in kernels}


def run_benchmark(args) -> dict:
    engine = open_bench_engine(args)
    try:
        load_at_start = os.getloadavg()[0]
        budget = engine.check_budget(args.token_budget)
        requests = workload(args.concurrent)
        measured = measure_interleaved({
            "batched": functools.partial(measure_batched, engine, requests, budget, args.max_new_tokens),
            "serial": functools.partial(measure_serial, engine, requests, budget, args.max_new_tokens),
        }, args.repeats, track_memory=False)
        for row in (*measured.values(), *(row["median"] for row in measured.values())):
            # The field-wise minimum of tokens/s would be the slowest run's: take it from the least
            # disturbed run's wall time instead, as every other ratio here does.
            row["tokens_per_s"] = row["generated_tokens"] / (row["wall_ms"] / 1e3)
        single = measure_interleaved({
            mode: functools.partial(measure_single_decode, engine, requests[0], budget, args.max_new_tokens,
                                    mode == "batch of one")
            for mode in ("batch of one", "generate")}, args.repeats, track_memory=False)
        linear_rows = measure_linear_rows(engine, args.concurrent, args.repeats)
        speedup = measured["batched"]["tokens_per_s"] / measured["serial"]["tokens_per_s"]
        single_ratio = (single["batch of one"]["decode_ms_per_token"] / single["generate"]["decode_ms_per_token"])
        targets = [SINGLE_TARGET.check(single_ratio)]
        if args.concurrent == 4:
            targets.insert(0, SPEEDUP_TARGET.check(speedup))
        return {
            "model": args.model, "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
            "torch_threads": torch.get_num_threads(), "repeats": args.repeats, "token_budget": budget,
            "max_new_tokens": args.max_new_tokens,
            "concurrent": {"requests": args.concurrent, "images": [name for name, _, _ in requests],
                           "tokens_per_s_batched": measured["batched"]["tokens_per_s"],
                           "tokens_per_s_serial": measured["serial"]["tokens_per_s"], "speedup": speedup,
                           "batched": measured["batched"], "serial": measured["serial"]},
            "single_request": {**single, "ratio": single_ratio},
            "linear_rows_ms": linear_rows,
            "targets": targets,
            "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
        }
    finally:
        engine.close()


def format_report(results: dict) -> str:
    concurrent = results["concurrent"]
    lines = [f"vlm_bench --concurrent {concurrent['requests']}: {results['model']} on {results['device']} "
             f"({results['dtype']}, {results['torch_threads']} threads), token_budget {results['token_budget']}, "
             f"{results['max_new_tokens']} new tokens, min of {results['repeats']} runs",
             "",
             f"{'mode':<10} {'tokens/s':>9} {'tokens':>7} {'wall ms':>9} {'TTFT p50':>9} {'TTFT p95':>9} "
             f"{'total p50':>10} {'total p95':>10}"]
    for mode in ("batched", "serial"):
        row = concurrent[mode]
        lines.append(f"{mode:<10} {row['tokens_per_s']:>9.1f} {row['generated_tokens']:>7} {row['wall_ms']:>9.0f} "
                     f"{row['ttft_p50_ms']:>9.0f} {row['ttft_p95_ms']:>9.0f} {row['total_p50_ms']:>10.0f} "
                     f"{row['total_p95_ms']:>10.0f}")
    lines.append(f"aggregate speedup batched / serial: {concurrent['speedup']:.2f}x")
    lines += ["", f"{'one request alone':<18} {'decode ms/token':>16}"]
    for mode in ("batch of one", "generate"):
        lines.append(f"{mode:<18} {results['single_request'][mode]['decode_ms_per_token']:>16.2f}")
    lines.append(f"ratio: {results['single_request']['ratio']:.3f}")
    lines += ["", "largest linear layer, ms per call by rows (x: against 1 row by F.linear):"]
    by_kernel = results["linear_rows_ms"]
    one_row = by_kernel["F.linear"][1]
    for kernel, linear in by_kernel.items():
        lines.append(f"  {kernel:<13} " + "  ".join(f"{rows}: {ms:.1f} ({ms / one_row:.2f}x)"
                                                   for rows, ms in linear.items()))
    lines += ["", "targets:"]
    for target in results["targets"]:
        lines.append(f"  {target['name']}: {target['ratio']:.2f}x (target {target['target']}) {target['result']}")
    load = results["load_average_1min"]
    lines.append(f"\nload average (1 min): {load['start']:.2f} at start, {load['end']:.2f} at end")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="vlm_bench --concurrent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrent", type=int, required=True, help="requests submitted at once (N >= 1)")
    parser.add_argument("--model", help="LLaVA checkpoint directory (default: the vlm_tiny_model bench preset)")
    parser.add_argument("--token-budget", type=int, default=DEFAULT_BUDGET,
                        help="visual tokens per request (default: %(default)s)")
    add_run_arguments(parser, quick_new_tokens=4)
    args = parser.parse_args(argv)
    if args.max_new_tokens is None and not args.quick:
        args.max_new_tokens = DEFAULT_NEW_TOKENS
    resolve_run_arguments(args, quick_new_tokens=4)
    if min(args.concurrent, args.repeats, args.max_new_tokens, args.token_budget) < 1:
        parser.error("--concurrent, --repeats, --max-new-tokens and --token-budget must be >= 1")
    return run_and_report("vlm_bench --concurrent", run_benchmark, format_report, args)


if __name__ == "__main__":
    sys.exit(main())
