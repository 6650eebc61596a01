"""What every benchmark measures on: the real photos (and 720p camera frames made from them), the questions
asked about one frame, where the offline bench checkpoints are built, and the engine a bench measures."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import skimage.data

__all__ = ["FRAME_QUESTIONS", "IMAGES", "PHOTOS", "bench_image", "default_model_dir", "open_bench_engine"]

# Issue 6: several questions about the same frame, as a robot's operator would ask them.
FRAME_QUESTIONS = (
    "Describe the scene.",
    "Is there a person in front of the robot?",
    "What is the person holding?",
    "Is the path clear?",
    "What color is the largest object?",
)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
IMAGES = PHOTOS + tuple(f"{name}-720p" for name in PHOTOS)


def bench_image(name: str):
    """``HxWx3 uint8`` image `name` of IMAGES: a skimage photo, or ``PHOTO-720p`` = that photo centre-
    cropped to 16:9 and resized (bicubic) to a 1280x720 camera frame."""
    from PIL import Image

    photo = getattr(skimage.data, name.removesuffix("-720p"))()
    if not name.endswith("-720p"):
        return photo
    height, width = photo.shape[:2]
    crop_height, crop_width = min(height, width * 9 // 16), min(width, height * 16 // 9)
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    cropped = Image.fromarray(photo[top:top + crop_height, left:left + crop_width])
    return np.asarray(cropped.resize((1280, 720), Image.Resampling.BICUBIC))


def default_model_dir() -> pathlib.Path:
    """Where ``vlm_tiny_model``'s bench presets are built once and reused: ``$XDG_CACHE_HOME/zip_vlm_ros``."""
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return cache / "zip_vlm_ros" / "bench"


def open_bench_engine(args):
    """The engine of `args` (``--model``, ``--device``, ``--dtype``, ``--max-new-tokens``). Without a
    ``--model`` the ``bench`` preset is built once under ``default_model_dir()`` and `args.model` names it,
    so the report says which checkpoint was measured."""
    from zip_vlm_ros.engine import EngineConfig, VlmEngine
    from zip_vlm_ros.tools.tiny_model import build_checkpoint

    if args.model is None:
        args.model = str(build_checkpoint(default_model_dir(), preset="bench"))
    return VlmEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                  max_new_tokens=args.max_new_tokens))
