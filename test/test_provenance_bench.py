"""vlm_bench --provenance runs end to end on LLaVA-NeXT-7B's geometry and reports consistent numbers (the
target is its job)."""
import math

from zip_vlm_ros.bench import cli
from zip_vlm_ros.bench.provenance_bench import format_report, run_provenance_bench


def test_provenance_bench_quick_run(capsys):
    results = run_provenance_bench(budget=640, repeats=1)
    assert set(results) == {'visionzip', 'divprune', 'vispruner'}
    for reducer, row in results.items():
        assert row['visual_tokens'] == 640, reducer  # 5 crops x 128, or 640 of the 1948-token stock sequence
        assert row['reduce_ms'] > 0 and row['provenance_ms'] > 0
        assert math.isclose(row['ratio'], row['provenance_ms'] / row['reduce_ms'])
        assert row['check']['result'] in ('PASS', 'MISS')
    report = format_report(results, 640, 2)
    assert report.count('(<= 0.1x)') == 3 and '1280x720' in report
    assert cli.main(['--provenance', '--repeats', '1', '--budget', '160']) == 0
    assert 'provenance / reduction' in capsys.readouterr().out
