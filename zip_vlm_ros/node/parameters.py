"""vlm_node's parameters: their specs (default, description, runtime or not) and value checks.

Pure Python apart from the message types named by `camera.<name>.type`; the node declares, validates
and snapshots its parameters with these, and config/vlm.yaml lists the same names (a test checks).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from zip_vlm_ros.engine.devices import DEVICE_CHOICES, DTYPES
from zip_vlm_ros.engine import DEFAULT_DESCRIBE_PROMPT
from zip_vlm_ros.reducers import REDUCERS

IMAGE_TYPES = {'sensor_msgs/Image': Image, 'sensor_msgs/CompressedImage': CompressedImage}
IMAGE_QOS_CHOICES = ('sensor_data', 'reliable')


@dataclass(frozen=True)
class ParameterSpec:
    """One node parameter: its default, what it means, and whether `ros2 param set` may change it."""

    name: str
    default: Any
    description: str
    runtime: bool = False


# Every parameter of the node, in one place. config/vlm.yaml lists the same names (a test checks).
NODE_PARAMETERS = (
    ParameterSpec('model', 'llava-hf/llava-1.5-7b-hf',
                  'LLaVA-1.5 or LLaVA-NeXT checkpoint (LlavaForConditionalGeneration, '
                  'LlavaNextForConditionalGeneration) or Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): a '
                  'local directory or a hub id; LLaVA-Mini (model_type llava_mini_llama): a local directory'),
    ParameterSpec('vision_tower', '',
                  'LLaVA-Mini only: local CLIP directory (config.json, preprocessor_config.json, and '
                  'weights unless the checkpoint holds the tower) for a checkpoint whose mm_vision_tower '
                  'is a hub id; empty: mm_vision_tower as a local path or from the Hugging Face cache '
                  '(never downloaded)'),
    ParameterSpec('max_pixels', 0,
                  'Qwen2.5-VL only: the most pixels an image is resized to (its full visual-token count is '
                  'max_pixels / 784); 0: the checkpoint processor\'s max_pixels'),
    ParameterSpec('device', 'auto', 'auto (CUDA when available), cpu, cuda or cuda:N'),
    ParameterSpec('dtype', 'auto', 'auto (float16 on CUDA, float32 on CPU), float16, bfloat16 or float32'),
    ParameterSpec('cameras', ['front'],
                  'camera names; each has camera.<name>.topic and camera.<name>.type parameters'),
    ParameterSpec('image_qos', 'sensor_data',
                  'image subscription QoS: sensor_data (best effort: reliable and best-effort '
                  'publishers both reach the node) or reliable (reliable publishers only)'),
    ParameterSpec('token_budget', 64,
                  'visual tokens the LLM reads per image, kept by the reducer (1..the model\'s largest '
                  'full count: 576 for LLaVA-1.5, 2928 for LLaVA-NeXT-7B, whose crops share it evenly); '
                  'requests may override it. LLaVA-Mini: does not apply (any value >= 1 is accepted, '
                  'its trained token count is used)', runtime=True),
    ParameterSpec('reducer', 'visionzip',
                  'visual-token reducer: ' + ', '.join(REDUCERS) + ' (README "Choosing a reducer"); requests '
                  'may override it (empty in a request: this value)', runtime=True),
    ParameterSpec('dominant_ratio', 54 / 64,
                  'share of the budget given to dominant tokens (0 < r <= 1); the rest are '
                  'contextual tokens merged from the remainder'),
    ParameterSpec('max_new_tokens', 64, 'longest answer in tokens; requests may override it',
                  runtime=True),
    ParameterSpec('describe_prompt', DEFAULT_DESCRIBE_PROMPT,
                  'prompt of ~/describe_scene and of the periodic description', runtime=True),
    ParameterSpec('describe_period_s', 0.0,
                  '0: off; else describe each camera\'s latest (new) frame every this many seconds '
                  'on ~/description and ~/results', runtime=True),
    ParameterSpec('publish_visual_tokens', False,
                  'publish each single-image answer\'s overlay of the visual tokens the LLM read (kept patches '
                  'bright and outlined, merged groups tinted, the rest dimmed) on ~/visual_tokens/image '
                  '(rgb8, the source frame\'s header); false: no overlay is drawn', runtime=True),
    ParameterSpec('frame_history_length', 64,
                  'frames each camera keeps for history questions (history_frames over history_s; '
                  '1: the latest frame only); the image callback only appends a reference'),
    ParameterSpec('frame_history_bytes', 128 * 2**20,
                  'image data each camera\'s history keeps at most, in bytes (the oldest frames go first; '
                  'the latest frame is always kept)'),
    ParameterSpec('max_image_age_s', 2.0,
                  'refuse frames older than this (node clock minus image stamp; 0: no limit)'),
    ParameterSpec('max_clock_skew_s', 0.5,
                  'refuse frames stamped more than this in the future (camera clock ahead of the node\'s)'),
    ParameterSpec('max_batch_size', 4,
                  'requests decoded together (continuous batching: a waiting request joins at the next decode '
                  'step); 1: one request at a time'),
    ParameterSpec('max_pending_requests', 4,
                  'requests that may wait while max_batch_size run; more are refused at once'),
    ParameterSpec('request_timeout_s', 30.0,
                  'deadline of a request, waiting plus inference; past it the caller gets "timed out"'),
    ParameterSpec('question_max_chars', 500, 'longest accepted question or prompt, in characters'),
    ParameterSpec('service_history_depth', 100,
                  'requests each service keeps until the node takes them: a burst of more callers '
                  'than this at once loses the oldest requests in DDS (every caller is answered below it)'),
    ParameterSpec('autostart', True,
                  'configure and activate at startup; false: wait for the lifecycle services'),
)
RUNTIME_PARAMETERS = frozenset(spec.name for spec in NODE_PARAMETERS if spec.runtime)
# Settable while the node is unconfigured, so a failed configure can be corrected without a restart.
ENGINE_PARAMETERS = frozenset({'model', 'vision_tower', 'max_pixels', 'device', 'dtype'})
_TYPE_NAMES = {bool: 'true or false', int: 'a whole number', float: 'a number', str: 'a string',
               list: 'a list of strings'}
_CAMERA_NAME = re.compile(r'^[A-Za-z][A-Za-z0-9_]*$')
_DEVICE = re.compile(r'^(auto|cpu|cuda|cuda:[0-9]+)$')


def camera_parameter_specs(camera: str, index: int) -> tuple[ParameterSpec, ParameterSpec]:
    """The two parameters of one camera. The first camera reads `image_raw`, others `<name>/image_raw`."""
    topic = 'image_raw' if index == 0 else f'{camera}/image_raw'
    return (
        ParameterSpec(f'camera.{camera}.topic', topic,
                      f'image topic of camera {camera!r} (relative names resolve in the node namespace)'),
        ParameterSpec(f'camera.{camera}.type', 'sensor_msgs/Image',
                      f'message type of camera {camera!r}: {" or ".join(IMAGE_TYPES)}'),
    )


def declared_parameter_names(cameras: list[str]) -> set[str]:
    """Names the node declares for this camera list (config/vlm.yaml must list exactly these)."""
    names = {spec.name for spec in NODE_PARAMETERS}
    for index, camera in enumerate(cameras):
        names.update(spec.name for spec in camera_parameter_specs(camera, index))
    return names


class ParameterError(ValueError):
    """A parameter value the node cannot run with; str(e) names it, the value and what is valid."""


def type_problem(name: str, value: Any, default: Any) -> str | None:
    """Why `value` has the wrong type for a parameter whose default is `default`, in words, or None.

    A whole number is accepted where a number is expected (`-p request_timeout_s:=3`).
    """
    expected = type(default)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        if expected is list and not all(isinstance(item, str) for item in value):
            return f'{name} must be a list of strings, e.g. {default!r}; got {value!r}'
        return None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return None
    if expected is list and value is None:
        return None  # an empty YAML list ([]) arrives untyped; the value check reports it
    return (f'{name} must be {_TYPE_NAMES.get(expected, expected.__name__)} (e.g. {default!r}); '
            f'got {value!r} ({type(value).__name__})')


def max_new_tokens_limit(context_tokens: int, visual_tokens_full: int) -> int:
    """Longest answer the model's context holds after an image at full budget (the prompt's text and
    question come on top: the context is the hard bound, this leaves room for them)."""
    return max(1, context_tokens - visual_tokens_full)


def parameter_problem(name: str, value: Any, *, visual_tokens_full: int | None = None,
                      max_new_tokens: int | None = None, question_max_chars: int | None = None) -> str | None:
    """Why `value` is not valid for parameter `name`, or None when it is.

    visual_tokens_full: the loaded model's largest visual token count per image (bounds token_budget),
    None before load and for a model whose count is fixed by training (LLaVA-Mini: any budget >= 1).
    max_new_tokens: the loaded model's limit (``max_new_tokens_limit``), None before load.
    question_max_chars: bounds describe_prompt.
    """
    if name == 'token_budget':
        upper = visual_tokens_full
        if value < 1 or (upper is not None and value > upper):
            valid = f'1..{upper} (this model has {upper} visual tokens)' if upper else 'at least 1'
            return f'token_budget {value} is out of range: use {valid}'
    elif name == 'max_new_tokens' and max_new_tokens is not None and value > max_new_tokens:
        return (f'max_new_tokens {value} is more than the model\'s context holds after the image: '
                f'use 1..{max_new_tokens}')
    elif name == 'describe_prompt' and question_max_chars is not None and len(value.strip()) > question_max_chars:
        return (f'describe_prompt is {len(value.strip())} characters, more than question_max_chars = '
                f'{question_max_chars}: shorten it, or raise question_max_chars (read-only: restart)')
    elif name == 'cameras':
        return _cameras_problem(value or [])
    elif name.startswith('camera.'):
        return _camera_problem(name, value)
    elif name in _VALUE_CHECKS:
        is_valid, problem = _VALUE_CHECKS[name]
        return None if is_valid(value) else problem.format(value=value)
    return None


def _is_time(value) -> bool:
    return math.isfinite(value) and value >= 0


# name -> (is the value valid, what to say when it is not; {value} is the value)
_VALUE_CHECKS = {
    'max_new_tokens': (lambda value: value >= 1, 'max_new_tokens {value} is out of range: use at least 1'),
    'max_pixels': (lambda value: value >= 0,
                   'max_pixels {value} is out of range: use 0 (the processor\'s) or a pixel count such as 1003520'),
    'describe_period_s': (_is_time, 'describe_period_s {value} is invalid: use 0 (off) or a period in seconds'),
    'describe_prompt': (lambda value: bool(value.strip()),
                        'describe_prompt is empty: give the prompt text used for scene descriptions'),
    'dominant_ratio': (lambda value: 0 < value <= 1,
                       'dominant_ratio {value} is out of range: use 0 < dominant_ratio <= 1 (default 54/64)'),
    'reducer': (lambda value: value in REDUCERS,
                'reducer {value!r} is not known: use ' + ', '.join(REDUCERS)),
    'image_qos': (lambda value: value in IMAGE_QOS_CHOICES,
                  'image_qos {value!r} is not known: use ' + ' or '.join(IMAGE_QOS_CHOICES)),
    'max_image_age_s': (_is_time, 'max_image_age_s {value} is invalid: use 0 (no limit) or an age in seconds'),
    'max_clock_skew_s': (_is_time, 'max_clock_skew_s {value} is invalid: use a tolerance in seconds (0 or more)'),
    'service_history_depth': (lambda value: value >= 1,
                              'service_history_depth {value} is out of range: use at least the number of callers '
                              'that may call at once (default 100)'),
    'max_batch_size': (lambda value: value >= 1,
                       'max_batch_size {value} is out of range: use 1 (one request at a time) or more'),
    'max_pending_requests': (lambda value: value >= 0, 'max_pending_requests {value} is negative: use 0 or more'),
    'request_timeout_s': (lambda value: math.isfinite(value) and value > 0,
                          'request_timeout_s {value} is invalid: use a positive number of seconds'),
    'frame_history_length': (lambda value: value >= 1,
                             'frame_history_length {value} is out of range: use at least 1 (1 keeps the latest '
                             'frame only)'),
    'frame_history_bytes': (lambda value: value >= 0,
                            'frame_history_bytes {value} is negative: use a byte count (0 keeps the latest frame '
                            'only)'),
    'question_max_chars': (lambda value: value >= 1, 'question_max_chars {value} is out of range: use at least 1'),
    'model': (lambda value: bool(value.strip()), 'model is empty: set it to a LLaVA checkpoint directory or hub id'),
    'dtype': (lambda value: value.strip().lower() in ('auto', *DTYPES),
              'dtype {value!r} is not supported: use auto, ' + ', '.join(DTYPES)),
    'device': (lambda value: bool(_DEVICE.match(value.strip().lower())),
               'device {value!r} is not valid: use one of ' + DEVICE_CHOICES),
}


def _cameras_problem(cameras: list[str]) -> str | None:
    if not cameras:
        return 'cameras is empty: list at least one camera name, e.g. [front]'
    bad = [camera for camera in cameras if not _CAMERA_NAME.match(camera)]
    if bad:
        return (f'cameras has invalid name(s) {", ".join(map(repr, bad))}: use letters, digits '
                f'and underscores, starting with a letter')
    if len(set(cameras)) != len(cameras):
        return f'cameras lists a name twice ({list(cameras)}): give each camera once'
    return None


def _camera_problem(name: str, value) -> str | None:
    """camera.<name>.type and camera.<name>.topic."""
    if name.endswith('.type') and value not in IMAGE_TYPES:
        return f'{name} {value!r} is not supported: use {" or ".join(IMAGE_TYPES)}'
    if name.endswith('.topic') and not value.strip():
        return f'{name} is empty: give the image topic of this camera'
    return None


@dataclass(frozen=True)
class Settings:
    """Parameters fixed while the node is configured (read on configure)."""

    model: str
    vision_tower: str
    max_pixels: int
    device: str
    dtype: str
    cameras: tuple[str, ...]
    camera_topics: dict[str, str]
    camera_types: dict[str, str]
    image_qos: str
    dominant_ratio: float
    max_image_age_s: float
    max_clock_skew_s: float
    frame_history_length: int
    frame_history_bytes: int
    max_pending_requests: int
    max_batch_size: int
    request_timeout_s: float
    question_max_chars: int
    service_history_depth: int


def service_qos_profile(depth: int) -> QoSProfile:
    """Reliable, keep the last `depth` requests (the ROS default keeps 10: a burst of 20 callers at
    once lost 10 requests in DDS before the node could take them)."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=ReliabilityPolicy.RELIABLE)


def image_qos_profile(name: str) -> QoSProfile:
    """Depth 2: every frame goes into the history buffer, and one frame of slack keeps a frame the
    executor takes a moment late from being overwritten by the next; each queued raw frame can be
    megabytes, so no more."""
    reliability = ReliabilityPolicy.BEST_EFFORT if name == 'sensor_data' else ReliabilityPolicy.RELIABLE
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2, reliability=reliability)

