"""vlm_bench --concurrent on the tiny checkpoint: both modes answer the same requests, the JSON keeps the
issue's fields, and bad arguments fail with one line."""
import json

import pytest

from zip_vlm_ros.bench import cli, concurrent_bench
from zip_vlm_ros.engine import EngineConfig, VlmEngine


@pytest.fixture(scope="module")
def quick_run(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("concurrent") / "concurrent.json"
    assert cli.main(["--concurrent", "3", "--model", str(tiny_model_dir), "--quick", "--token-budget", "8",
                     "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_json_reports_both_modes_side_by_side(quick_run):
    concurrent = quick_run["concurrent"]
    assert concurrent["requests"] == 3 and len(set(concurrent["images"])) == 3
    assert concurrent["tokens_per_s_batched"] == concurrent["batched"]["tokens_per_s"] > 0
    assert concurrent["tokens_per_s_serial"] == concurrent["serial"]["tokens_per_s"] > 0
    for mode in ("batched", "serial"):
        row = concurrent[mode]
        assert row["tokens_per_s"] == pytest.approx(row["generated_tokens"] / (row["wall_ms"] / 1e3))
        assert row["requests"] == 3 and 3 <= row["generated_tokens"] <= 3 * 4
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p95_ms"] <= row["total_p95_ms"] <= row["wall_ms"]
    # The same requests: greedy answers of the same lengths in both modes.
    assert concurrent["batched"]["generated_tokens"] == concurrent["serial"]["generated_tokens"]
    assert [target["name"] for target in quick_run["targets"]] == [concurrent_bench.SINGLE_TARGET.name]
    # One linear layer's time for each batch size up to the requests (JSON keys are strings).
    # by both kernels: F.linear's and the engine's
    assert sorted(quick_run["linear_rows_ms"]) == ["F.linear", "engine"]
    for linear in quick_run["linear_rows_ms"].values():
        assert sorted(linear) == ["1", "2", "3"] and all(ms > 0 for ms in linear.values())


def test_both_modes_generate_the_same_tokens(tiny_model_dir):
    engine = VlmEngine(EngineConfig(model=str(tiny_model_dir), device="cpu"))
    try:
        requests = concurrent_bench.workload(4)
        batched = concurrent_bench.measure_batched(engine, requests, 8, 6)
        serial = concurrent_bench.measure_serial(engine, requests, 8, 6)
    finally:
        engine.close()
    assert batched["generated_tokens"] == serial["generated_tokens"]
    # Serially the last request waits for every answer before it; batched, the first tokens come together.
    assert serial["ttft_p95_ms"] > serial["ttft_p50_ms"]


def test_bad_arguments_fail_with_one_line(tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--concurrent", "0", "--model", str(tiny_model_dir)])
    assert "--concurrent" in capsys.readouterr().err
