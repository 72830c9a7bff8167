"""Context limits are enforced up front; memory-only knobs (chunked feed-forward) never change results."""

import pytest
import torch

from model.config import ReformerConfig
from model.decode import ContextLengthError, Decoder
from model.generate import generate
from model.reformer import ReformerLM
from model.sampling import SamplingParams
from tests.reference import TINY, build_pair, random_ids, rng_for


def test_prompt_plus_new_tokens_beyond_the_context_is_refused():
    _, model = build_pair(dict(TINY))
    decoder = Decoder(model, num_slots=1)
    decoder.check_fits(60, 4)
    with pytest.raises(ContextLengthError, match="60 tokens plus 5 new tokens = 65 exceeds the maximum context of 64"):
        decoder.check_fits(60, 5)
    with pytest.raises(ContextLengthError):
        generate(model, [[3] * 64], SamplingParams(max_tokens=1), decoder=decoder)
    assert decoder.free_slots == 1  # refused before anything was allocated


def test_chunked_feed_forward_gives_identical_results_and_decodes():
    _, model = build_pair(dict(TINY))
    chunked = ReformerLM(ReformerConfig.from_dict({**model.config.to_dict(), "chunk_size_feed_forward": 3})).eval()
    chunked.load_state_dict(model.state_dict())
    rng = rng_for("ff-chunks")
    ids = random_ids(rng, 2, 40, TINY["vocab_size"])
    with torch.no_grad():
        assert (chunked(ids) - model(ids)).abs().max() <= 1e-5  # same math, other matmul blocking
    prompt = ids[0, :9].tolist()
    params = SamplingParams(max_tokens=12, temperature=0.0)
    assert generate(chunked, [prompt], params)[0].token_ids == generate(model, [prompt], params)[0].token_ids


def test_step_refuses_bad_slot_lists():
    _, model = build_pair(dict(TINY))
    decoder = Decoder(model, num_slots=2)
    slot = decoder.allocate()
    with pytest.raises(ValueError, match="no prefilled sequence"):
        decoder.step([slot], [5])
    decoder.prefill([(slot, [4, 5, 6])])
    with pytest.raises(ValueError, match="distinct"):
        decoder.step([slot, slot], [5, 6])
    with pytest.raises(ValueError, match="not allocated"):
        decoder.prefill([(1, [4, 5])])
    assert decoder.step([slot], [7]).shape == (1, TINY["vocab_size"])
