"""Incremental decoding with cached LSH buckets over a pool of preallocated sequence slots.

Step semantics are the reference's cached step (transformers' `past_buckets_states`), made correct for
batches and cheap for long contexts (the step itself is `model.step.decode_step`). The cache keeps
projected keys and values (not the reference's hidden states), and a `BucketIndex` per LSH layer, so a
step's work does not depend on the context length; once every `tail_capacity` tokens a sequence's index is
re-sorted (O(L log L) for that step; see `bucket_index`). Slots are independent: a scheduler can add and evict sequences
between steps without touching the others.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .blocks import BlockTable, blocks_for
from .bucket_index import BucketIndex
from .embed import length_groups
from .reformer import ReformerLM, drain, pad_batch, run_layers
from .step import StepCaches, decode_step, fused_projections

log = logging.getLogger(__name__)

BLOCK_SIZE = 256  # positions in one cache block of the LSH layers (`model.blocks`)


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
    capacity: int = 0  # positions its cache blocks hold (prompt + completion may not exceed it)


@dataclass
class PrefillResult:
    last_logits: Tensor  # (n, vocab) fp32, logits after each prompt's last token
    prompt_logits: list[Tensor] = field(default_factory=list)  # per prompt (length, vocab) when asked for


class Decoder:
    """A slot pool over one model: prefill prompts into slots, then step many slots at once."""

    def __init__(self, model: ReformerLM, num_slots: int, max_length: int | None = None, *,
                 tail_capacity: int = 64, cuda_graphs: bool | None = None, prefill_batch_tokens: int = 65536,
                 cache_blocks: int | None = None, block_size: int = BLOCK_SIZE):
        """`cache_blocks` of `block_size` positions hold the LSH layers' keys and values (`model.blocks`);
        the default lets every slot reach `max_length` at once."""
        config = model.config
        if not config.is_decoder:
            raise ValueError("incremental decoding needs a causal model (is_decoder=True)")
        self.model = model
        self.config = config
        self.num_slots = num_slots
        self.max_length = min(max_length or config.max_length, config.max_length)
        self.tail_capacity = tail_capacity
        self.prefill_batch_tokens = prefill_batch_tokens  # padded tokens in one batched forward
        device, dtype = model.device, model.dtype
        self.device = device
        heads, size = config.num_attention_heads, config.attention_head_size
        # One spare slot at the end absorbs the padding rows of a graphed batch.
        total = num_slots + 1
        self.scratch_slot = num_slots
        # Keys and values side by side, so that one gathered row of a window brings both. An LSH layer's are
        # in blocks lent to each sequence for what it needs (`model.blocks`; block 0 is scratch); a local layer
        # keeps only the positions a causal step can still read, in a ring per slot (`cache_length`). Written
        # through once now: a CPU would otherwise map the pages lazily, at the first steps of each slot.
        per_slot = blocks_for(self.max_length, block_size)
        blocks = (num_slots * per_slot if cache_blocks is None else cache_blocks) if "lsh" in config.attn_layers else 0
        self.blocks = BlockTable(total, blocks, block_size, self.max_length, device)
        self.cache_lengths = [self.cache_length(config, kind, self.max_length) for kind in config.attn_layers]
        self.kv = [torch.empty(*((blocks + 1, heads, block_size) if kind == "lsh" else (total, heads, length)),
                               2 * size, dtype=dtype, device=device).zero_()
                   for kind, length in zip(config.attn_layers, self.cache_lengths)]
        self.index: list[BucketIndex | None] = [
            BucketIndex(total, heads, config.num_hashes, self.max_length, tail_capacity, device)
            if kind == "lsh" else None for kind in config.attn_layers]
        self.slots = [SlotState() for _ in range(num_slots)]
        self._free = list(range(num_slots))
        # What a step reads; index ranges are made once (inside a CUDA graph each arange is a kernel launch).
        self._caches = StepCaches(kv=self.kv, main=[i.main if i else None for i in self.index],
                                  tail=[i.tail if i else None for i in self.index],
                                  projections=fused_projections(model), block_table=self.blocks.table)
        self._ranges: dict[int, Tensor] = {}
        use_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs = _GraphCache(self) if use_graphs else None

    @staticmethod
    def cache_length(config, kind: str, max_length: int) -> int:
        """Positions a layer's key/value cache holds per sequence. An LSH layer's window can reach any
        position, so all of them; a local layer's step reads its own chunk and the `local_num_chunks_before`
        chunks before it (no look-ahead exists in causal decoding), so a ring of that many positions, each
        position p stored at p % length."""
        if kind == "lsh":
            return max_length
        return min(max_length, config.local_attn_chunk_length * (config.local_num_chunks_before + 1))

    @staticmethod
    def layer_bytes(config, kind: str, max_length: int, dtype: torch.dtype) -> int:
        """Memory one layer of a kind takes for one sequence of `max_length` positions: keys and values,
        and an LSH layer's bucket index."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        heads, size = config.num_attention_heads, config.attention_head_size
        kv = heads * Decoder.cache_length(config, kind, max_length) * 2 * size * itemsize
        return kv + (heads * config.num_hashes * max_length * 8 if kind == "lsh" else 0)

    @staticmethod
    def slot_bytes(config, max_length: int, dtype: torch.dtype) -> int:
        """What a slot holds whatever its sequence's length: local layers' rings, LSH layers' bucket indexes."""
        rings = config.attn_layers.count("local") * Decoder.layer_bytes(config, "local", max_length, dtype)
        indexes = config.attn_layers.count("lsh") * config.num_attention_heads * config.num_hashes * max_length * 8
        return rings + indexes

    @staticmethod
    def block_bytes(config, block_size: int, dtype: torch.dtype) -> int:
        """Keys and values of every LSH layer for `block_size` positions."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return (config.attn_layers.count("lsh") * config.num_attention_heads * block_size * 2
                * config.attention_head_size * itemsize)

    @staticmethod
    def bytes_per_slot(config, max_length: int, dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> int:
        """Memory one sequence of `max_length` positions takes: its slot and its blocks."""
        blocks = blocks_for(max_length, block_size) if "lsh" in config.attn_layers else 0
        return Decoder.slot_bytes(config, max_length, dtype) + blocks * Decoder.block_bytes(config, block_size, dtype)

    # ---- slots ----------------------------------------------------------------------------------------
    def room_for(self, demands: Sequence[tuple[int, int]]) -> bool:
        """Whether slots and cache blocks for every (sequences, tokens each) demand are free now."""
        slots = sum(sequences for sequences, _ in demands)
        blocks = sum(sequences * self.blocks.needed(tokens) for sequences, tokens in demands)
        return slots <= len(self._free) and blocks <= self.blocks.free_blocks

    def can_allocate(self, sequences: int, tokens: int | None = None) -> bool:
        """Whether `sequences` slots of `tokens` positions each (default: max_length) are free now."""
        return self.room_for([(sequences, tokens or self.max_length)])

    def allocate(self, tokens: int | None = None) -> int | None:
        """A free slot with cache blocks for `tokens` positions (default: max_length), or None when there
        is no room for them now."""
        if not self.can_allocate(1, tokens):
            return None
        slot = self._free.pop(0)
        capacity = self.blocks.lend(slot, tokens or self.max_length)
        self.slots[slot] = SlotState(active=True, capacity=min(capacity, self.max_length))
        return slot

    def free(self, slot: int) -> None:
        if self.slots[slot].active:
            self.blocks.give_back(slot)
            self.slots[slot] = SlotState()
            self._free.append(slot)

    def copy_slot(self, source: int, target: int) -> None:
        """Give `target` (allocated, with at least as many blocks) the same cached sequence as `source`: a
        fork without a new prefill."""
        targets, sources = self.blocks.lent_to(target), self.blocks.lent_to(source)
        with torch.inference_mode():
            for layer, cache in enumerate(self.kv):
                if self.index[layer] is None:
                    cache[target].copy_(cache[source])
                elif sources:
                    cache[targets[:len(sources)]] = cache[sources]
            for index in self.index:
                if index is not None:
                    index.copy_row(source, target)
        self.slots[target] = dataclasses.replace(self.slots[source], capacity=self.slots[target].capacity)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """The share of the cache lent out: blocks where LSH layers use them, else slots."""
        if self.blocks.num_blocks:
            return 1 - self.blocks.free_blocks / self.blocks.num_blocks
        return 1 - len(self._free) / self.num_slots

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
        return drain(self.prefill_steps(prompts, prompt_logits=prompt_logits))

    def prefill_steps(self, prompts: Sequence[tuple[int, Sequence[int]]], *,
                      prompt_logits: bool = False) -> Iterator[None]:
        """Generator form of `prefill`: yields after every layer so other work can run in between.

        Prompts are grouped by padded length: a group then computes exactly what each prompt would alone.
        """
        config = self.config
        for slot, ids in prompts:
            if not self.slots[slot].active:
                raise ValueError(f"slot {slot} is not allocated")
            if len(ids) > self.slots[slot].capacity or len(ids) < 1:
                raise ContextLengthError(f"prompt of {len(ids)} tokens does not fit 1..{self.slots[slot].capacity}")
        last = [None] * len(prompts)
        every = [None] * len(prompts)
        lengths = [len(ids) for _, ids in prompts]
        for members, padded in length_groups(lengths, config.padded_length, self.prefill_batch_tokens):
            ids, mask = pad_batch([prompts[i][1] for i in members], padded, config.pad_token_id, self.device)
            forward = self._group_forward(ids, mask)
            while True:
                try:
                    layer, keys, values, buckets = next(forward)
                except StopIteration as done:
                    logits_of = done.value
                    break
                with torch.inference_mode():
                    for row, i in enumerate(members):
                        slot, length = prompts[i][0], lengths[i]
                        self._store_prompt(layer, slot, keys[row, :, :length], values[row, :, :length])
                        if self.index[layer] is not None:
                            self.index[layer].build(slot, buckets[row, :, :, :length])
                yield
            with torch.inference_mode():
                for row, i in enumerate(members):
                    slot, length = prompts[i][0], lengths[i]
                    self.slots[slot] = SlotState(length=length, main_length=length, active=True,
                                                 hashed=padded > config.lsh_attn_chunk_length,
                                                 capacity=self.slots[slot].capacity)
                    last[i] = logits_of(row, slice(length - 1, length))[0].float()
                    if prompt_logits:
                        every[i] = logits_of(row, slice(0, length)).float()
        return PrefillResult(torch.stack(last), [t for t in every if t is not None])

    def _group_forward(self, ids: Tensor, mask: Tensor):
        """The full forward of one padded group, one layer per `next()`: yields (layer, keys, values, buckets)
        and returns logits_of(row, positions) -> logits. (The ONNX backend runs its graph here instead.)"""
        model = self.model
        x1 = x2 = None
        for layer, x1, x2, kv in run_layers(model, ids, mask, want_kv=True):
            yield layer, kv.keys, kv.values, kv.buckets
        with torch.inference_mode():
            hidden = model.final_hidden(x1, x2)
        return lambda row, positions: model.logits(hidden[row, positions])

    # ---- decode step ----------------------------------------------------------------------------------
    def step(self, slots: Sequence[int], tokens: Sequence[int]) -> Tensor:
        """Append one token to each listed slot; returns next-token logits (B, vocab) in fp32."""
        if len(slots) != len(tokens) or not slots or len(set(slots)) != len(slots):
            raise ValueError("step needs one token for each of one or more distinct slots")
        states = [self.slots[s] for s in slots]
        for slot, state in zip(slots, states):
            if not state.active or state.length < 1:
                raise ValueError(f"slot {slot} has no prefilled sequence")
            if state.length >= state.capacity:
                raise ContextLengthError(f"slot {slot} is full ({state.capacity} tokens)")
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
        out = decode_step(self.model, self._caches, tokens, slots, positions, main_length, tail_length, hashed,
                          self._range)
        self._write_step(slots, positions, tail_length, out.new_kv, out.new_bucket_keys)
        return out.logits

    def _write_step(self, slots: Tensor, positions: Tensor, tail_length: Tensor, new_kv: list[Tensor],
                    new_bucket_keys: list[Tensor | None]) -> None:
        """Store a step's new entries: each layer's key and value, each LSH layer's bucket key."""
        for layer, entry in enumerate(new_kv):
            if self.index[layer] is not None:
                blocks, offsets = self.blocks.locate(slots, positions)
                self.kv[layer][blocks, :, offsets] = entry
            else:
                self.kv[layer][slots, :, positions % self.cache_lengths[layer]] = entry
            if new_bucket_keys[layer] is not None:
                self.index[layer].append(slots, tail_length, new_bucket_keys[layer])

    def _store_prompt(self, layer: int, slot: int, keys: Tensor, values: Tensor) -> None:
        """Write a prompt's keys/values (H, length, d) into a slot: into its blocks (LSH layers), or a ring's
        last positions."""
        cache, length, size = self.kv[layer], keys.shape[1], keys.shape[-1]
        if self.index[layer] is not None:
            blocks, offsets = self.blocks.locate(slot, torch.arange(length, device=cache.device))
            cache[blocks, :, offsets] = torch.cat([keys, values], dim=-1).transpose(0, 1)
            return
        kept = min(length, self.cache_lengths[layer])
        positions = torch.arange(length - kept, length, device=cache.device) % self.cache_lengths[layer]
        cache[slot, :, positions, :size] = keys[:, length - kept:]
        cache[slot, :, positions, size:] = values[:, length - kept:]


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

    def _scratch_rows(self, size: int) -> Tensor:
        """Step inputs (6, size) whose rows all point at the spare slot, as a sequence of length 1: valid,
        if meaningless, arithmetic for the rows that pad a batch up to its graph's size."""
        rows = torch.zeros(6, size, dtype=torch.long)
        rows[1] = self.decoder.scratch_slot
        rows[2] = 1
        return rows

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        decoder = self.decoder
        static = self._scratch_rows(size).to(decoder.device)
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
        padded = self._scratch_rows(size)
        padded[:, :batch] = inputs
        static.copy_(padded, non_blocking=True)
        graph.replay()
        return logits[:batch].clone()
