"""Continuous-batching decode loop for local transformers models (greedy or sampled).

`LocalModel.generate` hands this loop every request that shares sampling settings. Rather than one
HF `generate` call per fixed batch, requests stream through one running batch:

- **prefill**: waiting rows, sorted by length, are prefilled in small chunks (little padding)
  after the shared prompt prefix, whose keys/values are computed once;
- **join**: a chunk's cache is merged into the running batch. Every row keeps the layout
  `[padding][own tokens][generated tokens]`, so all rows write their next key/value at the same
  column and one forward pass serves them all; position ids are tracked per row, so padding
  changes nothing the model sees (it is masked out of attention);
- **leave**: a row that emits EOS or reaches `max_tokens` leaves the batch at once (its cache rows
  are dropped), so the step cost shrinks and its slot goes to a waiting row; padding columns that
  no remaining row needs are cut off. The running batch is bounded in rows and in KV bytes.

What HF's defaults do that costs more than the model on a CPU is replaced:
- the KV cache's append by `torch.cat` (a copy of the whole cache per layer per step): here
  `BufferLayer` writes one column into a preallocated buffer;
- the shared prefix copied into every row's cache and read once per row per step: here it is held
  once (`_PREFIX`) and the decode attention reads it with one matrix product for all rows;
- SDPA for one query token: here `decode_attention` runs grouped matmuls in fp32.

Greedy decoding takes the argmax of the last position's logits in fp32, as
`generate(do_sample=False)` does; sampling applies temperature then top-p, as HF's warpers do, from
a seeded generator. Each forward computes logits for the last position only. In fp32 the tokens
are those of HF `generate` (tests/test_decoding.py); in bf16, as with any change of batch shape,
a near-tie can round the other way.

    decoder = Decoder(model, eos_token_id=2, pad_token_id=2, max_batch=256, prefill_batch=32)
    results = decoder.run(token_rows, max_new_tokens=12, prefix_len=90, prefix_cache=cache)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from flywheel.models.kv_cache import cache_kwarg, output_cache
from flywheel.models.memory import release_memory

# The attention implementation the loop switches the model to while it runs (registered below).
ATTENTION = "flywheel_decode"

# One forward pass of a loop at a time per process: a pass switches the model's attention
# implementation and sets `_PREFIX`.
_RUN_LOCK = threading.Lock()

# A running batch is refilled once this fraction of its slots is free (a prefill pass has a fixed
# cost, so refilling one slot at a time would spend more than it saves).
REFILL_FRACTION = 0.25

# The running batch's KV cache stays under this many bytes: long prompts get fewer rows at once.
KV_BUDGET_BYTES = 1 << 28
# A long stream (a capture over thousands of rows) hands freed heap back this often (seconds on the
# loop's clock): each wave's caches are freed, but glibc keeps the pages, so the resident set climbs.
TRIM_EVERY_S = 5.0


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    """Attention while the decode loop runs: the shared prompt prefix read once, not once per row.

    The running batch's cache holds each row's own tokens only; the prefix's keys and values (the
    same for every row) live in `_PREFIX`, set by `Decoder._forward`. Every row sees the whole prefix,
    then its own tokens under `attention_mask`.

    Decode steps on CPU (one query token per row) run as matmuls in fp32, as SDPA's kernels
    accumulate: the prefix part is one matrix product per key/value head for all rows at once, the
    own part a batched product per row; each key/value head serves its group of query heads in
    place (no `repeat_kv`). torch's CPU SDPA kernel is slow for one query token per row (measured:
    17 ms vs 1.2 ms of CPU for 128 rows x 9 heads x 135 keys, on a loaded machine). Prefill
    (several query tokens per row) and other devices use SDPA over the prefix and own keys joined.
    """
    prefix = _PREFIX[module.layer_idx] if _PREFIX else None
    if (query.shape[2] != 1 or query.device.type != "cpu" or dropout
            or kwargs.get("position_bias") is not None):
        return _sdpa_with_prefix(module, query, key, value, attention_mask, prefix, dropout, scaling, **kwargs)
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    grouped = query.float().reshape(batch, kv_heads, group, dim)
    scores = torch.matmul(grouped, key.float().transpose(-1, -2)).mul_(scale)  # [batch, kv_heads, group, keys]
    if attention_mask is not None:
        mask = attention_mask.reshape(batch, 1, 1, keys)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    if prefix is not None:
        prefix_keys, prefix_values = prefix.keys32, prefix.values32  # [kv_heads, prefix, dim]
        # [kv_heads, batch * group, dim] x [kv_heads, dim, prefix]: one product for every row.
        shared = torch.matmul(grouped.transpose(0, 1).reshape(kv_heads, batch * group, dim),
                              prefix_keys.transpose(-1, -2)).mul_(scale)
        shared = shared.view(kv_heads, batch, group, -1).transpose(0, 1)
        probs = torch.cat([shared, scores], dim=-1).softmax(dim=-1)
        width = prefix_keys.shape[1]
        out = torch.matmul(probs[..., width:], value.float())
        out += torch.matmul(probs[..., :width].transpose(0, 1).reshape(kv_heads, batch * group, width),
                            prefix_values).view(kv_heads, batch, group, dim).transpose(0, 1)
    else:
        out = torch.matmul(scores.softmax(dim=-1), value.float())  # [batch, kv_heads, group, dim]
    return out.to(query.dtype).view(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def _sdpa_with_prefix(module, query, key, value, attention_mask, prefix, dropout, scaling, **kwargs):
    """transformers' SDPA attention over [prefix keys][own keys], every row seeing the whole prefix."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    batch, length, own = query.shape[0], query.shape[2], key.shape[2]
    width = prefix.keys.shape[2]
    key = torch.cat([prefix.keys.expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix.values.expand(batch, -1, -1, -1), value], dim=2)
    if attention_mask is None:  # causal over the own tokens, as SDPA's is_causal would be
        attention_mask = torch.ones(length, own, dtype=torch.bool, device=query.device).tril(own - length)
        attention_mask = attention_mask.expand(batch, 1, length, own)
    if attention_mask.dtype == torch.bool:
        seen = torch.ones(*attention_mask.shape[:-1], width, dtype=torch.bool, device=query.device)
    else:
        seen = torch.zeros(*attention_mask.shape[:-1], width, dtype=attention_mask.dtype, device=query.device)
    attention_mask = torch.cat([seen, attention_mask], dim=-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


@dataclass
class _Prefix:
    """One layer's keys/values of the shared prompt prefix: as computed, and widened to fp32."""

    keys: torch.Tensor  # [1, kv_heads, prefix, dim], the model's dtype
    values: torch.Tensor
    keys32: torch.Tensor  # [kv_heads, prefix, dim], fp32
    values32: torch.Tensor


# The shared prefix of the loop's current forward pass, per layer (set by Decoder._forward under
# _RUN_LOCK for one pass; empty otherwise).
_PREFIX: list[_Prefix] = []


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


_register_attention()


@dataclass
class DecodeResult:
    """Generated token ids of one row (EOS included when it stopped), why it ended, and the row's
    own time in the loop: `latency_s` runs from its admission into the running batch (taken off the
    waiting list, before its prefill) to its last token, on the loop's clock, which stops while the
    consumer of `Decoder.stream` holds a yielded row (grading it, say). Time spent waiting for a
    slot is not in it; the other rows' prefills and steps while it runs are."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    latency_s: float = 0.0
    admitted_at: float = field(default=0.0, repr=False)  # on the loop's clock (Decoder._clock)


@dataclass
class _Batch:
    """The running batch: one cache, one mask and per-row state, aligned on the batch dimension."""

    cache: Any  # a transformers DynamicCache, [rows, heads, width, dim] per layer
    mask: torch.Tensor  # [rows, width] 1 for real tokens, 0 for padding
    positions: torch.Tensor  # [rows] position id of each row's next token
    last: torch.Tensor  # [rows] each row's latest token (the next step's input)
    owners: list[int]  # request index of each row
    lead: list[int]  # padding columns right after the prefix, per row

    @property
    def width(self) -> int:
        return self.mask.shape[1]


@dataclass
class DecodeStats:
    """What one `Decoder.run` did: forward passes by kind and the largest running batch."""

    prefills: int = 0
    steps: int = 0
    joins: int = 0
    peak_rows: int = 0


class Decoder:
    """Runs the continuous-batching loop on one loaded causal LM.

    `max_batch` bounds the running batch; `prefill_batch` bounds one prefill chunk. Both trade
    memory for speed; the defaults suit a small model on a CPU. `kv_budget` (bytes) bounds the
    running batch's KV cache, so long prompts run in fewer rows at once.
    """

    def __init__(self, model, *, eos_token_id: int, pad_token_id: int, max_batch: int = 128,
                 prefill_batch: int = 32, kv_budget: int | None = None):
        self.model = model
        self._spare = 1
        # Set per run: the attention implementation the loop runs the model with (None: the model's
        # own) and the shared prefix's keys/values per layer.
        self._attention: str | None = None
        self._prefix: list[_Prefix] = []
        self.stats = DecodeStats()
        self._paused = 0.0  # seconds the current stream spent handed to its consumer
        self.eos = eos_token_id
        self.pad = pad_token_id
        self.max_batch = max_batch
        self.prefill_batch = prefill_batch
        self.kv_budget = KV_BUDGET_BYTES if kv_budget is None else kv_budget
        self._cache_kwarg = cache_kwarg(model)

    # -- public -----------------------------------------------------------------------------------
    def run(self, rows: list[list[int]], *, max_new_tokens: int, prefix_len: int = 0, prefix_cache=None,
            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[DecodeResult]:
        """Decode every row (token ids of a rendered prompt); results in the order of `rows`.

        `prefix_cache` is the KV cache of `rows[i][:prefix_len]`, which every row must share.
        """
        results = [DecodeResult() for _ in rows]
        for index, result in self.stream(rows, max_new_tokens=max_new_tokens, prefix_len=prefix_len,
                                         prefix_cache=prefix_cache, temperature=temperature, top_p=top_p,
                                         seed=seed):
            results[index] = result
        return results

    def stream(self, rows: list[list[int]], *, max_new_tokens: int, prefix_len: int = 0, prefix_cache=None,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Iterator[tuple[int, DecodeResult]]:
        """Decode every row as `run` does, yielding (row index, result) as each row finishes.

        Nothing is held between two forward passes (the model's attention is switched, and the
        process-wide lock taken, for each pass only), so the consumer may use the same model —
        a model-graded grader, say — while the loop waits for it.
        """
        if not rows or max_new_tokens <= 0:
            yield from ((index, DecodeResult()) for index in range(len(rows)))
            return
        self._spare = max_new_tokens + 1
        self.stats = DecodeStats()
        self._paused = 0.0
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
        # The loop's own attention (the shared prefix read once) replaces SDPA; other attention
        # implementations get whole prompts and their own kernels.
        self._attention = ATTENTION if self.model.config._attn_implementation in ("sdpa", ATTENTION) else None
        self._prefix = []
        if self._attention and prefix_len:
            self._prefix = [_prefix_of(layer) for layer in _layers(prefix_cache)]
        else:
            prefix_len = 0
        waiting = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
        results = [DecodeResult() for _ in rows]
        batch: _Batch | None = None
        trimmed = self._clock()
        while waiting or batch is not None:
            with torch.inference_mode():  # not across a yield: the consumer's code runs there
                batch, finished, waiting = self._turn(rows, waiting, batch, results, max_new_tokens, prefix_len,
                                                      temperature, top_p, generator)
            if self._clock() - trimmed >= TRIM_EVERY_S:
                release_memory(collect=False)
                trimmed = self._clock()
            handed = time.perf_counter()
            for owner in finished:
                yield owner, results[owner]
            self._paused += time.perf_counter() - handed

    def _clock(self) -> float:
        """Seconds on the loop's own clock: wall time less the time its consumer held a yield."""
        return time.perf_counter() - self._paused

    def _turn(self, rows, waiting, batch, results, max_new_tokens, prefix_len, temperature, top_p, generator):
        """Refill the running batch if it has room, then one decode step; (batch, finished owners, waiting)."""
        finished: list[int] = []
        free = self.max_batch - (len(batch.owners) if batch else 0)
        if waiting and (batch is None or free >= max(1, int(self.max_batch * REFILL_FRACTION))):
            taken = self._admit(rows, waiting, free, batch, prefix_len)
            waiting = waiting[len(taken):]
            admitted = self._clock()
            for index in taken:
                results[index].admitted_at = admitted
            for start in range(0, len(taken), self.prefill_batch):
                chunk = taken[start:start + self.prefill_batch]
                joined, logits = self._prefill([rows[i] for i in chunk], chunk, prefix_len)
                joined, done = self._advance(joined, logits, results, max_new_tokens, temperature, top_p, generator)
                finished += done
                if batch is not None and joined is not None:
                    self.stats.joins += 1
                batch = _merge(batch, joined, self._spare)
                if batch is not None:
                    self.stats.peak_rows = max(self.stats.peak_rows, len(batch.owners))
        if batch is not None:
            logits = self._step(batch)
            batch, done = self._advance(batch, logits, results, max_new_tokens, temperature, top_p, generator)
            finished += done
            if batch is not None:
                batch = _compact(batch, self._spare)
        return batch, finished, waiting

    def _admit(self, rows, waiting: list[int], free: int, batch: _Batch | None, prefix_len: int) -> list[int]:
        """The waiting rows (shortest first) that join now: up to `free`, within the KV budget."""
        per_column = self._kv_bytes_per_token()
        running = len(batch.owners) if batch else 0
        width = batch.width + self._spare if batch else 0  # columns each row may come to hold
        taken: list[int] = []
        for index in waiting[:free]:
            width = max(width, len(rows[index]) - prefix_len + self._spare)
            if (running or taken) and (running + len(taken) + 1) * width * per_column > self.kv_budget:
                break  # an empty batch always takes one row, however long
            taken.append(index)
        return taken

    def _kv_bytes_per_token(self) -> int:
        """Bytes one token's keys and values take across the layers (0 when the config does not say)."""
        config = self.model.config.get_text_config(decoder=True)
        heads = getattr(config, "num_attention_heads", 0) or 0
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
        size = torch.empty((), dtype=self.model.dtype).element_size()
        return 2 * getattr(config, "num_hidden_layers", 0) * kv_heads * head_dim * size

    # -- one forward pass -------------------------------------------------------------------------
    def _forward(self, input_ids, mask, positions, cache):
        config = self.model.config
        with _RUN_LOCK:
            attention = config._attn_implementation
            if self._attention:
                config._attn_implementation = self._attention
                _PREFIX[:] = self._prefix
            try:
                out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                 use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
            finally:
                config._attn_implementation = attention
                _PREFIX.clear()
        cache = output_cache(out)
        return out.logits[:, -1, :].float(), cache

    def _prefill(self, rows: list[list[int]], owners: list[int], prefix_len: int):
        """Prefill a chunk of rows after the shared prefix; returns its batch and last logits."""
        self.stats.prefills += 1
        device = self.model.device
        own = [r[prefix_len:] for r in rows]
        longest = max(len(o) for o in own)
        lead = [longest - len(o) for o in own]
        ids = torch.tensor([[self.pad] * gap + o for gap, o in zip(lead, own)], device=device)
        mask = torch.tensor([[0] * gap + [1] * len(o) for gap, o in zip(lead, own)], device=device)
        positions = prefix_len + (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        if prefix_len:  # an empty cache with room for the chunk's own tokens and its answers
            cache = DynamicCache()
            cache.layers = [BufferLayer.holding(p.keys[:, :, :0].expand(len(rows), -1, -1, -1),
                                                p.values[:, :, :0].expand(len(rows), -1, -1, -1),
                                                longest + self._spare) for p in self._prefix]
        logits, cache = self._forward(ids, mask, positions, cache)
        if not prefix_len:
            _install(cache, [(layer.keys, layer.values) for layer in _layers(cache)], self._spare)
        batch = _Batch(cache=cache, mask=mask, positions=positions[:, -1] + 1, last=ids[:, -1],
                       owners=list(owners), lead=lead)
        return batch, logits

    def _step(self, batch: _Batch):
        """One decode step of the whole running batch; returns last-position logits."""
        self.stats.steps += 1
        ones = torch.ones((batch.mask.shape[0], 1), dtype=batch.mask.dtype, device=batch.mask.device)
        batch.mask = torch.cat([batch.mask, ones], dim=1)
        logits, batch.cache = self._forward(batch.last[:, None], batch.mask, batch.positions[:, None],
                                            batch.cache)
        batch.positions = batch.positions + 1
        return logits

    # -- choosing tokens, finishing rows ------------------------------------------------------------
    def _advance(self, batch: _Batch, logits, results, max_new_tokens, temperature, top_p, generator):
        """Pick each row's next token, record it, and drop rows that are done.

        Returns the batch (None once every row is done) and the owners of the rows that finished."""
        if temperature > 0:
            chosen = _sample(logits, temperature, top_p, generator)
        else:
            chosen = logits.argmax(dim=-1)
        keep, finished = [], []
        now = self._clock()
        for row, (owner, token) in enumerate(zip(batch.owners, chosen.tolist())):
            result = results[owner]
            result.tokens.append(token)
            if token == self.eos:
                result.finish_reason = "stop"
            elif len(result.tokens) < max_new_tokens:
                keep.append(row)
                continue
            result.latency_s = now - result.admitted_at
            finished.append(owner)
        batch.last = chosen
        if len(keep) == len(batch.owners):
            return batch, finished
        if not keep:
            return None, finished
        return _select(batch, keep), finished


def _sample(logits, temperature: float, top_p: float, generator):
    """Temperature, then nucleus (top-p) filtering as HF's TopPLogitsWarper does, then one draw."""
    scores = logits / temperature
    if top_p < 1.0:
        sorted_scores, sorted_index = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(1, sorted_index, remove), -float("inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# -- cache surgery --------------------------------------------------------------------------------
def _layers(cache):
    return cache.layers


class BufferLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views of preallocated [rows, heads, capacity, dim] buffers.

    DynamicLayer appends by `torch.cat`, which copies the whole cache every step: at batch 128 that
    copy cost about as much as the model's matmuls. Here a step writes its one column in place.
    """

    def __init__(self, buffers: list[torch.Tensor], length: int):
        super().__init__()
        self.device = buffers[0].device
        self.is_initialized = True
        self._buffers = buffers
        self._length = length
        self._views()

    @classmethod
    def holding(cls, keys, values, spare: int) -> BufferLayer:
        """A layer holding copies of `keys`/`values` with room for `spare` more columns."""
        length = keys.shape[2]
        return cls([_allocate(t, length + spare) for t in (keys, values)], length)

    def _views(self):
        self.keys = self._buffers[0][:, :, :self._length]
        self.values = self._buffers[1][:, :, :self._length]

    @property
    def capacity(self) -> int:
        return self._buffers[0].shape[2]

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the new columns in place (growing the buffer if full); return all keys/values."""
        new = key_states.shape[2]
        if self._length + new > self.capacity:
            self._buffers = [_allocate(t, 2 * (self._length + new)) for t in (self.keys, self.values)]
        self._buffers[0][:, :, self._length:self._length + new].copy_(key_states)
        self._buffers[1][:, :, self._length:self._length + new].copy_(value_states)
        self._length += new
        self._views()
        return self.keys, self.values

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the rows `index`: one copy of the whole buffers, spare columns included."""
        self._buffers = [b.index_select(0, index) for b in self._buffers]
        self._views()

    def cut_columns(self, start: int, count: int, spare: int) -> None:
        """Drop `count` columns from `start` on (padding no remaining row needs)."""
        keep = self._length - count
        buffers = []
        for buffer in self._buffers:
            shape = list(buffer.shape)
            shape[2] = keep + spare
            cut = buffer.new_empty(shape)
            cut[:, :, :start].copy_(buffer[:, :, :start])
            cut[:, :, start:keep].copy_(buffer[:, :, start + count:self._length])
            buffers.append(cut)
        self._buffers, self._length = buffers, keep
        self._views()


def _allocate(tensor, capacity: int):
    """A [batch, heads, capacity, dim] buffer starting with `tensor`'s columns."""
    shape = list(tensor.shape)
    shape[2] = capacity
    buffer = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
    buffer[:, :, :tensor.shape[2]].copy_(tensor)
    return buffer


def _install(cache, tensors: list[tuple[torch.Tensor, torch.Tensor]], spare: int) -> None:
    """Replace the cache's layers by in-place-append layers holding copies of `tensors` (keys, values)."""
    cache.layers = [BufferLayer.holding(keys, values, spare) for keys, values in tensors]


def _prefix_of(layer) -> _Prefix:
    """A prefix cache layer ([1, kv_heads, prefix, dim]) as the attention reads it."""
    return _Prefix(keys=layer.keys, values=layer.values, keys32=layer.keys[0].float(),
                   values32=layer.values[0].float())


def _pad_left(tensor, extra: int, dim: int):
    """`extra` zero columns in front of `tensor` along `dim`."""
    if extra == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = extra
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _stack_rows(parts: list[tuple[torch.Tensor, int]], width: int, capacity: int):
    """One [rows, heads, capacity, dim] buffer holding each part's rows, each padded on the left to
    `width` columns (`parts`: (keys or values, padding columns))."""
    first = parts[0][0]
    rows = sum(t.shape[0] for t, _ in parts)
    buffer = first.new_empty((rows, first.shape[1], capacity, first.shape[3]))
    row = 0
    for tensor, extra in parts:
        span = buffer[row:row + tensor.shape[0]]
        span[:, :, :extra].zero_()
        span[:, :, extra:width].copy_(tensor)
        row += tensor.shape[0]
    return buffer


def _merge(batch: _Batch | None, joined: _Batch | None, spare: int) -> _Batch | None:
    """Append `joined`'s rows to `batch`, padding whichever is narrower on the left."""
    if batch is None or joined is None:
        return joined if batch is None else batch
    width = max(batch.width, joined.width)
    extra_a, extra_b = width - batch.width, width - joined.width
    layers = []
    for layer_a, layer_b in zip(_layers(batch.cache), _layers(joined.cache)):
        buffers = [_stack_rows([(a, extra_a), (b, extra_b)], width, width + spare)
                   for a, b in ((layer_a.keys, layer_b.keys), (layer_a.values, layer_b.values))]
        layers.append(BufferLayer(buffers, width))
    batch.cache.layers = layers
    batch.mask = torch.cat([_pad_left(batch.mask, extra_a, 1), _pad_left(joined.mask, extra_b, 1)])
    batch.positions = torch.cat([batch.positions, joined.positions])
    batch.last = torch.cat([batch.last, joined.last])
    batch.owners = batch.owners + joined.owners
    batch.lead = [x + extra_a for x in batch.lead] + [x + extra_b for x in joined.lead]
    return batch


def _select(batch: _Batch, keep: list[int]) -> _Batch:
    """Keep only the rows `keep` of the running batch."""
    index = torch.tensor(keep, device=batch.mask.device)
    for layer in _layers(batch.cache):
        layer.select_rows(index)
    batch.mask = batch.mask.index_select(0, index)
    batch.positions = batch.positions.index_select(0, index)
    batch.last = batch.last.index_select(0, index)
    batch.owners = [batch.owners[i] for i in keep]
    batch.lead = [batch.lead[i] for i in keep]
    return batch


def _compact(batch: _Batch, spare: int) -> _Batch:
    """Cut the padding columns on the left that every remaining row has."""
    cut = min(batch.lead)
    if cut == 0:
        return batch
    for layer in _layers(batch.cache):
        layer.cut_columns(0, cut, spare)
    batch.mask = batch.mask[:, cut:]
    batch.lead = [x - cut for x in batch.lead]
    return batch
