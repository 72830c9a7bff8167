"""Fixed-size blocks of LSH-layer cache positions, lent to each sequence for what it needs.

An LSH layer's decode window can reach any earlier position, so it caches all of them; but a sequence needs
only `prompt + max_tokens` positions, not the pool's maximum length. The keys and values of every LSH layer
live in one pool of blocks of `block_size` positions (the same block ids in every LSH layer), and
`table[slot, i]` is the block that holds a sequence's positions `i * block_size ...` (vLLM's block tables).
A sequence borrows all its blocks when it is admitted, so it can never run out mid-generation: a request
that does not find them waits, one that could never find them is refused. Block 0 is scratch: the rows that
pad a CUDA-graph batch, and the unlent entries of the table, point at it.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` positions."""
    return -(-tokens // block_size)


def never_lendable(sequences: int, tokens: int, num_blocks: int, block_size: int) -> str | None:
    """Why even an empty pool of `num_blocks` could not lend `sequences` sequences of `tokens` positions each
    (a request to refuse, not to queue), or None when it could. A pool of no blocks (a model without LSH
    layers) needs none. One sentence, shared by the engine and the API server, which refuses before a stream."""
    needed = sequences * blocks_for(tokens, block_size) if num_blocks else 0
    if needed <= num_blocks:
        return None
    return (f"{sequences} sequence(s) of {tokens} tokens (prompt and max_tokens) need {needed} cache blocks of "
            f"{block_size} tokens; this server has {num_blocks}: lower max_tokens or n")


class BlockTable:
    def __init__(self, slots: int, blocks: int, block_size: int, max_length: int, device: torch.device):
        self.block_size = block_size
        self.num_blocks = blocks
        self.per_slot = blocks_for(max_length, block_size)
        self.table = torch.zeros(slots, self.per_slot, dtype=torch.long, device=device)
        self._free = deque(range(1, blocks + 1))
        self._lent: dict[int, list[int]] = {}

    def needed(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size) if self.num_blocks else 0

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def lend(self, slot: int, tokens: int) -> int:
        """Give a slot the blocks for `tokens` positions; returns the positions it may hold."""
        count = self.needed(tokens)
        if count > len(self._free):
            raise RuntimeError(f"{count} cache blocks asked for, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        self._lent[slot] = blocks
        if blocks:
            self.table[slot, :count] = torch.tensor(blocks, device=self.table.device)
        return count * self.block_size if self.num_blocks else tokens

    def give_back(self, slot: int) -> None:
        self._free.extend(self._lent.pop(slot, []))
        self.table[slot].zero_()

    def lent_to(self, slot: int) -> list[int]:
        return self._lent.get(slot, [])

    def locate(self, slots: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(block, offset in the block) of each (slot, position); `slots` broadcasts against `positions`."""
        blocks = self.table[slots, torch.div(positions, self.block_size, rounding_mode="floor")]
        return blocks, positions % self.block_size
