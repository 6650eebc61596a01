"""The engine's exceptions, shared by the engine and the model-family adapters (``zip_vlm_ros.models``)."""

from __future__ import annotations

__all__ = ["EngineError", "ModelLoadError", "RequestError", "first_line"]


class EngineError(Exception):
    """A problem the user can fix; ``str(error)`` is one line saying what is wrong and how to fix it."""


class ModelLoadError(EngineError):
    """The engine cannot be built from its EngineConfig (missing path, not LLaVA, no CUDA, bad values)."""


class RequestError(EngineError):
    """One request is invalid (token budget, prompt, image, sampling options); the engine stays usable."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
