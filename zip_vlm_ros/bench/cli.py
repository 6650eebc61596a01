"""``vlm_bench``: one command for every benchmark; the first flag picks which.

``vlm_bench [...]``                the engine: budgets against stock generate (``engine_bench``)
``vlm_bench --node [...]``         the node's own overhead over DDS (``node_bench``)
``vlm_bench --multi-image [...]``  surround-view and history questions (``multi_image_bench``)
``vlm_bench --mini [...]``         LLaVA-Mini against LLaVA-1.5 (``mini_bench``)
``vlm_bench --concurrent N [...]`` N requests decoded together against one at a time (``concurrent_bench``)
``vlm_bench --reducers A,B [...]`` the visual-token reducers side by side at 64 tokens (``reducer_bench``)
``vlm_bench --provenance [...]``   what tracing visual tokens to frame patches costs (``provenance_bench``)
``vlm_bench --replay-ray [...]``   vlm_replay --ray, 2 workers against 1 (``ray_replay_bench``)
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]

# flag -> module of zip_vlm_ros.bench with a main(argv); imported on demand (the node bench needs rclpy)
MODES = {"--node": "node_bench", "--multi-image": "multi_image_bench", "--mini": "mini_bench",
         "--reducers": "reducer_bench", "--provenance": "provenance_bench", "--replay-ray": "ray_replay_bench"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    module = "engine_bench"
    if any(arg == "--concurrent" or arg.startswith("--concurrent=") for arg in argv):
        module = "concurrent_bench"  # the flag carries N: that module parses it
    for flag, name in MODES.items():
        if module == "engine_bench" and flag in argv:
            argv.remove(flag)
            module = name
            break
    return importlib.import_module(f"zip_vlm_ros.bench.{module}").main(argv)


if __name__ == "__main__":
    sys.exit(main())
