"""vlm_bench --mini on the tiny presets: every row runs and the memory numbers follow from the geometry."""
import json

import pytest

from zip_vlm_ros.bench import cli


@pytest.fixture(scope="module")
def mini_run(tiny_mini_model_dir, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_mini") / "mini.json"
    exit_code = cli.main(["--mini", "--mini-model", str(tiny_mini_model_dir), "--llava-model",
                            str(tiny_model_dir), "--quick", "--device", "cpu", "--json", str(out)])
    assert exit_code == 0
    return json.loads(out.read_text())


def test_rows_side_by_side_with_their_visual_tokens(mini_run):
    rows = {row["row"]: row for row in mini_run["rows"]}
    # The tiny LLaVA has 16 visual tokens: its "64" row is clamped to them.
    assert {label: row["memory"]["visual_tokens"] for label, row in rows.items()} == \
        {"LLaVA-1.5 full": 16, "LLaVA-1.5 64": 16, "LLaVA-Mini": 1}
    assert rows["LLaVA-Mini"]["first"]["reduction"] == "llava-mini"
    for row in rows.values():
        assert row["first"]["ttft_ms"] > 0 and row["later"]["ttft_ms"] > 0
        assert row["later"]["total_ms"] >= row["later"]["ttft_ms"]


def test_kv_bytes_follow_the_token_counts_and_pre_fusion_is_held_too(mini_run):
    rows = {row["row"]: row for row in mini_run["rows"]}
    mini, full = rows["LLaVA-Mini"]["memory"], rows["LLaVA-1.5 full"]["memory"]
    # tiny and tiny-mini share the Llama geometry: one token's KV against sixteen.
    assert mini["visual_kv_bytes"] * 16 == full["visual_kv_bytes"]
    kv_ratio = mini_run["ratios"][0]
    assert kv_ratio["ratio"] == pytest.approx(1 / 16) and kv_ratio["result"] == "MISS"  # 1 % needs 576 patches
    assert mini["held_bytes"] > mini["prefix_kv_bytes"]  # the frame's pre-fusion keys/values
    assert 0 < mini_run["prefusion"]["share"] < 1
