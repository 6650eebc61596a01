"""Streaming an answer while it is generated: text deltas whose concatenation is the final answer.

No torch, no ROS: `IncrementalDetokenizer` turns token ids, one at a time, into text pieces with any
`decode(ids) -> str` function (the engine passes its own, so streamed and final text agree).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# What a byte-level or byte-fallback decoder prints for the bytes of a character not yet complete.
REPLACEMENT_CHARACTER = '\ufffd'


@dataclass
class StreamedText:
    """One decode step of an answer, as the engine reports it to an ``on_token`` callback."""

    prompt_index: int         # which prompt of a generate_many call
    delta: str                # text this step adds ('' while a character or a word is incomplete)
    text: str                 # the answer so far: the concatenation of every delta up to this step
    generated_tokens: int     # tokens generated so far, the EOS token included
    elapsed_ms: float         # since the prompt's start, the origin of VlmOutput.ttft_ms


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids, never splitting a character or a merged token.

    Each step decodes all ids so far with `decode` (the same function that makes the final text)
    and emits only the part that later tokens cannot change:
    - trailing U+FFFD: the first bytes of a multi-byte character (byte fallback, byte-level BPE)
      decode to replacement characters until its last byte arrives;
    - trailing whitespace: the final text is stripped, and a space only stays if text follows it.
    Decoding the whole answer each step costs microseconds per token, far below one LLM step, and
    sees merges across token boundaries exactly as the final decode does. The deltas therefore
    concatenate to `decode(all ids)` for every decoder whose output for a prefix of the ids is a
    prefix of its output for all of them, up to those trailing characters (SentencePiece/Metaspace,
    byte fallback, byte-level BPE). A decoder that rewrites earlier text (cleanup of spaces before
    punctuation) makes `push` hold its text back until the text again extends what was emitted.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self.text = ''  # emitted so far

    @property
    def generated_tokens(self) -> int:
        return len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text it makes certain ('' when none yet)."""
        self._ids.append(int(token_id))
        return self._emit(_stable_prefix(self._decode(self._ids)))

    def finish(self) -> str:
        """The rest of the final text (held-back characters included) once generation has ended."""
        return self._emit(self._decode(self._ids))

    def _emit(self, text: str) -> str:
        if not text.startswith(self.text):
            return ''
        delta, self.text = text[len(self.text):], text
        return delta


def _stable_prefix(text: str) -> str:
    """`text` without the trailing characters that later tokens may still change (see the class)."""
    while True:
        trimmed = text.rstrip().rstrip(REPLACEMENT_CHARACTER)
        if trimmed == text:
            return text
        text = trimmed
