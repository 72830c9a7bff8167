"""Per-sequence sorted bucket order for cached LSH decoding, updated without re-sorting the past.

A decode step needs the window of a new token in the order of (bucket, position) of every token so far,
for each head and hash round: the `chunk * (1 + before + after)` tokens whose ranks start at
`(rank // chunk - before) * chunk`, counted modulo the length (the reference's cached step). Keeping that
order in one sorted array would cost a shift of O(length) per token, and the reference re-sorts everything.

Here each (slot, head, round) row holds:
- `main`: the keys `bucket << POS_BITS | position` of the older tokens, sorted;
- `tail`: the keys of up to `tail_capacity` recent tokens, unsorted (positions only grow, so they are simply
  appended).
A step finds ranks with binary searches (main) and a sort of the short tail, and gathers a fixed number of
candidates: O(window + tail + log length) work whatever the length. When a tail fills up it is merged into
`main` (O(length), once every `tail_capacity` tokens). All shapes are fixed, so a step can be replayed from
a CUDA graph.

So that one 1-D binary search serves every row, `main` stores `row << ROW_SHIFT | key` and pads each row
with that row's largest value: the whole pool is then one sorted array.
"""

from __future__ import annotations

import torch
from torch import Tensor

POS_BITS = 21  # positions < 2**21
ROW_SHIFT = 36  # keys < 2**(15 + 21)
POS_MASK = (1 << POS_BITS) - 1
TAIL_PAD = (1 << ROW_SHIFT) - 2  # larger than any real key, smaller than a row's main padding


def bucket_keys(buckets: Tensor, positions: Tensor) -> Tensor:
    return (buckets.to(torch.int64) << POS_BITS) | positions.to(torch.int64)


class BucketIndex:
    """Sorted bucket order for every slot of one LSH layer."""

    def __init__(self, slots: int, heads: int, rounds: int, max_length: int, tail_capacity: int,
                 device: torch.device):
        self.shape = (slots, heads, rounds)
        self.max_length = max_length
        self.tail_capacity = tail_capacity
        rows = torch.arange(slots * heads * rounds, device=device, dtype=torch.int64).view(slots, heads, rounds, 1)
        self.row_offset = rows << ROW_SHIFT
        self.row_pad = self.row_offset + (1 << ROW_SHIFT) - 1
        self.main = self.row_pad.expand(slots, heads, rounds, max_length).contiguous()
        self.tail = torch.full((slots, heads, rounds, tail_capacity), TAIL_PAD, dtype=torch.int64, device=device)

    # ---- host-driven maintenance (outside the decode step) --------------------------------------------
    def build(self, slot: int, buckets: Tensor) -> None:
        """Start a slot from the raw buckets (heads, rounds, length) of its prompt."""
        length = buckets.shape[-1]
        positions = torch.arange(length, device=buckets.device)
        keys = torch.sort(bucket_keys(buckets, positions), dim=-1).values
        self.main[slot].copy_(self.row_pad[slot].expand_as(self.main[slot]))
        self.main[slot, :, :, :length] = keys + self.row_offset[slot]
        self.tail[slot].fill_(TAIL_PAD)

    def merge(self, slot: int, main_length: int, tail_length: int) -> None:
        """Fold a full tail into the sorted main array of a slot."""
        offset = self.row_offset[slot]
        keys = torch.cat([self.main[slot, :, :, :main_length] - offset, self.tail[slot, :, :, :tail_length]], -1)
        self.main[slot, :, :, : main_length + tail_length] = torch.sort(keys, dim=-1).values + offset
        self.tail[slot].fill_(TAIL_PAD)

    def copy_row(self, source: int, target: int) -> None:
        self.main[target] = self.main[source] - self.row_offset[source] + self.row_offset[target]
        self.tail[target] = self.tail[source]

    # ---- written after a decode step ------------------------------------------------------------------
    def append(self, slots: Tensor, tail_length: Tensor, keys: Tensor) -> None:
        """Write each row's new key (B, heads, rounds) at its tail position."""
        self.tail[slots, :, :, tail_length] = keys


def search(sorted_values: Tensor, values: Tensor) -> Tensor:
    """torch.searchsorted (count of entries below each value, keys being unique), also in exported graphs.

    ONNX has no search operator, so an export unrolls a binary search with a fixed number of halvings.
    """
    if not torch.compiler.is_exporting():
        return torch.searchsorted(sorted_values, values)
    size = sorted_values.shape[-1]
    low = torch.zeros_like(values)
    high = torch.full_like(values, size)
    for _ in range(max(1, size).bit_length()):
        middle = torch.div(low + high, 2, rounding_mode="floor")
        probe = middle.clamp(max=size - 1)
        if sorted_values.dim() == 1:
            below = sorted_values[probe] < values
        else:
            below = sorted_values.gather(-1, probe) < values
        active = low < high
        low = torch.where(active & below, middle + 1, low)
        high = torch.where(active & ~below, middle, high)
    return low


def window(main: Tensor, tail_pool: Tensor, rows: Tensor, main_length: Tensor, tail_length: Tensor,
           new_key: Tensor, arange, chunk: int, before: int, after: int) -> Tensor:
    """Positions (B, heads, rounds, window) of each new token's window in (bucket, position) order.

    main: the pool's sorted keys (slots, heads, rounds, max_length), with row offsets; tail_pool: the
    unsorted tails (slots, heads, rounds, capacity); rows: (B, heads, rounds) row numbers of the stepped
    slots; main_length/tail_length: (B,) counts before the new token, whose key (B, heads, rounds) is
    `new_key`; arange: n -> arange(n) on the device. Reads the pool only: the caller stores the new key.
    """
    width = chunk * (1 + before + after)
    capacity = tail_pool.shape[-1]
    max_length = main.shape[-1]
    main_flat = main.reshape(-1)
    new_index = tail_length.view(-1, 1, 1, 1)
    tail_length = new_index + 1
    main_length = main_length.view(-1, 1, 1, 1)
    length = main_length + tail_length
    row_offset = rows.unsqueeze(-1) << ROW_SHIFT
    row_start = rows.unsqueeze(-1) * max_length
    tail = tail_pool.reshape(-1, capacity)[rows]  # (B, H, R, T), unsorted, padded with TAIL_PAD
    tail = tail.scatter(-1, new_index.expand(*tail.shape[:3], 1), new_key.unsqueeze(-1))
    sorted_tail = torch.sort(tail, dim=-1).values
    # Rank of every tail key among all keys: main keys below it + tail keys below it.
    below_in_main = search(main_flat, tail + row_offset) - row_start
    tail_rank = below_in_main + search(sorted_tail, tail)
    new_rank = tail_rank.gather(-1, new_index.expand(*tail.shape[:3], 1))
    start = (torch.div(new_rank, chunk, rounding_mode="floor") - before) * chunk  # (B, H, R, 1)
    # Main entries that can hold a window rank: indices start - tail .. start + width, modulo length.
    candidate = torch.remainder(start - tail_length + arange(width + capacity), length)
    in_main = candidate < main_length
    candidate_key = main_flat[row_start + candidate.clamp(max=max_length - 1)] - row_offset
    candidate_rank = candidate + search(sorted_tail, candidate_key)
    # Place every entry whose rank falls in the window at its offset; the rest go to a spill column.
    placed = torch.zeros(*tail.shape[:3], width + 1, dtype=torch.int64, device=tail.device)
    main_offset = torch.remainder(candidate_rank - start, length)
    main_offset = torch.where(in_main & (main_offset < width), main_offset, width)
    placed = placed.scatter(-1, main_offset, candidate_key & POS_MASK)
    tail_offset = torch.remainder(tail_rank - start, length)
    tail_offset = torch.where((arange(capacity) < tail_length) & (tail_offset < width), tail_offset, width)
    placed = placed.scatter(-1, tail_offset, tail & POS_MASK)
    # Ranks repeat modulo a length shorter than the window (the reference gathers duplicates then).
    return placed.gather(-1, torch.remainder(arange(width), length).expand(*tail.shape[:3], width))
