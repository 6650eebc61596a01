"""Checks of a request's arguments, each raising ``RequestError`` with what to fix; ``ImageInput``.

Pure functions of the values and of what the loaded model allows (its image token, its full visual
token count), so the engine and its multi-image path check requests the same way.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from zip_vlm_ros.errors import RequestError
from zip_vlm_ros.reducers import REDUCERS

__all__ = ["ImageInput", "check_budget", "check_context", "check_frame_key", "check_image", "check_max_new_tokens",
           "check_prompt", "check_prompts", "check_reducer"]


@dataclass(frozen=True)
class ImageInput:
    """One image of a multi-image request."""

    image: np.ndarray                   # HxWx3 uint8 RGB
    label: str                          # how the prompt introduces it: "rear", "front 3.0 s ago"
    key: Hashable | None = None         # names the pixels (same key => same pixels); None: never cached


def check_image(image, name: str = "image") -> None:
    """RequestError unless `image` is a non-empty ``HxWx3 uint8`` numpy array."""
    if not isinstance(image, np.ndarray):
        raise RequestError(f"{name} must be an HxWx3 uint8 RGB numpy array; got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or image.size == 0:
        raise RequestError(f"{name} must be an HxWx3 uint8 RGB array with H, W >= 1; got shape {image.shape} "
                           f"dtype {image.dtype}")


def check_reducer(reducer, default: str) -> str:
    """The request's reducer: `reducer` (None or "": `default`), or RequestError listing the choices."""
    if reducer is None or reducer == "":
        return default
    if not isinstance(reducer, str) or reducer not in REDUCERS:
        raise RequestError(f"unknown reducer {reducer!r}; choose one of {', '.join(REDUCERS)} "
                           f"(or leave it empty for the default, {default})")
    return reducer


def check_budget(token_budget, default: int, visual_tokens_full: int) -> int:
    """The effective visual-token budget: `token_budget` (None: `default`), capped at `visual_tokens_full`.

    Budgets at or above ``visual_tokens_full`` mean no reduction. RequestError for a budget below 1.
    """
    budget = default if token_budget is None else token_budget
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise RequestError(f"token_budget must be a whole number of visual tokens (>= 1; >= "
                           f"{visual_tokens_full} means no reduction); got {budget!r}")
    budget = int(budget)
    if budget < 1:
        raise RequestError(f"token_budget must be >= 1 (>= {visual_tokens_full} means no reduction); got {budget}")
    return min(budget, visual_tokens_full)


def check_max_new_tokens(max_new_tokens, default: int) -> int:
    """`max_new_tokens` (None: `default`) as an int >= 1."""
    value = default if max_new_tokens is None else max_new_tokens
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise RequestError(f"max_new_tokens must be a whole number >= 1 (e.g. 64); got {value!r}")
    return int(value)


def check_context(prompt_tokens: int, visual_tokens: int, max_new_tokens: int, context_tokens: int,
                  images: int = 1) -> None:
    """RequestError unless a prompt of `prompt_tokens` (its `visual_tokens` included) plus `max_new_tokens`
    fits the model's context of `context_tokens`. One check for one image and for several, so both
    refuse the same overflow with the same numbers."""
    total = prompt_tokens + max_new_tokens
    if total <= context_tokens:
        return
    room = context_tokens - prompt_tokens
    fix = (f"use max_new_tokens <= {room}, or lower token_budget" if room >= 1 else "lower token_budget")
    need = "images need" if images != 1 else "image needs"
    raise RequestError(
        f"{images} {need} {visual_tokens} visual tokens; with the prompt's {prompt_tokens - visual_tokens} "
        f"text tokens and max_new_tokens {max_new_tokens} that is {total} tokens, more than the model's context "
        f"of {context_tokens}: {fix}{' or ask about fewer images' if images != 1 else ''}")


def check_prompt(prompt, image_token: str) -> str:
    """A non-empty question that does not contain the model's image placeholder."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError(f"prompt must be a non-empty question such as 'Describe the scene.'; got {prompt!r}")
    if image_token in prompt:
        raise RequestError(f"prompt must not contain the image placeholder {image_token!r}: the engine "
                           f"places the image itself; remove it from {prompt!r}")
    return prompt


def check_prompts(prompts, image_token: str) -> list[str]:
    """A non-empty list of questions, each as ``check_prompt``."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise RequestError(f"prompts must be a non-empty list of questions; got {prompts!r}")
    return [check_prompt(prompt, image_token) for prompt in prompts]


def check_frame_key(frame_key) -> None:
    """RequestError unless `frame_key` is hashable (it keys the prefix cache)."""
    try:
        hash(frame_key)
    except TypeError:
        raise RequestError(f"frame_key must be hashable, e.g. ('front', 17); got {frame_key!r}") from None
