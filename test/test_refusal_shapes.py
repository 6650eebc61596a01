"""Bare rclpy services of the node's shapes (executor, callback kind, entities) refuse every caller of a burst."""
from zip_vlm_ros.bench.refusal_shapes import SHAPES, measure_shapes


def test_every_shape_refuses_every_caller_of_each_burst():
    results = measure_shapes(callers=5, bursts=2, entities=3, model_dir=None)
    assert sorted(results) == sorted(f'/{name}/zip_vlm/ask' for name in SHAPES)
    for row in results.values():
        assert row['refusals'] == 10 and row['lost'] == 0
        assert 0 < row['p50'] <= row['p95']
