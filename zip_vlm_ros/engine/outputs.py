"""What the engine returns: answers with their token counts and timings, and the stop of a generation.

No ROS here; ``zip_vlm_ros.node.conversions`` turns a ``VlmOutput`` into a ``VlmResult`` message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from zip_vlm_ros.engine.streaming import StreamedText
from zip_vlm_ros.errors import EngineError

__all__ = ["GenerationStopped", "ImageTokens", "OnToken", "ShouldStop", "VlmOutput"]

# Asked between stages and before every decode step; a non-empty string stops the generation and
# becomes GenerationStopped.reason (e.g. "timed out", "the node is shutting down").
ShouldStop = Callable[[], "str | None"]
# Called after every generated token with that step's text (see zip_vlm_ros.engine.streaming).
OnToken = Callable[[StreamedText], None]


@dataclass(frozen=True)
class ImageTokens:
    """What one image of a multi-image answer cost (``VlmOutput.images``)."""

    label: str
    token_budget: int                   # this image's share of the request's total
    visual_tokens: int                  # read by the LLM: min(share, visual_tokens_full)
    visual_tokens_full: int             # the image's count without reduction (base image only for AnyRes)
    reduction: str                      # the reducer ("visionzip", "divprune", "vispruner"), "none" or "llava-mini"
    cached: bool                        # its visual tokens came from the per-image cache


@dataclass
class VlmOutput:
    """One answer with its token counts and timing breakdown (mirrors msg/VlmResult)."""

    prompt: str
    text: str
    model: str
    reduction: str                      # the reducer ("visionzip", "divprune", "vispruner"), "none" or "llava-mini"
    token_budget: int                   # effective budget (visual_tokens_full when no reduction)
    visual_tokens: int                  # fed to the LLM (AnyRes: crops x the budget's share per crop)
    visual_tokens_full: int             # this image's count before reduction (576 for LLaVA-1.5)
    generated_tokens: int               # new tokens, counting the EOS token when generation stopped on it
    vision_ms: float                    # image preprocessing, vision encoder and projector
    reduction_ms: float                 # the reducer's selection (+ merge) (0 for "none")
    prefill_ms: float                   # LLM forward over the prompt (prefix + question; question only if reused)
    ttft_ms: float                      # request start to the first generated token
    decode_ms: float                    # the remaining tokens
    total_ms: float
    prefix_reused: bool                 # the frame's prefix (vision + its KV cache) came from the cache
    kv_cache_bytes: int                 # KV cache bytes of the prompt prefix incl. visual tokens
    images: list[ImageTokens] = field(default_factory=list)  # multi-image requests: each image, prompt order
    # Single-image answers: the frame patches each visual token stands for (models.TokenProvenance; what
    # engine.overlay draws); None for multi-image answers and families that do not trace their tokens.
    provenance: object = None


class GenerationStopped(EngineError):
    """A generation its caller stopped through ``should_stop``; the engine stays usable.

    Attributes: ``reason`` (what should_stop returned), ``tokens`` (ids generated so far for the prompt
    being decoded, one list per batch row; empty when it stopped before decoding), ``texts`` (those
    tokens decoded, on first access: the stop itself does not wait for the tokenizer) and
    ``completed`` (VlmOutputs of the prompts a generate_many call had finished).
    """

    def __init__(self, reason: str, tokens: Sequence[Sequence[int]] = (),
                 completed: Sequence[VlmOutput] = (), decode: Callable[[list[int]], str] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.tokens = [list(row) for row in tokens]
        self.completed = list(completed)
        self._decode = decode

    @property
    def texts(self) -> list[str]:
        return [self._decode(row) for row in self.tokens] if self._decode else []
