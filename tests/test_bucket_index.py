"""The incremental bucket order against a brute-force sort of everything, over many appends and merges."""

import pytest
import torch

from model import bucket_index
from model.bucket_index import BucketIndex, bucket_keys
from tests.seed import rng_for


def brute_force_window(buckets: torch.Tensor, chunk: int, before: int, after: int) -> torch.Tensor:
    """The reference's rule: sort (bucket, position), take the new (last) token's chunk and neighbours mod L."""
    heads, rounds, length = buckets.shape
    order = torch.argsort(buckets * length + torch.arange(length), dim=-1)
    rank = (order == length - 1).int().argmax(-1, keepdim=True)
    start = (rank // chunk - before) * chunk
    ranks = (start + torch.arange(chunk * (1 + before + after))) % length
    return order.gather(-1, ranks)


@pytest.mark.parametrize("case", range(6))
def test_window_equals_full_sort(case):
    rng = rng_for("bucket-index", case)
    heads, rounds, num_buckets = rng.randint(1, 3), rng.randint(1, 3), rng.choice([2, 4, 16])
    chunk, before, after = rng.choice([2, 4]), rng.randint(0, 2), rng.randint(0, 1)
    tail_capacity, slots, prompt = rng.choice([1, 2, 5]), 3, rng.randint(1, 9)
    index = BucketIndex(slots + 1, heads, rounds, 64, tail_capacity, torch.device("cpu"))
    generator = torch.Generator().manual_seed(case)
    history = {s: torch.randint(0, num_buckets, (heads, rounds, prompt), generator=generator) for s in range(slots)}
    state = {}
    for slot in range(slots):
        index.build(slot, history[slot])
        state[slot] = [prompt, 0]  # main length, tail length
    for _ in range(40):
        new = torch.randint(0, num_buckets, (slots, heads, rounds), generator=generator)
        positions = torch.tensor([sum(state[s]) for s in range(slots)])
        tails = torch.tensor([state[s][1] for s in range(slots)])
        mains = torch.tensor([state[s][0] for s in range(slots)])
        keys = bucket_keys(new, positions.view(-1, 1, 1))
        rows = (torch.arange(slots).view(-1, 1, 1) * heads + torch.arange(heads).view(1, -1, 1)) * rounds
        window = bucket_index.window(index.main, index.tail, rows + torch.arange(rounds), mains, tails, keys,
                                     torch.arange, chunk, before, after)
        index.append(torch.arange(slots), tails, keys)
        for slot in range(slots):
            history[slot] = torch.cat([history[slot], new[slot].unsqueeze(-1)], dim=-1)
            assert torch.equal(window[slot], brute_force_window(history[slot], chunk, before, after))
            state[slot][1] += 1
            if state[slot][1] == tail_capacity:
                index.merge(slot, *state[slot])
                state[slot] = [sum(state[slot]), 0]


def test_exported_binary_search_equals_searchsorted(monkeypatch):
    """The unrolled search that ONNX graphs use, on a flat pool and on batched rows."""
    generator = torch.Generator().manual_seed(4)
    flat = torch.sort(torch.randint(0, 10_000, (777,), generator=generator).unique()).values
    values = torch.randint(-5, 10_010, (3, 4, 50), generator=generator)
    rows = torch.sort(torch.randint(0, 1000, (3, 4, 9), generator=generator), dim=-1).values
    expected = (torch.searchsorted(flat, values), torch.searchsorted(rows, values))
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert torch.equal(bucket_index.search(flat, values), expected[0])
    assert torch.equal(bucket_index.search(rows, values), expected[1])
