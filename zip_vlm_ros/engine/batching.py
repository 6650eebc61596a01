"""Batched decoding across concurrent requests (continuous batching): one LLM forward per step for every
running request, with requests joining and leaving at step boundaries.

No ROS here. The node's worker drives a ``DecodeBatch`` step by step:

    batch = DecodeBatch(engine.generator, max_rows=4)
    request = engine.open_request(image, ["Is the path clear?"], should_stop=..., on_token=...)
    batch.admit(request)              # its prefill (alone), then its row joins the batch
    while batch:
        for ended in batch.step():    # one token for every row; the requests that ended this step
            ended.outputs / ended.error

Decoding reads every weight once per step whatever the number of rows, so k rows cost little more than
one. A request is prefilled alone (``Generator.prefill_step``: its frame's cached prefix is forked,
never written) and its key/value cache then joins the batch's: rows of different lengths are left-padded
with zeros that an attention mask hides, and each row's next position is its own count of real tokens,
as stock ``generate`` does for a left-padded batch (a family with positions of its own, Qwen2.5-VL's
M-RoPE, gives each row its ``text_positions`` after that row's own images). A row leaves on EOS, ``max_new_tokens``, a stop from
its ``should_stop`` (cancel, deadline) or an error in its own prefill; the others keep their caches and
positions (the leaving row is removed from the batch, and padding columns no row needs any more are
dropped). The batch's cache layers (``RoomyLayer``) are views of buffers with room for ``GROWTH`` more
positions, written in place: transformers' DynamicLayer copies the whole cache with ``torch.cat`` on every
step, which for four rows was 14% of a step on the bench preset. A request with several prompts
(``generate_many``) answers them in order: when one prompt's row ends, the next prompt is prefilled and
joins in its place.

Each row keeps its own token chooser (sampling options, a generator seeded afresh per prompt), stream
(``on_token``) and stop check, so its answer does not depend on which rows run beside it. In float32 a
row's answer equals its answer alone token for token (the tests check frames, lengths, early ends,
cancels and seeded sampling): the padded keys get exactly zero attention weight, and batching changes
only the order of float sums (a few 1e-6). With one row there is no padding and no mask: the step is the
same forward as ``Generator.decode``'s.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from zip_vlm_ros.engine.generation import Generator, PrefillStep
from zip_vlm_ros.engine.outputs import GenerationStopped, OnToken, ShouldStop, VlmOutput
from zip_vlm_ros.engine.sampling import SamplingOptions, token_chooser

__all__ = ["BatchRequest", "DecodeBatch", "RoomyLayer", "mergeable_cache"]

# prompt index, check_stop -> (its PrefillStep, its start time on the engine clock)
Prefill = Callable[[int, Callable[..., None]], tuple[PrefillStep, float]]
# prompt index, tokens, step, start, first token time, end time -> the prompt's VlmOutput
MakeOutput = Callable[[int, list[int], PrefillStep, float, float, float], VlmOutput]


class BatchRequest:
    """One caller's request as a DecodeBatch runs it: prompts about one image, answered in order.

    Made by ``VlmEngine.open_request`` (which checks the arguments). Once ``ended``: ``outputs`` holds
    one VlmOutput per prompt, or ``error`` holds why it stopped (GenerationStopped from its
    ``should_stop``, with the tokens of the prompt being decoded and the prompts answered before, or the
    exception its prefill raised) and ``outputs`` the prompts answered before that.
    """

    def __init__(self, prompts: Sequence[str], *, prefill: Prefill, make_output: MakeOutput, max_new_tokens: int,
                 sampling: SamplingOptions, should_stop: ShouldStop | None, on_token: OnToken | None):
        self.prompts = list(prompts)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.should_stop = should_stop
        self.on_token = on_token
        self.prefill = prefill
        self.make_output = make_output
        self.outputs: list[VlmOutput] = []
        self.error: BaseException | None = None

    @property
    def ended(self) -> bool:
        return self.error is not None or len(self.outputs) == len(self.prompts)


class _Row:
    """A prompt being decoded: its request, its last logits and the tokens it generated."""

    def __init__(self, request: BatchRequest, generator: Generator, step: PrefillStep, start: float):
        self.request = request
        self.prompt_index = len(request.outputs)
        self.step, self.start = step, start
        self.logits = step.logits                          # [1, vocab] float32
        self.choose = token_chooser(request.sampling, generator.device)
        self.tokens: list[int] = []
        self.generated = torch.empty((1, 0), dtype=torch.long, device=generator.device)
        self.on_step = generator.text_stream(request.on_token, self.prompt_index, start)
        self.check_stop = generator.stop_checker(request.should_stop, completed=request.outputs)
        self.first_token_time: float | None = None
        self.length = step.kv_cache.get_seq_length()          # real tokens in its cache: its next position


class DecodeBatch:
    """The running rows of concurrent requests on one model, decoded together one step at a time.

    Thread-compatible like the engine: admit and step from one thread (the node's worker). `max_rows`
    bounds the rows decoding at once (``accepts`` says whether another may join now).
    """

    def __init__(self, generator: Generator, max_rows: int):
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be a whole number >= 1; got {max_rows!r}")
        self.generator = generator
        self.max_rows = max_rows
        self.rows: list[_Row] = []
        self.kv_cache = None                 # every row's cache: [rows, kv_heads, length, head_dim] per layer
        self.attention_mask: torch.Tensor | None = None   # [rows, length], None when no row is padded
        self._mergeable = True               # False once a cache kind that cannot be batched was seen

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def accepts(self) -> bool:
        """Whether a request may be admitted now (a free row, and caches that can share a batch)."""
        return not self.rows or (len(self.rows) < self.max_rows and self._mergeable)

    @torch.inference_mode()
    def admit(self, request: BatchRequest) -> bool:
        """Prefill `request`'s next prompt and add its row. False when the request ended instead (its
        ``error`` says why: stopped, or its prefill failed); the running rows are not affected."""
        if not self.accepts:
            raise ValueError(f"the batch is full ({len(self.rows)} of {self.max_rows} rows): check accepts first")
        check_stop = self.generator.stop_checker(request.should_stop, completed=request.outputs)
        try:
            check_stop()
            step, start = request.prefill(len(request.outputs), check_stop)
        except Exception as error:  # GenerationStopped, or a bad frame or OOM of this request only
            request.error = error
            return False
        self._join(_Row(request, self.generator, step, start))
        return True

    @torch.inference_mode()
    def step(self) -> list[BatchRequest]:
        """One token for every row, then one forward over the rows that go on. Returns the requests that
        ended in this step (answered, stopped, or failed), each once. An error of the shared forward
        ends every running request with it and empties the batch."""
        ended: list[BatchRequest] = []
        staying, next_prompts = [], []
        for row in self.rows:
            try:
                outcome = self._choose(row)
            except Exception as error:  # its should_stop or on_token failed: this request only
                row.request.error, outcome = error, "left"
            if outcome == "continue":
                staying.append(row)
            elif row.request.ended:
                ended.append(row.request)
            else:
                next_prompts.append(row.request)
        self._keep(staying)
        if self.rows:
            try:
                self._forward()
            except Exception as error:
                for row in self.rows:
                    row.request.error = error
                    ended.append(row.request)
                self._keep([])
        for request in next_prompts:  # its next prompt joins in the row it left
            if not self.admit(request):
                ended.append(request)
        return ended

    def _choose(self, row: _Row) -> str:
        """Row's next token: "continue", or "left" (its request's error or next output is set)."""
        try:
            row.check_stop(row.generated)
        except GenerationStopped as stopped:
            row.request.error = stopped
            return "left"
        token = row.choose(row.generated, row.logits)           # [1]
        row.generated = torch.cat([row.generated, token[:, None]], dim=1)
        token_id = int(token[0])
        row.tokens.append(token_id)
        if row.first_token_time is None:
            row.first_token_time = self.generator.clock.now()
        last = token_id in self.generator.eos_token_ids or len(row.tokens) >= row.request.max_new_tokens
        if row.on_step is not None:
            row.on_step(token_id, last)
        if not last:
            return "continue"
        row.request.outputs.append(row.request.make_output(
            row.prompt_index, row.tokens, row.step, row.start, row.first_token_time, self.generator.clock.now()))
        return "left"

    def _forward(self) -> None:
        """Feed every row's last token; each row's logits become the next step's."""
        next_tokens = torch.cat([row.generated[:, -1:] for row in self.rows])          # [rows, 1]
        family = self.generator.family
        attention_mask = position_ids = None
        if self.attention_mask is not None:
            attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((len(self.rows), 1))], 1)
        if not family.batches_prompts:  # M-RoPE (Qwen2.5-VL): each row's own positions after its own images
            position_ids = torch.cat([family.text_positions(row.step.prefix.family_state, row.length, 1)
                                      for row in self.rows], dim=1)                     # [3, rows, 1]
        elif attention_mask is not None:  # left-padded rows: each row's count of real tokens
            position_ids = torch.tensor([[row.length] for row in self.rows], device=next_tokens.device)
        logits = self.generator.model(input_ids=next_tokens, attention_mask=attention_mask, position_ids=position_ids,
                                      past_key_values=self.kv_cache, use_cache=True).logits[:, -1].float()
        self.attention_mask = attention_mask
        for index, row in enumerate(self.rows):
            row.logits = logits[index:index + 1]
            row.length += 1

    def _join(self, row: _Row) -> None:
        """Add `row`'s cache to the batch's, left-padding the shorter side, in layers with room to grow."""
        cache = row.step.kv_cache
        if not self.rows:
            self._mergeable = mergeable_cache(cache)
            self.rows, self.kv_cache, self.attention_mask = [row], cache, None
            if self._mergeable:  # its own buffers: decoding then writes in place, and never into a prefix
                self.kv_cache = _roomy_cache(cache, [(layer.keys, layer.values) for layer in cache.layers])
            return
        if not mergeable_cache(cache):
            raise ValueError("this cache kind cannot join a batch; admit the request when the batch is empty")
        length = self.kv_cache.get_seq_length()
        new_length = max(length, row.length)
        mask = self.attention_mask
        if mask is None:
            mask = torch.ones((len(self.rows), length), dtype=torch.long, device=row.logits.device)
        row_mask = torch.ones((1, row.length), dtype=torch.long, device=mask.device)
        self.attention_mask = torch.cat([_pad_left(mask, new_length), _pad_left(row_mask, new_length)])
        self.kv_cache = _roomy_cache(self.kv_cache, [
            (torch.cat([_pad_left(layer.keys, new_length, dim=2), _pad_left(row_layer.keys, new_length, dim=2)]),
             torch.cat([_pad_left(layer.values, new_length, dim=2), _pad_left(row_layer.values, new_length, dim=2)]))
            for layer, row_layer in zip(self.kv_cache.layers, cache.layers)])
        self.rows.append(row)

    def _keep(self, staying: list[_Row]) -> None:
        """Remove every row not in `staying` from the batch, and padding columns no staying row needs."""
        if len(staying) == len(self.rows):
            return
        if not staying:
            self.rows, self.kv_cache, self.attention_mask = [], None, None
            self._mergeable = True
            return
        kept = torch.tensor([self.rows.index(row) for row in staying], device=staying[0].logits.device)
        first = 0
        mask = self.attention_mask
        if mask is not None:
            mask = mask.index_select(0, kept)
            first = int(mask.any(dim=0).nonzero()[0])            # the first column a staying row uses
            mask = mask[:, first:]
            mask = None if bool(mask.all()) else mask
        self.kv_cache = _roomy_cache(self.kv_cache, [
            (layer.keys.index_select(0, kept)[:, :, first:], layer.values.index_select(0, kept)[:, :, first:])
            for layer in self.kv_cache.layers])
        self.rows, self.attention_mask = staying, mask


def _pad_left(tensor: torch.Tensor, length: int, dim: int = -1) -> torch.Tensor:
    """`tensor` with zeros prepended along `dim` up to `length`."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


# Positions a batch layer's buffers hold beyond its keys and values: one copy of the cache per this many
# decode steps instead of one per step (transformers' DynamicLayer grows by torch.cat into new tensors).
GROWTH = 64


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of buffers with room for ``GROWTH`` more positions:
    ``update`` writes the step's keys and values in place, and copies the layer into larger buffers only
    when they are full. The views hold exactly the values torch.cat would have made, so attention reads
    the same numbers.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.key_buffer = self.value_buffer = None
        self._store(keys, values)

    def _store(self, keys: torch.Tensor, values: torch.Tensor, room: int = GROWTH) -> None:
        """Copy `keys` and `values` ``[rows, kv_heads, length, head_dim]`` into new buffers with `room` more
        positions."""
        rows, heads, length, head_dim = keys.shape
        self.key_buffer = keys.new_empty((rows, heads, length + room, head_dim))
        self.value_buffer = values.new_empty((rows, heads, length + room, values.shape[-1]))
        self.key_buffer[:, :, :length] = keys
        self.value_buffer[:, :, :length] = values
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        length, added = self.keys.shape[-2], key_states.shape[-2]
        if length + added > self.key_buffer.shape[-2]:
            self._store(self.keys, self.values, room=max(GROWTH, added))
        self.key_buffer[:, :, length:length + added] = key_states
        self.value_buffer[:, :, length:length + added] = value_states
        self.keys = self.key_buffer[:, :, :length + added]
        self.values = self.value_buffer[:, :, :length + added]
        return self.keys, self.values


def _roomy_cache(template, layers: list[tuple[torch.Tensor, torch.Tensor]]):
    """A copy of DynamicCache `template` whose layers hold `layers` ``(keys, values)`` (each
    ``[rows, kv_heads, length, head_dim]``, copied) in RoomyLayers."""
    roomy = copy.copy(template)
    roomy.layers = [RoomyLayer(keys, values) for keys, values in layers]
    return roomy


def mergeable_cache(kv_cache) -> bool:
    """Whether `kv_cache` can share a batch: transformers' DynamicCache of plain DynamicLayers (a
    sliding-window or quantized layer keeps positions of its own)."""
    return type(kv_cache) is DynamicCache and all(type(layer) in (DynamicLayer, RoomyLayer) and layer.is_initialized
                                                  for layer in kv_cache.layers)
