"""Full forward against the reference on random tiny configs (CPU, fp32, sharpened weights)."""

import pytest
import torch

from tests.reference import build_pair, describe, random_hf_kwargs, random_ids, rng_for

CASES = 24


@pytest.mark.parametrize("case", range(CASES))
def test_lm_forward_matches_reference(case):
    rng = rng_for("lm-forward", case)
    kwargs = random_hf_kwargs(rng, decoder=True)
    reference, ours = build_pair(kwargs, seed=case)
    for batch in (1, 3):
        # lengths around chunk multiples: exact multiples, ones that need padding, short ones
        for length in sorted({1, 3, rng.randint(2, 12), rng.randint(13, 40), 32, 64}):
            ids = random_ids(rng, batch, length, kwargs["vocab_size"])
            with torch.no_grad():
                expected = reference(ids).logits
                actual = ours(ids)
            assert (expected - actual).abs().max().item() <= 1e-5, f"{describe(kwargs)} batch={batch} length={length}"


@pytest.mark.parametrize("case", range(CASES))
def test_encoder_forward_with_padding_mask_matches_reference(case):
    """Bidirectional layers with look-ahead chunks and a ragged padding mask (ReformerModel)."""
    rng = rng_for("encoder-forward", case)
    kwargs = random_hf_kwargs(rng, decoder=rng.random() < 0.3)
    reference, ours = build_pair(kwargs, seed=case, lm=False)
    batch, length = 3, rng.choice([16, 24, 32, 40])
    ids = random_ids(rng, batch, length, kwargs["vocab_size"])
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, rng.randint(1, length - 1):] = 0
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).last_hidden_state
        actual = ours.hidden_states(ids, mask)
    assert (expected - actual).abs().max().item() <= 1e-5, describe(kwargs)

