"""vlm_bench --multi-image on the tiny checkpoint: both comparisons run and report consistent numbers.

No timing assertions (the tiny model's timings are noise): the ratios are judged on the bench preset.
"""
import json

import pytest

from zip_vlm_ros.bench import cli

FULL = 16  # tiny preset: visual tokens of one image


@pytest.fixture(scope="module")
def quick_run(tiny_model_dir, tmp_path_factory):
    json_path = tmp_path_factory.mktemp("multi_image_bench") / "bench.json"
    assert cli.main(["--multi-image", "--model", str(tiny_model_dir), "--quick", "--total-budget", "48",
                       "--json", str(json_path)]) == 0
    return json.loads(json_path.read_text())


def test_surround_row_reads_the_total_budget_over_six_images(quick_run):
    surround, single = quick_run["surround"]["surround"], quick_run["surround"]["one full frame"]
    assert (surround["images"], surround["visual_tokens"]) == (6, 48)
    assert (single["images"], single["visual_tokens"]) == (1, FULL)
    assert surround["ttft_ms"] > 0 and single["ttft_ms"] > 0
    ratios = quick_run["ratios"]
    assert ratios["surround_ttft_vs_one_full_frame"] == pytest.approx(surround["ttft_ms"] / single["ttft_ms"])
    # The KV cache grows with the prompt: 48 visual tokens plus six labels against 16 tokens.
    assert ratios["surround_kv_bytes_vs_one_full_frame"] > 1


def test_history_row_encodes_only_the_new_frame(quick_run):
    history, single = quick_run["history"]["history"], quick_run["history"]["one frame"]
    assert (history["images"], history["visual_tokens"]) == (4, 4 * 8)
    assert (single["images"], single["visual_tokens"]) == (1, 8)
    assert history["vision_ms"] > 0 and single["vision_ms"] > 0
    assert quick_run["ratios"]["history_vision_vs_one_frame"] == pytest.approx(
        history["vision_ms"] / single["vision_ms"])


def test_the_report_states_both_comparisons(tiny_model_dir, capsys):
    assert cli.main(["--multi-image", "--model", str(tiny_model_dir), "--quick", "--total-budget", "48",
                       "--cameras", "3", "--history-frames", "2"]) == 0
    report = capsys.readouterr().out
    assert "3 cameras at 48 tokens" in report and "2-frame history with 1 frames seen" in report
    assert "target <= 1.3" in report
