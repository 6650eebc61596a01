"""The node benchmark runs end to end and reports consistent numbers (the targets are its job)."""
import math

from zip_vlm_ros.bench.node_bench import format_report, run_node_bench


def test_node_bench_quick_run(tiny_model_dir, tmp_path):
    results = run_node_bench(tiny_model_dir, requests=5, callback_frames=10, stream_s=1.5, bursts=1, cancels=2,
                             streamed_goals=3, intake_s=2.0,
                             log_path=tmp_path / 'node.log')
    for key in ('round_trip_ms_p50', 'engine_ms_p50', 'callback_us_p50', 'deserialize_ms_p50',
                'dds_callback_us_p50'):
        assert math.isfinite(results[key]) and results[key] > 0, key
    assert results['round_trip_ms_p50'] > results['engine_ms_p50'] > 0
    assert 0 < results['overlay_ms_p50'] <= results['overlay_ms_p95'] and results['overlay_engine_ms'] > 0
    assert results['overhead_ms_p50'] > 0
    assert results['callback_us_p95'] <= results['callback_us_max']
    assert results['dds_frames_published'] >= 10 and results['dds_frames_received'] >= 1
    assert results['refusals'] >= 1 and results['burst_lost'] == 0
    assert 0 < results['refusal_ms_p50'] <= results['refusal_ms_p95']
    assert 0 <= results['cancel_ms_p50'] <= results['cancel_ms_p95'] and results['decode_step_ms'] > 0
    # streaming: the first feedback comes after the engine's first token, a cancel is answered
    assert results['first_feedback_ms_p50'] > results['first_feedback_overhead_ms_p50']
    assert results['stream_ttft_ms_p50'] > 0 and results['stream_decode_step_ms'] > 0
    assert 0 < results['goal_cancel_ms_p50'] <= results['goal_cancel_ms_p95']
    assert set(results['passed']) == set(results['targets']) == {
        'overhead_ms_p50', 'callback_us_p50', 'refusal_ms_p95', 'cancel_ms_p95',
        'first_feedback_overhead_ms_p50', 'goal_cancel_ms_p95', 'intake_ratio_min'}
    # frame intake: every load ran, the callers' requests were answered, the ratios are fractions
    assert set(results['intake']) == {'idle', 'refusals', 'asks'}
    for load, intake in results['intake'].items():
        assert 0 < intake['ratio_min'] <= intake['ratio_mean'] <= 1.0, (load, intake)
        assert intake['published_per_camera'] >= 10
        assert (intake['requests_per_s'] > 0) == (load != 'idle'), (load, intake)
    report = format_report(results)
    assert 'node overhead = round trip - engine' in report and 'cancel latency' in report
    assert 'publish_visual_tokens on: overlay per result, 1920x1080' in report
    assert 'first feedback - engine TTFT' in report and 'cancel sent to result received' in report
    assert 'frames received / published, 6 cameras at 10 Hz, refusals' in report
    assert report.count('PASS') + report.count('MISS') == 8
