"""Incremental decoding with cached LSH buckets over a pool of preallocated sequence slots.

Step semantics are the reference's cached step (transformers' `past_buckets_states`), made correct for
batches and cheap for long contexts:
- local layers attend to the cached keys/values of the current and `before` previous chunks;
- LSH layers attend, per hash round, to the window of `chunk * (1 + before + after)` tokens around the new
  token in (bucket, position) order, ranks taken modulo the length, with the self-mask only, and combine
  the rounds through their log-sum-exp; until a sequence has reached the LSH chunk length it attends to
  all its tokens instead (the reference's empty bucket cache).
The cache keeps projected keys and values (not the reference's hidden states), and a `BucketIndex` per LSH
layer, so a step costs the same at any context length. Slots are independent: a scheduler can add and
evict sequences between steps without touching the others.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attention import hash_vectors, logsumexp, mask_values, normalize_keys, softmax_with_lse
from .bucket_index import BucketIndex, bucket_keys
from .embed import length_groups
from .reformer import ReformerLM, pad_batch, run_layers

log = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    """A request does not fit the model's (or the pool's) context."""


@dataclass
class SlotState:
    """Host-side bookkeeping of one sequence slot (mirrors what the device tensors hold)."""

    length: int = 0  # tokens cached
    main_length: int = 0  # tokens in the sorted part of the bucket index
    tail_length: int = 0  # tokens in its unsorted tail
    hashed: bool = False  # the reference's "bucket cache is non-empty"
    active: bool = False


@dataclass
class PrefillResult:
    last_logits: Tensor  # (n, vocab) fp32, logits after each prompt's last token
    prompt_logits: list[Tensor] = field(default_factory=list)  # per prompt (length, vocab) when asked for


class Decoder:
    """A slot pool over one model: prefill prompts into slots, then step many slots at once."""

    def __init__(self, model: ReformerLM, num_slots: int, max_length: int | None = None, *,
                 tail_capacity: int = 64, cuda_graphs: bool | None = None, prefill_batch_tokens: int = 65536):
        config = model.config
        if not config.is_decoder:
            raise ValueError("incremental decoding needs a causal model (is_decoder=True)")
        self.model = model
        self.config = config
        self.num_slots = num_slots
        self.max_length = min(max_length or config.max_positions, config.max_positions)
        self.tail_capacity = tail_capacity
        self.prefill_batch_tokens = prefill_batch_tokens  # padded tokens in one batched forward
        device, dtype = model.device, model.dtype
        self.device = device
        heads, size = config.num_attention_heads, config.attention_head_size
        # One spare slot at the end absorbs the padding rows of a graphed batch.
        total = num_slots + 1
        self.scratch_slot = num_slots
        # Keys and values side by side, so that one gathered row of a window brings both. Written through
        # once now: a CPU would otherwise map the pages lazily, at the first steps of each slot.
        self.kv = [torch.empty(total, heads, self.max_length, 2 * size, dtype=dtype, device=device).zero_()
                   for _ in config.attn_layers]
        self.index: list[BucketIndex | None] = [
            BucketIndex(total, heads, config.num_hashes, self.max_length, tail_capacity, device)
            if kind == "lsh" else None for kind in config.attn_layers]
        self.slots = [SlotState() for _ in range(num_slots)]
        self._free = list(range(num_slots))
        # Fused projections (one matmul per layer) and index ranges, made once so a step launches fewer kernels.
        self._projections = [torch.cat([p.weight for p in (
            (block.attn.qk, block.attn.v) if block.kind == "lsh" else (block.attn.q, block.attn.k, block.attn.v))])
            for block in model.layers]
        self._ranges: dict[int, Tensor] = {}
        use_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs = _GraphCache(self) if use_graphs else None

    @staticmethod
    def bytes_per_slot(config, max_length: int, dtype: torch.dtype) -> int:
        """Memory one slot takes: keys and values of every layer plus the LSH layers' bucket indexes."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        heads, size = config.num_attention_heads, config.attention_head_size
        kv = config.num_layers * heads * max_length * 2 * size * itemsize
        index = sum(kind == "lsh" for kind in config.attn_layers) * heads * config.num_hashes * max_length * 8
        return kv + index

    # ---- slots ----------------------------------------------------------------------------------------
    def allocate(self) -> int | None:
        """A free slot, or None when the pool is full."""
        if not self._free:
            return None
        slot = self._free.pop(0)
        self.slots[slot] = SlotState(active=True)
        return slot

    def free(self, slot: int) -> None:
        if self.slots[slot].active:
            self.slots[slot] = SlotState()
            self._free.append(slot)

    def copy_slot(self, source: int, target: int) -> None:
        """Give `target` (allocated) the same cached sequence as `source`: a fork without a new prefill."""
        with torch.inference_mode():
            for cache in self.kv:
                cache[target].copy_(cache[source])
            for index in self.index:
                if index is not None:
                    index.copy_row(source, target)
        self.slots[target] = dataclasses.replace(self.slots[source])

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def check_fits(self, prompt_length: int, max_new_tokens: int) -> None:
        """Refuse up front a request that would run past the context (never mid-generation)."""
        if prompt_length < 1:
            raise ContextLengthError("the prompt must hold at least one token")
        total = prompt_length + max_new_tokens
        if total > self.max_length:
            raise ContextLengthError(
                f"prompt of {prompt_length} tokens plus {max_new_tokens} new tokens = {total} exceeds the "
                f"maximum context of {self.max_length} tokens")

    # ---- prefill --------------------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[tuple[int, Sequence[int]]], *, prompt_logits: bool = False) -> PrefillResult:
        """Run prompts (slot, token ids) through the full forward and fill their slots."""
        job = self.prefill_steps(prompts, prompt_logits=prompt_logits)
        while True:
            try:
                next(job)
            except StopIteration as done:
                return done.value

    def prefill_steps(self, prompts: Sequence[tuple[int, Sequence[int]]], *,
                      prompt_logits: bool = False) -> Iterator[None]:
        """Generator form of `prefill`: yields after every layer so other work can run in between.

        Prompts are grouped by padded length: a group then computes exactly what each prompt would alone.
        """
        config, model = self.config, self.model
        for slot, ids in prompts:
            if not self.slots[slot].active:
                raise ValueError(f"slot {slot} is not allocated")
            if len(ids) > self.max_length or len(ids) < 1:
                raise ContextLengthError(f"prompt of {len(ids)} tokens does not fit 1..{self.max_length}")
        last = [None] * len(prompts)
        every = [None] * len(prompts)
        lengths = [len(ids) for _, ids in prompts]
        for members, padded in length_groups(lengths, config.padded_length, self.prefill_batch_tokens):
            ids, mask = pad_batch([prompts[i][1] for i in members], padded, config.pad_token_id, self.device)
            x1 = x2 = None
            for layer, x1, x2, kv in run_layers(model, ids, mask, want_kv=True):
                with torch.inference_mode():
                    for row, i in enumerate(members):
                        slot, length = prompts[i][0], lengths[i]
                        self._store(layer, slot, slice(0, length), kv.keys[row, :, :length],
                                    kv.values[row, :, :length])
                        if self.index[layer] is not None:
                            self.index[layer].build(slot, kv.buckets[row, :, :, :length])
                yield
            with torch.inference_mode():
                hidden = model.final_hidden(x1, x2)
                for row, i in enumerate(members):
                    slot, length = prompts[i][0], lengths[i]
                    self.slots[slot] = SlotState(length=length, main_length=length, active=True,
                                                 hashed=padded > config.lsh_attn_chunk_length)
                    last[i] = model.logits(hidden[row, length - 1]).float()
                    if prompt_logits:
                        every[i] = model.logits(hidden[row, :length]).float()
        return PrefillResult(torch.stack(last), [t for t in every if t is not None])

    # ---- decode step ----------------------------------------------------------------------------------
    def step(self, slots: Sequence[int], tokens: Sequence[int]) -> Tensor:
        """Append one token to each listed slot; returns next-token logits (B, vocab) in fp32."""
        if len(slots) != len(tokens) or not slots or len(set(slots)) != len(slots):
            raise ValueError("step needs one token for each of one or more distinct slots")
        states = [self.slots[s] for s in slots]
        for slot, state in zip(slots, states):
            if not state.active or state.length < 1:
                raise ValueError(f"slot {slot} has no prefilled sequence")
            if state.length >= self.max_length:
                raise ContextLengthError(f"slot {slot} is full ({self.max_length} tokens)")
        inputs = torch.tensor(
            [list(tokens), list(slots), [s.length for s in states], [s.main_length for s in states],
             [s.tail_length for s in states], [int(s.hashed) for s in states]], dtype=torch.long)
        if self._graphs is not None:
            logits = self._graphs.run(inputs)
        else:
            logits = self.step_tensors(*inputs.to(self.device))
        chunk = self.config.lsh_attn_chunk_length
        for slot, state in zip(slots, states):
            state.length += 1
            state.tail_length += 1
            state.hashed = state.hashed or state.length >= chunk
            if state.tail_length == self.tail_capacity:
                self._merge(slot)
        return logits

    def _merge(self, slot: int) -> None:
        state = self.slots[slot]
        with torch.inference_mode():
            for index in self.index:
                if index is not None:
                    index.merge(slot, state.main_length, state.tail_length)
        state.main_length += state.tail_length
        state.tail_length = 0

    def _range(self, length: int) -> Tensor:
        """arange(length) on the device, made once (inside a CUDA graph each arange is a kernel launch)."""
        if length not in self._ranges:
            self._ranges[length] = torch.arange(length, device=self.device)
        return self._ranges[length]

    @torch.inference_mode()
    def step_tensors(self, tokens: Tensor, slots: Tensor, positions: Tensor, main_length: Tensor,
                     tail_length: Tensor, hashed: Tensor) -> Tensor:
        """The step as pure tensor work (no host synchronisation): safe to capture in a CUDA graph.

        All arguments are (B,) int64 on the model's device; `positions` is each slot's current length.
        """
        model, config = self.model, self.config
        step = _StepRows(
            slots=slots, positions=positions, main_length=main_length, tail_length=tail_length,
            hashed=hashed.bool().view(-1, 1, 1, 1),
            cache_rows=((slots.view(-1, 1) * config.num_attention_heads + self._range(config.num_attention_heads))
                        * self.max_length),
            index_rows=(slots.view(-1, 1, 1) * config.num_attention_heads + self._range(config.num_attention_heads)
                        .view(1, -1, 1)) * config.num_hashes + self._range(config.num_hashes))
        x = model.embed(tokens.unsqueeze(1), positions.unsqueeze(1))  # (B, 1, hidden)
        x1 = x2 = x
        for layer, block in enumerate(model.layers):
            h = block.attn_norm(x2)[:, 0]
            if block.kind == "lsh":
                context = self._lsh_step(layer, block.attn, h, step)
            else:
                context = self._local_step(layer, block.attn, h, step)
            x1 = x1 + block.attn.out(context).unsqueeze(1)
            x2 = x2 + block.ff(x1)
        return model.logits(model.final_hidden(x1, x2)[:, 0]).float()

    def _store(self, layer: int, slots, positions, keys: Tensor, values: Tensor) -> None:
        """Write keys/values (..., H, d) for (slots, positions): ints and slices, or (B,) index tensors."""
        cache = self.kv[layer]
        size = keys.shape[-1]
        cache[slots, :, positions, :size] = keys
        cache[slots, :, positions, size:] = values

    def _gather(self, layer: int, step: _StepRows, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (B, H, ..., W) -> keys, values (B, H, ..., W, d) of the stepped slots' cached tokens."""
        cache = self.kv[layer]
        size = cache.shape[-1]
        base = step.cache_rows.view(*step.cache_rows.shape, *([1] * (positions.dim() - 2)))
        rows = cache.view(-1, size)[base + positions]
        return rows[..., : size // 2], rows[..., size // 2:]

    def _local_step(self, layer: int, attn, h: Tensor, step: _StepRows) -> Tensor:
        batch, heads, size = h.shape[0], attn.heads, attn.head_size
        q, k, v = (h @ self._projections[layer].t()).view(batch, 3, heads, size).unbind(1)
        self._store(layer, step.slots, step.positions, k / math.sqrt(size), v)
        width = attn.chunk * (attn.before + 1)
        start = (torch.div(step.positions, attn.chunk, rounding_mode="floor") - attn.before).clamp(min=0) * attn.chunk
        window = start.view(-1, 1) + self._range(width)  # (B, W)
        valid = window <= step.positions.view(-1, 1)
        window = window.clamp(max=self.max_length - 1).unsqueeze(1).expand(-1, heads, -1)
        keys, values = self._gather(layer, step, window)  # (B, H, W, d)
        masked, _ = mask_values(keys.dtype)
        scores = (keys @ q.unsqueeze(-1)).squeeze(-1).float()
        scores.masked_fill_(~valid.unsqueeze(1), masked)
        probs, _ = softmax_with_lse(scores)
        return (probs.to(values.dtype).unsqueeze(-2) @ values).reshape(batch, -1)

    def _lsh_step(self, layer: int, attn, h: Tensor, step: _StepRows) -> Tensor:
        batch, heads, size = h.shape[0], attn.heads, attn.head_size
        qk, v = (h @ self._projections[layer].t()).view(batch, 2, heads, size).unbind(1)
        self._store(layer, step.slots, step.positions, normalize_keys(qk), v)
        index = self.index[layer]
        buckets = hash_vectors(qk.unsqueeze(2), attn.rotations, attn.num_buckets)[..., 0]  # (B, H, R)
        index.append(step.slots, step.tail_length, bucket_keys(buckets, step.positions.view(-1, 1, 1)))
        width = attn.chunk * (1 + attn.before + attn.after)
        window = index.window(step.index_rows, step.main_length, step.tail_length, self._range, attn.chunk,
                              attn.before, attn.after)
        # Before the sequence reaches the chunk length the reference attends to every token (one round).
        full = max(width, attn.chunk + 1)
        everything = self._range(full)
        if full > width:
            window = torch.cat([window, window.new_zeros(*window.shape[:3], full - width)], dim=-1)
        window = torch.where(step.hashed, window, everything.clamp(max=self.max_length - 1))
        valid = torch.where(step.hashed, everything < width, everything <= step.positions.view(-1, 1, 1, 1))
        keys, values = self._gather(layer, step, window)  # (B, H, R, W, d)
        masked, self_value = mask_values(keys.dtype)
        scores = (keys @ qk.view(batch, heads, 1, size, 1)).squeeze(-1).float()  # (B, H, R, W)
        scores.masked_fill_(window == step.positions.view(-1, 1, 1, 1), self_value)
        scores.masked_fill_(~valid, masked)
        probs, lse = softmax_with_lse(scores)
        rounds = (probs.to(values.dtype).unsqueeze(-2) @ values).squeeze(-2).float()  # (B, H, R, d)
        if attn.rounds > 1:
            lse = lse.unsqueeze(-1)
            weights = torch.exp(lse - logsumexp(lse, 2))
            combined = torch.sum(rounds * weights, dim=2)
            context = torch.where(step.hashed.view(-1, 1, 1), combined, rounds[:, :, 0])
        else:
            context = rounds[:, :, 0]
        return context.to(values.dtype).reshape(batch, -1)


@dataclass
class _StepRows:
    """Per-step index tensors shared by every layer of one decode step."""

    slots: Tensor  # (B,)
    positions: Tensor  # (B,) the new token's position (= cached length before the step)
    main_length: Tensor  # (B,) sorted part of the bucket index
    tail_length: Tensor  # (B,) unsorted tail before the new token
    hashed: Tensor  # (B, 1, 1, 1) bool
    cache_rows: Tensor  # (B, H) first flat row of each (slot, head) in a key/value cache
    index_rows: Tensor  # (B, H, R) row of each (slot, head, round) in a bucket index


class _GraphCache:
    """CUDA graphs of the decode step, one per padded batch size, replayed with fresh inputs."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self.pool = None
        self.failed = False

    def _bucket(self, batch: int) -> int:
        """Batch sizes are padded to powers of two (capped at the pool size) to bound the graph count."""
        return min(1 << (batch - 1).bit_length(), self.decoder.num_slots)

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        decoder = self.decoder
        static = torch.zeros(6, size, dtype=torch.long, device=decoder.device)
        static[1] = decoder.scratch_slot
        static[2] = 1  # a scratch row of length 1: valid, if meaningless, arithmetic
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                decoder.step_tensors(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = decoder.step_tensors(*static)
        self.pool = graph.pool()
        return graph, static, logits

    def run(self, inputs: Tensor) -> Tensor:
        decoder = self.decoder
        batch = inputs.shape[1]
        if self.failed:
            return decoder.step_tensors(*inputs.to(decoder.device))
        size = self._bucket(batch)
        if size not in self.graphs:
            try:
                self.graphs[size] = self._capture(size)
            except RuntimeError as error:
                log.warning("CUDA graph capture failed, decoding eagerly from now on: %s", error)
                self.failed = True
                return decoder.step_tensors(*inputs.to(decoder.device))
        graph, static, logits = self.graphs[size]
        padded = torch.zeros(6, size, dtype=torch.long)
        padded[1] = decoder.scratch_slot
        padded[2] = 1
        padded[:, :batch] = inputs
        static.copy_(padded, non_blocking=True)
        graph.replay()
        return logits[:batch].clone()
