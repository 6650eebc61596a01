"""The language model's side of a request: prefill (on a cached image prefix when there is one), decode,
stop checks and streamed text. Family-independent: the adapter embeds the prompt, this runs the LLM.

No ROS here. See ``zip_vlm_ros.engine.vlm_engine`` for the prefill rule and the exactness contract.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from zip_vlm_ros.engine.devices import DeviceClock
from zip_vlm_ros.engine.outputs import GenerationStopped, OnToken, ShouldStop, VlmOutput
from zip_vlm_ros.engine.prefix_cache import Prefix, PrefixCache
from zip_vlm_ros.models.kv_cache import cache_nbytes, fork_cache
from zip_vlm_ros.engine.sampling import SamplingOptions, token_chooser
from zip_vlm_ros.engine.streaming import IncrementalDetokenizer, StreamedText
from zip_vlm_ros.errors import ModelLoadError
from zip_vlm_ros.models import FamilyAdapter, VisualTokens

__all__ = ["Generator", "PrefillStep", "eos_token_ids"]


@dataclass
class PrefillStep:
    """A prompt after prefill (``Generator.prefill_step``): what decoding and the output need."""

    logits: torch.Tensor                # [1, vocab] float32, the prompt's last position
    kv_cache: object                    # the prompt's key/value cache, to decode on
    prefix: Prefix                      # the image prefix it continued from or created
    reused: bool                        # the prefix came from this call or the prefix cache
    prefill_ms: float
    vision_ms: float                    # 0 unless this prompt encoded the image(s)
    reduction_ms: float


class Generator:
    """Prefill and decode on one model, with the per-frame prefix cache (``prefix_cache``).

    Thread-compatible like the engine that owns it.
    """

    def __init__(self, family: FamilyAdapter, tokenizer, clock: DeviceClock, prefix_cache: PrefixCache):
        self.family = family
        self.model = family.model
        self.tokenizer = tokenizer
        self.device = clock.device
        self.clock = clock
        self.prefix_cache = prefix_cache
        self.eos_token_ids = eos_token_ids(self.model, tokenizer)
        self.pad_token_id = next(value for value in (tokenizer.pad_token_id, self.model.generation_config.pad_token_id,
                                                     min(self.eos_token_ids)) if value is not None)

    def prefill_step(self, prefix_ids: tuple[int, ...], suffix_ids: tuple[int, ...], cache_key: Hashable | None,
                      prefixes_this_call: dict[tuple[int, ...], Prefix],
                      encode: Callable[[], tuple[VisualTokens, float, float]], check_stop) -> PrefillStep:
        """One prompt's prefill, by the rule of the module docstring: on its image prefix when this call or
        the prefix cache holds it (one forward over the question's tokens), else one forward over the
        whole prompt, whose first ``len(prefix_ids)`` positions are then kept as the prefix.

        `encode()` gives ``(visual tokens, vision ms, reduction ms)`` (zeros once this call has encoded).
        """
        prefix = prefixes_this_call.get(prefix_ids)
        if prefix is None and cache_key is not None:
            prefix = self.prefix_cache.get(cache_key)
        if prefix is not None:
            check_stop()
            start = self.clock.now()
            logits, kv_cache = self.prefill_suffix(suffix_ids, prefix)
            return PrefillStep(logits, kv_cache, prefix, True, self.clock.ms_since(start), 0.0, 0.0)
        visual, vision_ms, reduction_ms = encode()
        check_stop()
        start = self.clock.now()
        logits, kv_cache, embedded = self.prefill_prompt(prefix_ids, suffix_ids, visual)
        prefill_ms = self.clock.ms_since(start)
        prefix = Prefix(fork_cache(kv_cache, len(prefix_ids)), len(prefix_ids),
                        cache_nbytes(kv_cache, positions=len(prefix_ids)),
                        cache_nbytes(kv_cache) + embedded.prefix_state_bytes, embedded.prefix_state,
                        visual.provenance[0] if visual.provenance else None)
        prefixes_this_call[prefix_ids] = prefix
        if cache_key is not None:
            self.prefix_cache.put(cache_key, prefix)
        return PrefillStep(logits, kv_cache, prefix, False, prefill_ms, vision_ms, reduction_ms)

    def prefill_prompt(self, prefix_ids: tuple[int, ...], suffix_ids: tuple[int, ...], visual: VisualTokens):
        """One LLM forward over a whole prompt about one image: the frame's first question.

        prefix_ids + suffix_ids: the prompt with the image's visual tokens; `visual` from ``family.encode``.
        Returns ``(last-position logits [1, vocab] float32, the prompt's key/value cache, the family's
        PromptEmbeddings with its state for the prefix)``.
        """
        embedded = self.family.embed_prompt(prefix_ids + suffix_ids, len(prefix_ids), visual)
        output = self.model(inputs_embeds=embedded.inputs_embeds, position_ids=embedded.position_ids, use_cache=True,
                            logits_to_keep=1)
        return output.logits[:, -1].float(), output.past_key_values, embedded

    def prefill_suffix(self, suffix_ids: tuple[int, ...], prefix: Prefix):
        """One LLM forward over a later question's own tokens on a fork of the frame's cached prefix.

        Returns ``(last-position logits [1, vocab] float32, the question's key/value cache)``.
        """
        kv_cache = fork_cache(prefix.kv_cache)
        inputs_embeds = self.family.embed_suffix(suffix_ids, prefix.family_state)
        position_ids = self.family.text_positions(prefix.family_state, prefix.length, len(suffix_ids))
        logits = self.model(inputs_embeds=inputs_embeds, position_ids=position_ids, past_key_values=kv_cache,
                            use_cache=True, logits_to_keep=1).logits
        return logits[:, -1].float(), kv_cache

    def decode(self, logits: torch.Tensor, kv_cache, max_new_tokens: int, sampling: SamplingOptions,
                check_stop: Callable[..., None],
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                on_step: Callable[[int, bool], None] | None = None, family_state=None):
        """Generate from the prefill's last-position `logits` ``[batch, vocab]`` (float32).

        Each row stops at its first EOS (later steps of a finished row are padding, as in stock
        generate). With `attention_mask` ``[batch, length]`` and `position_ids` (left padding) both
        grow by one per step. `check_stop(rows)` runs before each step, so a stop request waits for
        at most one step. `on_step(row 0's token id, last)` runs after each step (single-row streaming).
        `family_state`: the prompt prefix's state (``Prefix.family_state``), from which a family with its
        own positions (M-RoPE) places each new token (``family.text_positions``).
        Returns ``(tokens per row incl. EOS, first token time, end time)``.
        """
        batch_size = logits.shape[0]
        choose = token_chooser(sampling, self.device)
        eos = torch.tensor(sorted(self.eos_token_ids), device=self.device)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        generated = torch.empty((batch_size, 0), dtype=torch.long, device=self.device)
        first_token_time = None
        for step in range(max_new_tokens):
            check_stop(generated)
            next_tokens = choose(generated, logits)
            next_tokens = torch.where(finished, torch.full_like(next_tokens, self.pad_token_id), next_tokens)
            generated = torch.cat([generated, next_tokens[:, None]], dim=1)
            if first_token_time is None:
                first_token_time = self.clock.now()
            finished |= torch.isin(next_tokens, eos)
            last = step == max_new_tokens - 1 or bool(finished.all())
            if on_step is not None:
                on_step(int(next_tokens[0]), last)
            if last:
                break
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch_size, 1))], dim=1)
                position_ids = position_ids[:, -1:] + 1
            else:
                position_ids = self.family.text_positions(family_state, kv_cache.get_seq_length(), 1)
            logits = self.model(input_ids=next_tokens[:, None], attention_mask=attention_mask,
                                position_ids=position_ids, past_key_values=kv_cache,
                                use_cache=True).logits[:, -1].float()
        return self.rows_to_eos(generated), first_token_time, self.clock.now()

    def rows_to_eos(self, generated: torch.Tensor) -> list[list[int]]:
        """Token ids per row of `generated` ``[batch, steps]``, each cut after its first EOS."""
        rows = []
        for row in generated.tolist():
            stop = next((index for index, token in enumerate(row) if token in self.eos_token_ids), None)
            rows.append(row if stop is None else row[:stop + 1])
        return rows

    def stop_checker(self, should_stop: ShouldStop | None, completed: Sequence[VlmOutput] = ()):
        """``check_stop(generated [batch, steps] or None)``: raise GenerationStopped when should_stop gives a reason."""
        def check_stop(generated: torch.Tensor | None = None) -> None:
            reason = should_stop() if should_stop is not None else None
            if reason:
                rows = self.rows_to_eos(generated) if generated is not None else []
                raise GenerationStopped(str(reason), rows, completed, decode=self.decode_text)
        return check_stop

    def text_stream(self, on_token: OnToken | None, prompt_index: int,
                     start: float) -> Callable[[int, bool], None] | None:
        """``on_step(token_id, last)`` for `_decode` that reports each step's text to `on_token`."""
        if on_token is None:
            return None
        detokenizer = IncrementalDetokenizer(self.decode_text)

        def on_step(token_id: int, last: bool) -> None:
            delta = detokenizer.push(token_id)
            if last:  # the final text: whatever was held back (trailing spaces are stripped by then)
                delta += detokenizer.finish()
            on_token(StreamedText(prompt_index=prompt_index, delta=delta, text=detokenizer.text,
                                  generated_tokens=detokenizer.generated_tokens,
                                  elapsed_ms=self.clock.ms_since(start)))
        return on_step

    def decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()



def eos_token_ids(model, tokenizer) -> set[int]:
    """The checkpoint's EOS ids: its generation config's (one id or a list), else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelLoadError("the checkpoint defines no EOS token (generation_config.eos_token_id); add one")
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
