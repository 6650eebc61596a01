"""vlm_replay: evaluate token budgets on recorded drives (rosbag2), offline or against a running node.

The modules follow the flow of a run:

- ``inputs``   budgets, the questions file, the labels file, the node's params file
- ``storage``  damage-tolerant mcap / sqlite3 readers (cut recordings, overwritten bytes)
- ``bag``      the bag: its files and topics, frame identity (topic + index), selection, decoding
- ``offline``  frames straight into the node's engine, every budget, prompts sharing the prefix
- ``live``     the bag played into a running vlm_node, its services called in paced rounds
- ``results``  results.jsonl (the raw data), run.json, and what --resume checks
- ``metrics``  latency percentiles, agreement with the full budget, scores against labels
- ``report``   summary.csv, report.md and the plots, all derived from results.jsonl
- ``console``  the progress bar and warnings
- ``cli``      the command line (``main``)

Bags are read without a ROS install; only live mode needs rclpy and DDS, imported lazily.
"""
from zip_vlm_ros.replay.cli import main

__all__ = ['main']
