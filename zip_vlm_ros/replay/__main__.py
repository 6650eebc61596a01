"""`python -m zip_vlm_ros.replay`: the vlm_replay command."""
import sys

from zip_vlm_ros.replay.cli import main

sys.exit(main())
