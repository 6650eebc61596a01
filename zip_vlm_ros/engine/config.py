"""``EngineConfig``: what a ``VlmEngine`` is built from, and its checks."""

from __future__ import annotations

from dataclasses import dataclass

from zip_vlm_ros.errors import ModelLoadError
from zip_vlm_ros.reducers import REDUCERS

__all__ = ["EngineConfig", "check_engine_config"]


@dataclass
class EngineConfig:
    model: str                          # local checkpoint dir or hub id (LLaVA-1.5, LLaVA-NeXT; LLaVA-Mini: dir)
    device: str = "auto"                # auto|cpu|cuda|cuda:N   (auto: CUDA when available)
    dtype: str = "auto"                 # auto|float16|bfloat16|float32 (auto: fp16 on CUDA, fp32 on CPU)
    token_budget: int = 64              # default budget; >= visual_tokens_full means no reduction
    reducer: str = "visionzip"          # default reducer: one of zip_vlm_ros.reducers.REDUCERS
    contextual_ratio: float = 10 / 64   # contextual = round(T * ratio), dominant = T - contextual
    max_new_tokens: int = 64
    prefix_cache_entries: int = 8       # 0 disables the per-frame prefix cache
    prefix_cache_bytes: int = 1 << 30
    visual_cache_entries: int = 64      # multi-image requests: per-image visual tokens kept (0 disables)
    visual_cache_bytes: int = 1 << 28
    vision_tower: str = ""              # LLaVA-Mini: local CLIP dir when the checkpoint names a hub id
    max_pixels: int = 0                 # Qwen2.5-VL: bound on an image's resized pixels (0: the processor's)


def check_engine_config(config: EngineConfig) -> None:
    """ModelLoadError naming the first EngineConfig value out of range."""
    if not isinstance(config, EngineConfig):
        raise ModelLoadError(f"VlmEngine needs an EngineConfig; got {type(config).__name__}")
    if not isinstance(config.model, str) or not config.model.strip():
        raise ModelLoadError("model is empty; give a LLaVA checkpoint directory or a hub id such as "
                             "llava-hf/llava-1.5-7b-hf")
    checks = [
        ("token_budget", config.token_budget, 1, " (>= the model's visual token count means no reduction)"),
        ("max_new_tokens", config.max_new_tokens, 1, ""),
        ("prefix_cache_entries", config.prefix_cache_entries, 0, " (0 disables the prefix cache)"),
        ("prefix_cache_bytes", config.prefix_cache_bytes, 0, ""),
        ("visual_cache_entries", config.visual_cache_entries, 0, " (0 disables the per-image visual-token cache)"),
        ("visual_cache_bytes", config.visual_cache_bytes, 0, ""),
        ("max_pixels", config.max_pixels, 0, " (0 keeps the processor's)"),
    ]
    for name, value, minimum, note in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ModelLoadError(f"{name} must be a whole number >= {minimum}{note}; got {value!r}")
    if config.reducer not in REDUCERS:
        raise ModelLoadError(f"reducer {config.reducer!r} is unknown; choose one of {', '.join(REDUCERS)}")
    ratio = config.contextual_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ModelLoadError(f"contextual_ratio must be in [0, 1) (VisionZip uses 10/64); got {ratio!r}")
