"""The refusal profiler drives the node's ~/ask callback in-process: every call is a "busy" refusal."""
import cProfile
import pstats

from zip_vlm_ros.bench.refusal_profile import refusal_cost_us


def test_refusals_are_timed_and_profiled(tiny_model_dir):
    profile = cProfile.Profile()
    cost_us = refusal_cost_us(str(tiny_model_dir), 20, profile)
    assert cost_us > 0
    stats = pstats.Stats(profile).stats  # (file, line, function) -> (calls, ...)
    calls = {function: entry[0] for (_, _, function), entry in stats.items()}
    assert calls['_serve'] == 20 and calls['submit'] == 20
