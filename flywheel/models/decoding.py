"""Continuous-batching decode loop for local transformers models (greedy or sampled).

`LocalModel.generate` hands this loop every request that shares sampling settings. Rather than one
HF `generate` call per fixed batch, requests stream through one running batch:

- **prefill**: waiting rows, sorted by length, are prefilled in small chunks (little padding) on
  top of the shared prompt prefix's KV cache, which is computed once and reused;
- **join**: a chunk's cache is merged into the running batch. Every row keeps the layout
  `[prefix][padding][own tokens][generated tokens]`, so all rows write their next key/value at the
  same column and one forward pass serves them all; position ids are tracked per row, so padding
  changes nothing the model sees (it is masked out of attention);
- **leave**: a row that emits EOS or reaches `max_tokens` leaves the batch at once (its cache rows
  are dropped), so the step cost shrinks and its slot goes to a waiting row; padding columns that
  no remaining row needs are cut off.

Two things HF's defaults do that cost more than the model on a CPU are replaced: the KV cache's
append by `torch.cat` (a copy of the whole cache per layer per step; here `BufferLayer` writes one
column into a preallocated buffer), and SDPA for one query token (here `decode_attention`).

Greedy decoding takes the argmax of the last position's logits in fp32, as
`generate(do_sample=False)` does; sampling applies temperature then top-p, as HF's warpers do, from
a seeded generator. Each forward computes logits for the last position only. In fp32 the tokens
are those of HF `generate` (tests/test_decoding.py); in bf16, as with any change of batch shape,
a near-tie can round the other way.

    decoder = Decoder(model, eos_token_id=2, pad_token_id=2, max_batch=128, prefill_batch=32)
    results = decoder.run(token_rows, max_new_tokens=12, prefix_len=90, prefix_cache=cache)
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

# The attention implementation the loop switches the model to while it runs (registered below).
ATTENTION = "flywheel_decode"

# One loop at a time per process: `run` switches the model's attention implementation while it runs.
_RUN_LOCK = threading.Lock()

# A running batch is refilled once this fraction of its slots is free (a prefill pass has a fixed
# cost, so refilling one slot at a time would spend more than it saves).
REFILL_FRACTION = 0.25


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    """Decode steps on CPU: grouped-query attention as two batched matmuls in fp32; else SDPA.

    torch's CPU SDPA kernel is slow for one query token per row (measured: 17 ms vs 1.2 ms of CPU
    for 128 rows x 9 heads x 135 keys, on a loaded machine), and a decode step calls it once per
    layer. Here each key/value head serves its group of query heads in place (no `repeat_kv`), and
    scores, softmax and the weighted sum run in fp32, as SDPA's kernels accumulate. Prefill
    (several query tokens per row) stays on SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (query.shape[2] != 1 or query.device.type != "cpu" or dropout
            or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    group = heads // kv_heads
    grouped = query.float().reshape(batch, kv_heads, group * length, dim)
    scores = torch.matmul(grouped, key.float().transpose(-1, -2))
    scores = scores.mul_(dim ** -0.5 if scaling is None else scaling).view(batch, kv_heads, group, length, keys)
    if attention_mask is not None:
        mask = attention_mask.reshape(batch, 1, 1, attention_mask.shape[-2], keys)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    elif length > 1:
        causal = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril(keys - length)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1).view(batch, kv_heads, group * length, keys)
    out = torch.matmul(probs, value.float()).to(query.dtype)  # [batch, kv_heads, group * length, dim]
    return out.view(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


_register_attention()


@dataclass
class DecodeResult:
    """Generated token ids of one row (EOS included when it stopped) and why it ended."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"


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
    memory for speed; the defaults suit a small model on a CPU.
    """

    def __init__(self, model, *, eos_token_id: int, pad_token_id: int, max_batch: int = 128,
                 prefill_batch: int = 32):
        self.model = model
        self._spare = 1
        self.stats = DecodeStats()
        self.eos = eos_token_id
        self.pad = pad_token_id
        self.max_batch = max_batch
        self.prefill_batch = prefill_batch
        params = inspect.signature(model.forward).parameters
        # transformers renamed `past_key_values` to `cache` during 5.x.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    # -- public -----------------------------------------------------------------------------------
    def run(self, rows: list[list[int]], *, max_new_tokens: int, prefix_len: int = 0, prefix_cache=None,
            temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[DecodeResult]:
        """Decode every row (token ids of a rendered prompt); results in the order of `rows`.

        `prefix_cache` is the KV cache of `rows[i][:prefix_len]`, which every row must share.
        """
        results = [DecodeResult() for _ in rows]
        if not rows or max_new_tokens <= 0:
            return results
        self._spare = max_new_tokens + 1
        self.stats = DecodeStats()
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
        waiting = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
        config = self.model.config
        with _RUN_LOCK:
            attention = config._attn_implementation
            if attention == "sdpa":
                config._attn_implementation = ATTENTION
            try:
                self._loop(rows, waiting, results, max_new_tokens, prefix_len, prefix_cache, temperature, top_p,
                           generator)
            finally:
                config._attn_implementation = attention
        return results

    def _loop(self, rows, waiting, results, max_new_tokens, prefix_len, prefix_cache, temperature, top_p,
              generator) -> None:
        batch: _Batch | None = None
        with torch.inference_mode():
            while waiting or batch is not None:
                free = self.max_batch - (len(batch.owners) if batch else 0)
                if waiting and (batch is None or free >= max(1, int(self.max_batch * REFILL_FRACTION))):
                    taken, waiting = waiting[:free], waiting[free:]
                    for start in range(0, len(taken), self.prefill_batch):
                        chunk = taken[start:start + self.prefill_batch]
                        joined, logits = self._prefill([rows[i] for i in chunk], chunk, prefix_len, prefix_cache)
                        joined = self._advance(joined, logits, results, max_new_tokens, temperature, top_p,
                                               generator)
                        if batch is not None and joined is not None:
                            self.stats.joins += 1
                        batch = _merge(batch, joined, prefix_len, self._spare)
                        if batch is not None:
                            self.stats.peak_rows = max(self.stats.peak_rows, len(batch.owners))
                if batch is None:
                    continue
                logits = self._step(batch)
                batch = self._advance(batch, logits, results, max_new_tokens, temperature, top_p, generator)
                if batch is not None:
                    batch = _compact(batch, prefix_len, self._spare)

    # -- one forward pass -------------------------------------------------------------------------
    def _forward(self, input_ids, mask, positions, cache):
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        cache = getattr(out, "cache", None) or out.past_key_values
        return out.logits[:, -1, :].float(), cache

    def _prefill(self, rows: list[list[int]], owners: list[int], prefix_len: int, prefix_cache):
        """Prefill a chunk of rows after the shared prefix; returns its batch and last logits."""
        self.stats.prefills += 1
        device = self.model.device
        own = [r[prefix_len:] for r in rows]
        longest = max(len(o) for o in own)
        lead = [longest - len(o) for o in own]
        ids = torch.tensor([[self.pad] * gap + o for gap, o in zip(lead, own)], device=device)
        mask = torch.tensor([[1] * prefix_len + [0] * gap + [1] * len(o) for gap, o in zip(lead, own)],
                            device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_len:]
        cache = None
        if prefix_len:
            cache = _expand_cache(prefix_cache, len(rows), longest + self._spare)
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
        """Pick each row's next token, record it, and drop rows that are done (None if all are)."""
        if temperature > 0:
            chosen = _sample(logits, temperature, top_p, generator)
        else:
            chosen = logits.argmax(dim=-1)
        keep = []
        for row, (owner, token) in enumerate(zip(batch.owners, chosen.tolist())):
            result = results[owner]
            result.tokens.append(token)
            if token == self.eos:
                result.finish_reason = "stop"
            elif len(result.tokens) < max_new_tokens:
                keep.append(row)
        batch.last = chosen
        if len(keep) == len(batch.owners):
            return batch
        if not keep:
            return None
        return _select(batch, keep, self._spare)


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
    """A DynamicLayer whose keys/values are views of a preallocated buffer.

    DynamicLayer appends by `torch.cat`, which copies the whole cache every step: at batch 128 that
    copy cost about as much as the model's matmuls. Here a step writes its one column in place.
    """

    def __init__(self, keys, values, spare: int):
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self._length = keys.shape[2]
        self._buffers = [_allocate(t, self._length + spare) for t in (keys, values)]
        self._views()

    def _views(self):
        self.keys = self._buffers[0][:, :, :self._length]
        self.values = self._buffers[1][:, :, :self._length]

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the new columns in place (growing the buffer if full); return all keys/values."""
        new = key_states.shape[2]
        if self._length + new > self._buffers[0].shape[2]:
            self._buffers = [_allocate(t, 2 * (self._length + new)) for t in (self.keys, self.values)]
        self._buffers[0][:, :, self._length:self._length + new].copy_(key_states)
        self._buffers[1][:, :, self._length:self._length + new].copy_(value_states)
        self._length += new
        self._views()
        return self.keys, self.values


def _allocate(tensor, capacity: int):
    """A [batch, heads, capacity, dim] buffer starting with `tensor`'s columns."""
    shape = list(tensor.shape)
    shape[2] = capacity
    buffer = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
    buffer[:, :, :tensor.shape[2]].copy_(tensor)
    return buffer


def _install(cache, tensors: list[tuple[torch.Tensor, torch.Tensor]], spare: int) -> None:
    """Replace the cache's layers by in-place-append layers holding `tensors` (keys, values)."""
    cache.layers = [BufferLayer(keys, values, spare) for keys, values in tensors]


def _expand_cache(prefix_cache, rows: int, spare: int):
    """A copy of a one-row prefix cache repeated for `rows` rows, with room for `spare` columns."""
    import copy

    cache = copy.copy(prefix_cache)
    _install(cache, [(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
                     for layer in _layers(prefix_cache)], spare)
    return cache


def _widen(tensor, prefix_len: int, extra: int, dim: int):
    """Insert `extra` zero columns right after the prefix along `dim`."""
    if extra == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = extra
    zeros = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
    head, tail = tensor.narrow(dim, 0, prefix_len), tensor.narrow(dim, prefix_len, tensor.shape[dim] - prefix_len)
    return torch.cat([head, zeros, tail], dim=dim)


def _merge(batch: _Batch | None, joined: _Batch | None, prefix_len: int, spare: int) -> _Batch | None:
    """Append `joined`'s rows to `batch`, padding whichever is narrower right after the prefix."""
    if batch is None or joined is None:
        return joined if batch is None else batch
    width = max(batch.width, joined.width)
    extra_a, extra_b = width - batch.width, width - joined.width
    tensors = []
    for layer_a, layer_b in zip(_layers(batch.cache), _layers(joined.cache)):
        tensors.append(tuple(
            torch.cat([_widen(x, prefix_len, extra_a, 2), _widen(y, prefix_len, extra_b, 2)], dim=0)
            for x, y in ((layer_a.keys, layer_b.keys), (layer_a.values, layer_b.values))))
    _install(batch.cache, tensors, spare)
    batch.mask = torch.cat([_widen(batch.mask, prefix_len, extra_a, 1), _widen(joined.mask, prefix_len, extra_b, 1)])
    batch.positions = torch.cat([batch.positions, joined.positions])
    batch.last = torch.cat([batch.last, joined.last])
    batch.owners = batch.owners + joined.owners
    batch.lead = [x + extra_a for x in batch.lead] + [x + extra_b for x in joined.lead]
    return batch


def _select(batch: _Batch, keep: list[int], spare: int) -> _Batch:
    """Keep only the rows `keep` of the running batch."""
    index = torch.tensor(keep, device=batch.mask.device)
    _install(batch.cache, [(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                           for layer in _layers(batch.cache)], spare)
    batch.mask = batch.mask.index_select(0, index)
    batch.positions = batch.positions.index_select(0, index)
    batch.last = batch.last.index_select(0, index)
    batch.owners = [batch.owners[i] for i in keep]
    batch.lead = [batch.lead[i] for i in keep]
    return batch


def _compact(batch: _Batch, prefix_len: int, spare: int) -> _Batch:
    """Cut padding columns that every remaining row has right after the prefix."""
    cut = min(batch.lead)
    if cut == 0:
        return batch
    keep = torch.cat([torch.arange(prefix_len), torch.arange(prefix_len + cut, batch.width)]).to(batch.mask.device)
    _install(batch.cache, [(layer.keys.index_select(2, keep), layer.values.index_select(2, keep))
                           for layer in _layers(batch.cache)], spare)
    batch.mask = batch.mask.index_select(1, keep)
    batch.lead = [x - cut for x in batch.lead]
    return batch
