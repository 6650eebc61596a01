"""vlm_bench on the tiny checkpoint: every section and row is present with sane numbers.

No timing assertions: the tiny model's timings are noise; the targets are checked by running the
benchmark on the bench preset, not here.
"""

import argparse
import json

import numpy as np
import pytest
import torch

from zip_vlm_ros.bench import cli, harness as bench_harness, inputs
from zip_vlm_ros.bench import engine_bench as bench

BUDGETS = {"full": 16, "12": 12, "8": 8, "4": 4}  # tiny preset: 16 visual tokens


@pytest.fixture(scope="module")
def quick_run(tiny_model_dir, tmp_path_factory):
    json_path = tmp_path_factory.mktemp("bench") / "out" / "bench.json"
    exit_code = cli.main(["--model", str(tiny_model_dir), "--quick", "--budgets", ",".join(BUDGETS),
                            "--target-budget", "8", "--json", str(json_path)])
    assert exit_code == 0
    return json.loads(json_path.read_text())


def test_every_budget_row_has_expected_tokens_and_positive_times(quick_run):
    assert quick_run["repeats"] == 1 and quick_run["floor_repeats"] == 1 and quick_run["max_new_tokens"] == 4
    assert [row["budget"] for row in quick_run["budgets"]] == list(BUDGETS)
    for row in quick_run["budgets"]:
        assert row["visual_tokens"] == BUDGETS[row["budget"]]
        assert row["reduction"] == ("none" if row["budget"] == "full" else "visionzip")
        assert row["vision_ms"] > 0 and row["prefill_ms"] > 0
        assert row["ttft_ms"] >= row["vision_ms"] + row["reduction_ms"] + row["prefill_ms"] > 0
        assert row["total_ms"] >= row["ttft_ms"]
        assert 1 <= row["generated_tokens"] <= 4
        assert row["peak_extra_bytes"] is not None and row["peak_extra_bytes"] >= 0
    assert all(row["reduction_ms"] > 0 for row in quick_run["budgets"] if row["budget"] != "full")


def test_kv_cache_grows_by_the_same_bytes_per_visual_token(quick_run):
    kv = {row["budget"]: row["kv_cache_bytes"] for row in quick_run["budgets"]}
    assert kv["4"] < kv["8"] < kv["12"] < kv["full"]
    per_token = (kv["full"] - kv["4"]) / (16 - 4)
    assert per_token == (kv["12"] - kv["8"]) / (12 - 8) > 0
    # The stock prompt (text + 16 visual tokens) is held at the same cost per token.
    stock = quick_run["stock_generate"]
    assert stock["kv_cache_bytes"] == per_token * stock["prompt_tokens"]


def test_stock_generate_row(quick_run):
    stock = quick_run["stock_generate"]
    assert stock["visual_tokens"] == 16 and stock["reduction"] == "none"
    assert stock["prompt_tokens"] > 16
    assert stock["ttft_ms"] >= stock["vision_ms"] > 0 and stock["prefill_ms"] > 0
    assert stock["total_ms"] >= stock["ttft_ms"]


def test_vision_stage_side_by_side(quick_run):
    assert set(quick_run["vision_stage"]) == {"stock", "visionzip", "reference"}
    for variant in quick_run["vision_stage"].values():
        assert variant["ms"] > 0 and variant["peak_extra_bytes"] >= 0


def test_frame_questions_with_and_without_reuse(quick_run):
    rows = {(row["budget"], row["reuse"]): row for row in quick_run["frame_questions"]}
    assert set(rows) == {("full", False), ("full", True), ("8", False), ("8", True)}
    for (budget, reuse), row in rows.items():
        assert row["total_ms"] > 0
        ttfts = [row[f"q{i}_ttft_ms"] for i in range(1, 6)]
        assert all(ttft > 0 for ttft in ttfts)
        assert row["ttft_sum_ms"] == pytest.approx(sum(ttfts))
        assert [row[f"q{i}_prefix_reused"] for i in range(1, 6)] == [False] + [reuse] * 4


def test_floor_rows_compare_the_engine_with_bare_calls_over_the_same_tokens(quick_run):
    rows = {(row["kind"], row["budget"]): row for row in quick_run["floors"]}
    decodes = {row["budget"]: row["generated_tokens"] for row in quick_run["budgets"]}["8"] > 1
    assert set(rows) == {("first", "8"), ("later", "full"), ("later", "8")} | ({("decode", "8")} if decodes else set())
    # The first question's forward reads the stock prompt with 8 visual tokens instead of 16.
    assert rows["first", "8"]["tokens"] == quick_run["stock_generate"]["prompt_tokens"] - 16 + 8
    # A later question's forward reads its own tokens only, whatever the budget.
    assert rows["later", "full"]["tokens"] == rows["later", "8"]["tokens"] < rows["first", "8"]["tokens"] - 8
    for row in rows.values():
        assert row["engine_ms"] > 0 and row["bare_ms"] > 0
        assert row["engine_median_ms"] >= row["engine_ms"] and row["bare_median_ms"] >= row["bare_ms"]


def test_runs_are_summarized_by_their_minimum_and_median():
    runs = [{"ms": 3.0, "text": "a", "peak": None, "steps": 4},
            {"ms": 1.0, "text": "a", "peak": 7, "steps": 4},
            {"ms": 2.0, "text": "b", "peak": 5, "steps": 4}]
    assert bench_harness.fieldwise(runs, min) == {"ms": 1.0, "text": None, "peak": None, "steps": 4}
    assert bench_harness.fieldwise(runs[:2], max) == {"ms": 3.0, "text": "a", "peak": None, "steps": 4}
    calls = iter(range(10))
    measured = bench_harness.measure_interleaved({"row": lambda: {"ms": [5.0, 9.0, 4.0, 6.0, 8.0][next(calls)]}},
                                         repeats=4, track_memory=False)
    # The first call is the warm-up; the four timed runs are 9, 4, 6, 8.
    assert measured == {"row": {"ms": 4.0, "median": {"ms": 7.0}}}


def test_targets_are_all_evaluated(quick_run, capsys):
    names = [target["name"] for target in quick_run["targets"]]
    assert names == [target.name for target in bench.TARGETS.values()]
    for target in quick_run["targets"]:
        assert target["result"] in ("PASS", "MISS", "N/A")
        assert (target["ratio"] is None) == (target["result"] == "N/A")
    # Only the memory ratio may be undefined (the tiny tower's stages can fit in already-mapped pages).
    assert all(t["ratio"] is not None for t in quick_run["targets"] if "memory" not in t["name"])
    report = bench.format_report(quick_run)
    assert "ratios vs targets:" in report and "stock generate" in report and "floors:" in report


def test_peak_memory_counts_memory_freed_and_allocated_again():
    for _ in range(3):  # the same 8 MiB block again and again must be counted every time
        with bench_harness.PeakMemory(torch.device("cpu")) as peak:
            block = torch.ones(2 * 2**20)  # 8 MiB of float32
            del block
        assert peak.extra_bytes >= 7 * 2**20


def test_parse_budgets():
    assert bench.parse_budgets("full, 192,064") == ["full", "192", "64"]
    assert bench.parse_budgets("full,25%,010%") == ["full", "25%", "10%"]
    for bad, message in (("", "at least one"), ("full,0", "'0'"), ("64,abc", "'abc'"), ("64,064", "repeat"),
                         ("0%", "'0%'"), ("101%", "'101%'"), ("25%,025%", "repeat")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            bench.parse_budgets(bad)
    # a share of the frame's full count, rounded, at least one token
    assert [bench.resolve_budget(label, 1196) for label in ("full", "25%", "10%", "64", "1%")] == [1196, 299, 120, 64, 12]
    assert bench.resolve_budget("1%", 32) == 1


def test_bad_arguments_and_model_fail_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(tmp_path), "--budgets", "full,-3"])
    assert exit_info.value.code == 2
    assert "'-3'" in capsys.readouterr().err
    assert cli.main(["--model", str(tmp_path / "missing"), "--quick"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("vlm_bench: ") and "does not exist" in error and "\n" not in error


def test_llava_next_run_reports_crops_full_count_and_its_targets(tiny_next_model_dir, tmp_path):
    json_path = tmp_path / "next.json"
    exit_code = cli.main(["--model", str(tiny_next_model_dir), "--quick", "--budgets", "full,40,20",
                            "--target-budget", "20", "--image", "coffee-720p", "--no-questions",
                            "--json", str(json_path)])
    assert exit_code == 0
    results = json.loads(json_path.read_text())
    # 1280x720 on tiny-next: base + 2x2 grid; 16 base patches + 4 unpadded rows of 8 patches + 4 newlines.
    assert (results["family"], results["crops"], results["image_size"]) == ("llava_next", 5, [720, 1280])
    assert results["visual_tokens_full"] == 52 == results["stock_generate"]["visual_tokens"]
    assert {row["budget"]: row["visual_tokens"] for row in results["budgets"]} == {"full": 52, "40": 40, "20": 20}
    assert set(results["vision_stage"]) == {"stock", "visionzip", "reference"}
    assert results["frame_questions"] == []
    verdicts = {target["name"]: target["result"] for target in results["targets"]}
    assert verdicts["summed TTFT of 5 questions, full no reuse / VisionZip with reuse"] == "N/A"
    assert "N/A" not in verdicts["LLM prefill speed-up, stock generate / VisionZip"]
    assert "questions on one frame" not in bench.format_report(results)
    bounds = {target["name"]: target["target"] for target in results["targets"]}
    assert bounds["LLM prefill speed-up, stock generate / VisionZip"] == ">= 8x"
    assert bounds["frame KV-cache bytes, VisionZip / full tokens"] == "<= 0.07x"


def test_qwen_run_reports_shares_of_the_frame_full_count_and_its_targets(tiny_qwen_model_dir, tmp_path):
    json_path = tmp_path / "qwen.json"
    exit_code = cli.main(["--model", str(tiny_qwen_model_dir), "--quick", "--image", "coffee-720p", "--no-questions",
                          "--json", str(json_path)])
    assert exit_code == 0
    results = json.loads(json_path.read_text())
    # 1280x720 on tiny-qwen2.5-vl (max_pixels 36 * 28 * 28): resized to 112x224, a 4x8 grid of merged tokens
    assert (results["family"], results["crops"], results["image_size"]) == ("qwen2_5_vl", 1, [720, 1280])
    assert results["visual_tokens_full"] == 32 == results["stock_generate"]["visual_tokens"]
    # the Qwen defaults: full, 25% and 10% of the frame's full count, VisionZip (received attention) below it
    rows = {row["budget"]: (row["visual_tokens"], row["reduction"]) for row in results["budgets"]}
    assert rows == {"full": (32, "none"), "25%": (8, "visionzip"), "10%": (3, "visionzip")}
    assert results["target_budget"] == "25%" and results["target_tokens"] == 8
    assert set(results["vision_stage"]) == {"stock", "visionzip"}  # no reference-style row: that is CLIP code
    assert {(row["kind"], row["budget"]) for row in results["floors"]} == {
        ("first", "25%"), ("later", "full"), ("later", "25%"), ("decode", "25%")}
    assert all(row["engine_ms"] > 0 and row["bare_ms"] > 0 for row in results["floors"])
    bounds = {target["name"]: (target["target"], target["result"]) for target in results["targets"]}
    assert bounds["LLM prefill speed-up, stock generate / VisionZip"][0] == ">= 3.5x"
    assert bounds["time to first token speed-up, stock generate / VisionZip"][0] == ">= 3x"
    assert bounds["frame KV-cache bytes, VisionZip / full tokens"][0] == "<= 0.3x"
    assert bounds["vision stage time, VisionZip / stock features"][0] == "<= 1.15x"
    assert bounds["vision stage speed-up, reference-style / VisionZip"][1] == "N/A"
    assert all(result != "N/A" for name, (_, result) in bounds.items()
               if "reference" not in name and "questions" not in name)
    report = bench.format_report(results)
    assert "VisionZip at 8 tokens" in report and "reference-style (eager" not in report


def test_720p_frames_are_16_by_9_crops_of_the_photos():
    frame = inputs.bench_image("coffee-720p")
    assert frame.shape == (720, 1280, 3) and frame.dtype == np.uint8
    assert inputs.bench_image("coffee").shape == (400, 600, 3)
