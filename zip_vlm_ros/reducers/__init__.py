"""Visual-token reducers: pure tensor functions, shapes in their docstrings.

They take what a vision tower produced (hidden states, attention, keys, or the projected tokens) and
return the tokens the LLM reads plus, per output token, the input positions it stands for
(``ReducedTokens``). They know nothing of vision towers, prompts, model families or ROS
(``zip_vlm_ros.models`` feeds them; ``zip_vlm_ros.engine`` decides the budget and the reducer).

- ``visionzip``: dominant tokens by CLS attention plus contextual tokens merged by key similarity
  (Yang et al., arXiv 2412.04467), matching the authors' code.
  Without CLS (Qwen2.5-VL): ``received_attention`` scores tokens by the attention they receive at a
  full-attention layer, in query chunks, and ``visionzip_scored_reduce`` keeps the top-scored ones.
- ``divprune``: greedy max-min cosine diversity over the projected tokens (Alvar et al., CVPR 2025).
- ``vispruner``: top CLS-attention tokens plus diverse ones by iterative similarity de-duplication
  (Zhang et al., ICCV 2025).
"""

from zip_vlm_ros.reducers.divprune import divprune_reduce, divprune_select
from zip_vlm_ros.reducers.received_attention import (AnchoredTokens, received_attention, select_top_scored,
                                                     visionzip_scored_reduce)
from zip_vlm_ros.reducers.reduced_tokens import REDUCERS, ReducedTokens, check_reducer_name
from zip_vlm_ros.reducers.vispruner import DEFAULT_IMPORTANT_RATIO, vispruner_reduce, vispruner_select
from zip_vlm_ros.reducers.visionzip import (
    DEFAULT_CONTEXTUAL_RATIO,
    VisionZipFeatures,
    merge_contextual,
    select_dominant,
    split_budget,
    visionzip_compress,
    visionzip_reduce,
)

__all__ = ["AnchoredTokens", "DEFAULT_CONTEXTUAL_RATIO", "DEFAULT_IMPORTANT_RATIO", "REDUCERS", "ReducedTokens",
           "VisionZipFeatures", "check_reducer_name", "divprune_reduce", "divprune_select", "merge_contextual",
           "received_attention", "select_dominant", "select_top_scored", "split_budget", "vispruner_reduce",
           "vispruner_select", "visionzip_compress", "visionzip_reduce", "visionzip_scored_reduce"]
