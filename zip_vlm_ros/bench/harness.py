"""The measuring harness every benchmark here shares: interleaved repeats with the field-wise minimum
and median, the extra peak memory of a block, and targets a ratio is checked against.

Memory: on CUDA, the allocator peak (``torch.cuda.max_memory_allocated``) above what was allocated
when the stage began. On the CPU, the kernel's peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` when the stage begins) above the resident size at that moment; glibc's
``malloc_trim`` first hands free heap pages back to the OS, so a stage cannot hide its peak in memory
an earlier stage freed. CPU numbers count every page the stage touched, including the allocator's own
overhead, and are approximate to a few MiB. Peaks come from one extra run of each row between the
warm-up and the timed runs: the page faults that trimming causes would otherwise slow the timings.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import pathlib
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from zip_vlm_ros.errors import EngineError

__all__ = ["PeakMemory", "Target", "device_clock", "fieldwise", "measure_interleaved", "memory_method",
           "add_run_arguments", "print_and_save", "resolve_run_arguments", "run_and_report"]


@dataclass(frozen=True)
class Target:
    """A ratio the project promises, e.g. TTFT at 64 tokens >= 3x faster than stock."""

    name: str
    minimum: float | None = None   # ratio must be >= minimum
    maximum: float | None = None   # ratio must be <= maximum

    def check(self, ratio: float | None) -> dict:
        bound = f">= {self.minimum:g}x" if self.minimum is not None else f"<= {self.maximum:g}x"
        if ratio is None or not math.isfinite(ratio):
            verdict = "N/A"
        elif self.minimum is not None:
            verdict = "PASS" if ratio >= self.minimum else "MISS"
        else:
            verdict = "PASS" if ratio <= self.maximum else "MISS"
        return {"name": self.name, "ratio": ratio, "target": bound, "result": verdict}


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.extra_bytes``: the block's extra peak memory.

    See the module docstring for what is measured on CUDA and on the CPU. ``extra_bytes`` stays None
    when not `enabled` and where the CPU peak cannot be reset (no writable ``/proc/self/clear_refs``).
    """

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = device
        self.enabled = enabled
        self.extra_bytes: int | None = None
        self._baseline: int | None = None

    def __enter__(self) -> PeakMemory:
        if not self.enabled:
            return self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        else:
            if _GLIBC is not None:
                _GLIBC.malloc_trim(0)  # free heap pages go back to the OS, so reusing them counts
            if _reset_peak_rss():
                self._baseline = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._baseline is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status_bytes("VmHWM")
        self.extra_bytes = max(0, peak - self._baseline)


def memory_method(device: torch.device) -> str:
    """One line saying how PeakMemory measures on `device` in this process."""
    if device.type == "cuda":
        return "CUDA allocator peak above allocation at stage start (torch.cuda.max_memory_allocated)"
    if not _reset_peak_rss():
        return "unavailable: /proc/self/clear_refs cannot reset the peak RSS on this system"
    allocator = "glibc heap trimmed at stage start" if _GLIBC is not None else "heap not trimmed (not glibc)"
    return f"peak RSS (VmHWM, reset per stage) above RSS at stage start, {allocator}; one extra run per row"


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak resident set size to the current one
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(match.group(1)) * 1024


def _glibc():
    """The C library if it is glibc (has malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_GLIBC = _glibc()


def device_clock(device: torch.device) -> float:
    """perf_counter once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def fieldwise(records: list[dict], reduce) -> dict:
    """``reduce`` (min, statistics.median) of every numeric field over several runs' records; a
    non-numeric field keeps its value when all runs agree, and a field missing (None) in any run or
    differing between runs is None."""
    merged = {}
    for key, first in records[0].items():
        values = [record[key] for record in records]
        if isinstance(first, bool) or not isinstance(first, (int, float)) or any(v is None for v in values):
            merged[key] = first if all(v == first for v in values) else None
        else:
            merged[key] = reduce(values)
    return merged


def measure_interleaved(measures: dict, repeats: int, track_memory: bool = True) -> dict:
    """Per name of ``{name: measure() -> record}``: the field-wise minimum of the records, taken side by
    side, with the field-wise median under ``"median"``.

    Each measure runs once as a warm-up and, with `track_memory`, once more as
    ``measure(track_memory=True)`` for its ``peak_extra_bytes``; then `repeats` rounds call every
    measure once in turn, so a change in machine load during the run hits all of them alike instead of
    skewing one. Ratios are decided on the minimum: other processes on a shared machine only ever add
    time, so the fastest run is the least disturbed one.
    """
    for measure in measures.values():
        measure()
    peaks = {name: measure(track_memory=True)["peak_extra_bytes"] for name, measure in measures.items()
             if track_memory}
    records = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            records[name].append(measure())
    return {name: {**fieldwise(runs, min), "median": fieldwise(runs, statistics.median),
                   **({"peak_extra_bytes": peaks[name]} if track_memory else {})}
            for name, runs in records.items()}


def print_and_save(report: str, results: dict, json_path: pathlib.Path | None) -> None:
    """Print a benchmark's report and, with `json_path`, keep its results there as JSON."""
    print(report)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nresults written to {json_path}")


def add_run_arguments(parser: argparse.ArgumentParser, *, quick_new_tokens: int) -> None:
    """The options every benchmark command shares: --json, --repeats, --max-new-tokens, --device,
    --dtype and --quick (1 repeat and `quick_new_tokens` new tokens: a smoke test, not a measurement)."""
    parser.add_argument("--json", type=pathlib.Path, help="also write all results to this JSON file")
    parser.add_argument("--repeats", type=int, help="measured runs per row after one warm-up (default: 3, "
                                                    "--quick: 1)")
    parser.add_argument("--max-new-tokens", type=int, help=f"tokens to generate per answer (default: 16, "
                                                           f"--quick: {quick_new_tokens})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", help="auto, float16, bfloat16 or float32 (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"1 repeat and {quick_new_tokens} new tokens: a "
                                                             f"smoke test, not a measurement")


def resolve_run_arguments(args: argparse.Namespace, *, quick_new_tokens: int) -> None:
    """Fill --repeats and --max-new-tokens from --quick when they were not given."""
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    args.max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else (
        quick_new_tokens if args.quick else 16)


def run_and_report(prog: str, run, format_report, args: argparse.Namespace) -> int:
    """``run(args) -> results``, then print the report and keep the JSON; exit code 2 with one line
    when the engine cannot load or serve (a missing model path, say)."""
    try:
        results = run(args)
    except EngineError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    print_and_save(format_report(results), results, args.json)
    return 0
