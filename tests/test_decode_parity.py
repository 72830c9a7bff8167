"""Cached decoding against the reference's cached step, its generate(), and against itself row by row."""

import pytest
import torch
from transformers.models.reformer import modeling_reformer

from model.blocks import never_lendable
from model.config import ReformerConfig
from model.decode import Decoder
from model.generate import generate
from model.sampling import SamplingParams
from tests.reference import (TINY, build_pair, describe, normalize_reference_round_offsets, random_hf_kwargs,
                             random_ids, rng_for)

CASES = 16
TOTAL = 48  # prompt + generated tokens per sequence (the tiny models address 64 positions)


@pytest.fixture(autouse=True)
def _fixed_local_cache_window(monkeypatch):
    """The reference's cached local layer wraps a negative slice start when local_num_chunks_before >= 2
    and silently drops the oldest keys of the window; clamp it at 0 so it computes what its full forward does."""

    def window(previous, chunk_length, num_chunks_before):
        start = max(0, (previous.shape[1] // chunk_length - num_chunks_before) * chunk_length)
        return previous[:, start:]

    monkeypatch.setattr(modeling_reformer.LocalSelfAttention, "_retrieve_relevant_hidden_states",
                        staticmethod(window))


def _reference_steps(reference, config, ids, prompt_length):
    """Logits of the reference's prefill and of each of its cached steps."""
    with torch.no_grad():
        out = reference(ids[:, :prompt_length], use_cache=True)
        cache = out.past_buckets_states
        normalize_reference_round_offsets(config, prompt_length, cache)
        logits = [out.logits[0, -1]]
        for t in range(prompt_length, ids.shape[1]):
            out = reference(ids[:, t: t + 1], past_buckets_states=cache, use_cache=True)
            cache = out.past_buckets_states
            logits.append(out.logits[0, -1])
    return torch.stack(logits)


@pytest.mark.parametrize("case", range(CASES))
def test_cached_steps_match_reference_at_batch_1(case):
    rng = rng_for("cached-step", case)
    kwargs = random_hf_kwargs(rng)
    reference, ours = build_pair(kwargs, seed=case)
    config = ours.config
    lengths = sorted({1, rng.randint(2, 7), rng.randint(8, 20), config.padded_length(rng.randint(9, 24))})
    for prompt_length in lengths:
        ids = random_ids(rng, 1, TOTAL, kwargs["vocab_size"])
        expected = _reference_steps(reference, config, ids, prompt_length)
        decoder = Decoder(ours, num_slots=2, tail_capacity=rng.choice([1, 3, 8]), block_size=rng.choice([4, 8, 64]))
        slot = decoder.allocate()
        actual = [decoder.prefill([(slot, ids[0, :prompt_length].tolist())]).last_logits[0]]
        for t in range(prompt_length, TOTAL):
            actual.append(decoder.step([slot], [int(ids[0, t])])[0])
        error = (torch.stack(actual) - expected).abs().max().item()
        assert error <= 1e-5, f"{describe(kwargs)} prompt={prompt_length} error={error:.2e}"


@pytest.mark.parametrize("case", range(6))
def test_greedy_generation_equals_reference_generate(case):
    rng = rng_for("greedy", case)
    kwargs = random_hf_kwargs(rng)
    reference, ours = build_pair(kwargs, seed=case)
    config = ours.config
    # Prompts the reference does not pad (short, or a multiple of the chunk lengths): with padding its
    # generate() can hit the round-offset bug that normalize_reference_round_offsets explains.
    for prompt_length in (rng.randint(1, config.min_chunk_length), config.padding_multiple * rng.randint(1, 2)):
        ids = random_ids(rng, 1, prompt_length, kwargs["vocab_size"])
        with torch.no_grad():
            expected = reference.generate(ids, max_new_tokens=24, do_sample=False, use_cache=True,
                                          pad_token_id=0)[0, prompt_length:].tolist()
        ours_out = generate(ours, [ids[0].tolist()], SamplingParams(max_tokens=24, temperature=0.0))[0]
        assert ours_out.token_ids == expected, f"{describe(kwargs)} prompt={prompt_length}"


@pytest.mark.parametrize("case", range(8))
def test_batched_decoding_equals_each_row_alone(case):
    """Rows at different positions, admitted and evicted at different times, reusing slots."""
    rng = rng_for("batched", case)
    kwargs = random_hf_kwargs(rng)
    _, ours = build_pair(kwargs, seed=case)
    prompts = [random_ids(rng, 1, rng.randint(1, 24), kwargs["vocab_size"])[0].tolist() for _ in range(5)]
    feeds = [random_ids(rng, 1, rng.randint(4, 20), kwargs["vocab_size"])[0].tolist() for _ in range(5)]

    def alone(i):
        decoder = Decoder(ours, num_slots=1, tail_capacity=4)
        slot = decoder.allocate()
        out = [decoder.prefill([(slot, prompts[i])]).last_logits[0]]
        out += [decoder.step([slot], [token])[0] for token in feeds[i]]
        return torch.stack(out)

    expected = [alone(i) for i in range(5)]
    # Blocks of 4 positions, fewer than three sequences of the full length need: each sequence borrows
    # what it needs, and blocks given back are lent again in another order.
    decoder = Decoder(ours, num_slots=3, tail_capacity=4, block_size=4, cache_blocks=24)
    got = {i: [] for i in range(5)}
    progress = {}
    waiting = list(range(5))
    while waiting or progress:
        # admit as many as fit, several prompts in one prefill call
        admitted = []
        while waiting and decoder.can_allocate(1, len(prompts[waiting[0]]) + len(feeds[waiting[0]])):
            i = waiting.pop(0)
            admitted.append((decoder.allocate(len(prompts[i]) + len(feeds[i])), i))
        if admitted:
            result = decoder.prefill([(slot, prompts[i]) for slot, i in admitted])
            for (slot, i), logits in zip(admitted, result.last_logits):
                got[i].append(logits)
                progress[slot] = (i, 0)
        slots = [s for s in progress if rng.random() < 0.8] or list(progress)
        logits = decoder.step(slots, [feeds[progress[s][0]][progress[s][1]] for s in slots])
        for slot, row in zip(slots, logits):
            i, done = progress[slot]
            got[i].append(row)
            progress[slot] = (i, done + 1)
            if done + 1 == len(feeds[i]):
                del progress[slot]
                decoder.free(slot)
    for i in range(5):
        error = (torch.stack(got[i]) - expected[i]).abs().max().item()
        assert error <= 1e-5, f"{describe(kwargs)} row={i} error={error:.2e}"


def test_copied_slot_continues_like_its_source():
    rng = rng_for("copy-slot")
    kwargs = random_hf_kwargs(rng)
    _, ours = build_pair(kwargs)
    prompt = random_ids(rng, 1, 21, kwargs["vocab_size"])[0].tolist()
    feed = random_ids(rng, 1, 12, kwargs["vocab_size"])[0].tolist()
    decoder = Decoder(ours, num_slots=3, tail_capacity=5)
    source, target = decoder.allocate(), decoder.allocate()
    decoder.prefill([(source, prompt)])
    decoder.step([source], [feed[0]])
    decoder.copy_slot(source, target)
    for token in feed[1:]:
        logits = decoder.step([source, target], [token, token])
        assert (logits[0] - logits[1]).abs().max() == 0


def test_local_layers_cache_their_window_and_lsh_layers_blocks():
    """A causal local layer reads its own chunk and `local_num_chunks_before` before it: its cache is a ring of
    that many positions per slot (the steps above wrap it many times over); an LSH layer's window can reach
    any position, so its keys and values live in blocks lent to each sequence for what it needs."""
    _, ours = build_pair(dict(TINY))  # local chunks of 4 with one before; 64 positions
    decoder = Decoder(ours, num_slots=2, block_size=16, cache_blocks=5)
    assert [tuple(cache.shape[:3]) for cache in decoder.kv] == [(3, 2, 8), (6, 2, 16), (3, 2, 8), (6, 2, 16)]
    config = ours.config
    per_position = config.num_attention_heads * 2 * config.attention_head_size * 4  # fp32 keys and values
    index = 2 * config.num_attention_heads * config.num_hashes * 64 * 8  # two LSH layers' int64 bucket keys
    assert Decoder.slot_bytes(config, 64, torch.float32) == 2 * 8 * per_position + index
    assert Decoder.block_bytes(config, 16, torch.float32) == 2 * 16 * per_position
    assert Decoder.bytes_per_slot(config, 64, torch.float32, 16) == per_position * (8 + 64 + 8 + 64) + index
    # ... which is what the pool allocates (a spare slot and a scratch block included; index tails aside).
    allocated = sum(cache.nbytes for cache in decoder.kv) + sum(i.main.nbytes for i in decoder.index if i)
    assert allocated == 3 * Decoder.slot_bytes(config, 64, torch.float32) + 6 * Decoder.block_bytes(config, 16,
                                                                                                  torch.float32)
    # A sequence borrows the blocks it needs, up front; what is not free now waits, what never fits is said.
    first = decoder.allocate(40)  # 3 blocks
    assert decoder.slots[first].capacity == 48 and decoder.blocks.free_blocks == 2
    assert not decoder.can_allocate(1, 40) and decoder.can_allocate(1, 32) and decoder.allocate(40) is None
    blocks = decoder.blocks  # 4, and 2 x 3, of 5 blocks: the first fits an empty pool, the second never does
    assert never_lendable(1, 64, blocks.num_blocks, blocks.block_size) is None
    assert "need 6 cache blocks of 16 tokens; this server has 5" in never_lendable(2, 48, blocks.num_blocks,
                                                                                  blocks.block_size)
    decoder.free(first)
    assert decoder.blocks.free_blocks == 5 and decoder.blocks.table[first].eq(0).all()
    # A window longer than the context keeps every position.
    wide = ReformerConfig.from_hf_dict(dict(TINY, local_attn_chunk_length=64, axial_pos_shape=[4, 16]))
    assert Decoder.cache_length(wide, "local", 64) == 64
