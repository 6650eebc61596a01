"""Decoding options and the token chooser the engine's decode loop calls: greedy argmax, or transformers'
temperature / top-k / top-p warpers with a seeded generator, in the order stock ``generate`` applies them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zip_vlm_ros.errors import RequestError

__all__ = ["SamplingOptions", "check_sampling", "token_chooser"]


@dataclass
class SamplingOptions:
    """Decoding options; the default is greedy. ``seed`` makes sampling reproducible."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0: no top-k filtering
    seed: int | None = None


def check_sampling(sampling: SamplingOptions | None) -> SamplingOptions:
    """The request's options (greedy when None), RequestError naming any out-of-range value."""
    if sampling is None:
        return SamplingOptions()
    if not isinstance(sampling, SamplingOptions):
        raise RequestError(f"sampling must be a SamplingOptions; got {type(sampling).__name__}")
    if sampling.do_sample:
        if not (isinstance(sampling.temperature, (int, float)) and math.isfinite(sampling.temperature)
                and sampling.temperature > 0):
            raise RequestError(f"temperature must be > 0 when sampling (1.0 = unchanged); got {sampling.temperature!r}")
        if not (isinstance(sampling.top_p, (int, float)) and 0 < sampling.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1] (1.0 = no nucleus filtering); got {sampling.top_p!r}")
        if isinstance(sampling.top_k, bool) or not isinstance(sampling.top_k, int) or sampling.top_k < 0:
            raise RequestError(f"top_k must be a whole number >= 0 (0 = no top-k filtering); got {sampling.top_k!r}")
    if sampling.seed is not None and (isinstance(sampling.seed, bool) or not isinstance(sampling.seed, int)
                                      or sampling.seed < 0):
        raise RequestError(f"seed must be a whole number >= 0 or None; got {sampling.seed!r}")
    return sampling


def token_chooser(sampling: SamplingOptions, device: torch.device):
    """``choose(generated [batch, steps], logits [batch, vocab]) -> next tokens [batch]``.

    Greedy is argmax. Sampling applies transformers' temperature, top-k and top-p warpers (in the
    order stock generate does) and draws from a generator seeded with ``sampling.seed``.
    """
    if not sampling.do_sample:
        return lambda generated, logits: logits.argmax(dim=-1)
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    warpers = LogitsProcessorList()
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(sampling.temperature)))
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(sampling.top_p)))
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)

    def choose(generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probs = warpers(generated, logits).softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

    return choose
