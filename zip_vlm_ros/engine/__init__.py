"""The inference engine: model loading, token reduction and generation, with no ROS.

    from zip_vlm_ros.engine import EngineConfig, VlmEngine
    engine = VlmEngine(EngineConfig(model="llava-hf/llava-1.5-7b-hf", token_budget=64))
    print(engine.generate(rgb_image, "What is in front of the robot?").text)

Modules: ``vlm_engine`` (``VlmEngine``: the public API and how a request flows), ``config``, ``requests``
(argument checks, ``ImageInput``), ``prompts``, ``generation`` (prefill and decode), ``batching``
(concurrent requests decoded together), ``multi_image``,
``sampling``, ``streaming``, ``prefix_cache``, ``devices``, ``outputs``. Model families are in
``zip_vlm_ros.models``, reducers in ``zip_vlm_ros.reducers``.
"""

from zip_vlm_ros.engine.batching import BatchRequest, DecodeBatch
from zip_vlm_ros.engine.config import EngineConfig
from zip_vlm_ros.engine.outputs import GenerationStopped, ImageTokens, OnToken, ShouldStop, VlmOutput
from zip_vlm_ros.engine.prompts import DEFAULT_DESCRIBE_PROMPT
from zip_vlm_ros.engine.requests import ImageInput
from zip_vlm_ros.engine.sampling import SamplingOptions
from zip_vlm_ros.engine.streaming import StreamedText
from zip_vlm_ros.engine.vlm_engine import VlmEngine
from zip_vlm_ros.errors import EngineError, ModelLoadError, RequestError

__all__ = [
    "BatchRequest",
    "DecodeBatch",
    "DEFAULT_DESCRIBE_PROMPT",
    "EngineConfig",
    "EngineError",
    "GenerationStopped",
    "ImageInput",
    "ImageTokens",
    "ModelLoadError",
    "OnToken",
    "RequestError",
    "SamplingOptions",
    "ShouldStop",
    "StreamedText",
    "VlmEngine",
    "VlmOutput",
]
