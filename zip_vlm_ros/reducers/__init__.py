"""Visual-token reducers: pure tensor functions, shapes in their docstrings.

They take what a vision tower produced (hidden states, attention, keys) and return the tokens the LLM
reads. They know nothing of vision towers, prompts, model families or ROS (``zip_vlm_ros.models``
feeds them; ``zip_vlm_ros.engine`` decides the budget).

- ``visionzip``: dominant tokens by CLS attention plus contextual tokens merged by key similarity
  (Yang et al., arXiv 2412.04467), matching the authors' code.
"""

from zip_vlm_ros.reducers.visionzip import (
    DEFAULT_CONTEXTUAL_RATIO,
    VisionZipFeatures,
    merge_contextual,
    select_dominant,
    split_budget,
    visionzip_compress,
)

__all__ = ["DEFAULT_CONTEXTUAL_RATIO", "VisionZipFeatures", "merge_contextual", "select_dominant", "split_budget",
           "visionzip_compress"]
