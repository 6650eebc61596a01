"""Shared test setup: DDS kept on loopback with a per-run domain, and one tiny checkpoint per session."""
import os
import pathlib

import pytest

# Set before anything imports rclpy (child processes inherit them). A per-run domain keeps parallel
# runs on this machine from seeing each other's nodes.
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
os.environ.setdefault('ROS_DOMAIN_ID', str(1 + os.getpid() % 100))
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# Raw 720p/1080p test frames exceed Fast DDS's default 512 KB shared-memory segments.
from zip_vlm_ros.client import use_large_frames_profile  # noqa: E402

use_large_frames_profile()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory) -> pathlib.Path:
    """A random LLaVA checkpoint of the `tiny` preset, built offline once per test session."""
    from zip_vlm_ros.tools.tiny_model import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp('models') / 'tiny', preset='tiny')


@pytest.fixture(scope='session')
def tiny_next_model_dir(tmp_path_factory) -> pathlib.Path:
    """A random LLaVA-NeXT (AnyRes) checkpoint of the `tiny-next` preset, built offline once per session."""
    from zip_vlm_ros.tools.tiny_model import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp('models') / 'tiny-next', preset='tiny-next')


@pytest.fixture(scope='session')
def tiny_mini_model_dir(tmp_path_factory) -> pathlib.Path:
    """A random LLaVA-Mini checkpoint of the `tiny-mini` preset (published layout), built offline once per session."""
    from zip_vlm_ros.tools.tiny_model import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp('models') / 'tiny-mini', preset='tiny-mini')


@pytest.fixture(scope='session')
def mini_c2_dir(tmp_path_factory) -> pathlib.Path:
    """tiny-mini with C = 2: four compressed tokens per image and a real 2x2 sin-cos table."""
    import dataclasses

    from zip_vlm_ros.tools.tiny_model import PRESETS
    from zip_vlm_ros.tools.tiny_model_mini import write_mini_checkpoint

    out = tmp_path_factory.mktemp('models') / 'tiny-mini-c2'
    out.mkdir()
    write_mini_checkpoint(out, dataclasses.replace(PRESETS['tiny-mini'], compressor_size=2), seed=3)
    return out


PUBLISHED_DIR = REPO_ROOT / 'test' / 'fixtures' / 'published'
# The supported checkpoints whose published files test/fixtures/published holds (see its README).
PUBLISHED_CHECKPOINTS = ('llava-hf/llava-1.5-7b-hf', 'llava-hf/llava-v1.6-mistral-7b-hf',
                         'llava-hf/llava-v1.6-vicuna-7b-hf', 'ICTNLP/llava-mini-llama-3.1-8b')
PUBLISHED_CLIP_TOWER = 'openai/clip-vit-large-patch14-336'


def published_files(checkpoint: str) -> pathlib.Path:
    """The directory of `checkpoint`'s published files (hub id `org/name` -> `org__name`)."""
    return PUBLISHED_DIR / checkpoint.replace('/', '__')


@pytest.fixture(scope='session')
def published_replicas(tmp_path_factory) -> dict:
    """``{hub id: replica directory}`` for every published checkpoint, and ``PUBLISHED_CLIP_TOWER``: the
    CLIP directory LLaVA-Mini's replica reads its tower from. Built offline once per session."""
    from zip_vlm_ros.tools.published_replica import build_clip_replica, build_replica

    root = tmp_path_factory.mktemp('published_replicas')
    replicas = {checkpoint: build_replica(published_files(checkpoint), root / checkpoint.replace('/', '__'))
                for checkpoint in PUBLISHED_CHECKPOINTS}
    replicas[PUBLISHED_CLIP_TOWER] = build_clip_replica(published_files(PUBLISHED_CLIP_TOWER), root / 'clip')
    return replicas


@pytest.fixture(scope='session')
def tiny_qwen_model_dir(tmp_path_factory) -> pathlib.Path:
    """A random Qwen2.5-VL checkpoint of the `tiny-qwen2.5-vl` preset, built offline once per session."""
    from zip_vlm_ros.tools.tiny_model import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp('models') / 'tiny-qwen', preset='tiny-qwen2.5-vl')
