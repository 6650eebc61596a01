"""vlm_bench --reducers on the tiny checkpoint: every reducer gets its rows and targets, consistent with the
numbers measured. No timing assertions (the tiny model's timings are noise): targets are judged on the bench
preset."""
import json

import pytest

from zip_vlm_ros.bench import cli

BUDGET = 8  # of the tiny preset's 16 visual tokens


@pytest.fixture(scope="module")
def quick_run(tiny_model_dir, tmp_path_factory):
    json_path = tmp_path_factory.mktemp("reducer_bench") / "bench.json"
    assert cli.main(["--reducers", "divprune,vispruner", "--model", str(tiny_model_dir), "--quick",
                     "--budget", str(BUDGET), "--json", str(json_path)]) == 0
    return json.loads(json_path.read_text())


def test_every_reducer_has_its_rows(quick_run):
    assert quick_run["reducers"] == ["divprune", "vispruner"]
    assert set(quick_run["vision"]) == {"stock features", "divprune", "vispruner"}
    for reducer in ("divprune", "vispruner"):
        assert quick_run["first_question"][reducer]["visual_tokens"] == BUDGET
        assert quick_run["vision"][reducer]["ms"] > 0
        later = quick_run["later_question"][reducer]
        assert later["engine_ms"] > 0 and later["bare_ms"] > 0


def test_targets_are_the_issue_bounds_computed_from_the_rows(quick_run):
    stock_ms = quick_run["vision"]["stock features"]["ms"]
    checks = {(check["reducer"], check["name"].split(",")[0]): check for check in quick_run["targets"]}
    divprune_vision = checks["divprune", "vision stage"]
    assert divprune_vision["target"] == "<= 1x"
    assert divprune_vision["ratio"] == pytest.approx(quick_run["vision"]["divprune"]["ms"] / stock_ms)
    assert checks["vispruner", "vision stage"]["target"] == "<= 1.1x"
    later = checks["vispruner", "later question TTFT / bare forward on the cached prefix"]
    rows = quick_run["later_question"]["vispruner"]
    assert later["target"] == "<= 1.25x" and later["ratio"] == pytest.approx(rows["engine_ms"] / rows["bare_ms"])


def test_unknown_reducer_is_a_usage_error(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--reducers", "holov", "--model", str(tiny_model_dir), "--quick"])
    assert exit_info.value.code == 2
    assert "unknown reducer(s) holov: choose from visionzip, divprune, vispruner" in capsys.readouterr().err
