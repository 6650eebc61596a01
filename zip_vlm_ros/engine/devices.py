"""Device and dtype selection for the engine, and its clock.

``auto`` picks CUDA (float16) when torch sees a GPU and CPU (float32) otherwise; explicit choices are
checked against what this machine has."""

from __future__ import annotations

import time

import torch

from zip_vlm_ros.errors import ModelLoadError

__all__ = ["DEVICE_CHOICES", "DTYPES", "DeviceClock", "resolve_device", "resolve_dtype"]

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(spec: str) -> torch.device:
    """auto|cpu|cuda|cuda:N -> torch.device, ModelLoadError if unknown or CUDA is missing."""
    if not isinstance(spec, str):
        raise ModelLoadError(f"device must be one of {DEVICE_CHOICES}; got {spec!r}")
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index_text = spec.partition(":")[2]
        if spec.startswith("cuda:") and not index_text.isdigit():
            raise ModelLoadError(f"device {spec!r} is not valid; use one of {DEVICE_CHOICES} (N a GPU index)")
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {spec!r} was requested but CUDA is not available (torch "
                                 f"{torch.__version__}); use device 'cpu' or 'auto'")
        index = int(index_text) if index_text else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            raise ModelLoadError(f"device {spec!r} does not exist: {count} CUDA device(s) visible "
                                 f"(cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    raise ModelLoadError(f"device {spec!r} is not supported; use one of {DEVICE_CHOICES}")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """auto|float16|bfloat16|float32 -> torch.dtype (auto: float16 on CUDA, float32 on CPU)."""
    if not isinstance(spec, str) or spec.strip().lower() not in ("auto", *DTYPES):
        raise ModelLoadError(f"dtype {spec!r} is not supported; use auto, float16, bfloat16 or float32")
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if spec == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"dtype 'bfloat16' is not supported by {torch.cuda.get_device_name(device)}; "
                             f"use float16 or auto")
    return DTYPES[spec]


class DeviceClock:
    """``perf_counter`` that waits for the device's queued work first (CUDA runs asynchronously), so that a
    stage's time is the time its kernels took, not the time it took to queue them."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def ms_since(self, start: float) -> float:
        return (self.now() - start) * 1000.0
